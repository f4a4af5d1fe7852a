"""A 4-bit base for QLoRA (Dettmers et al. 2023): the frozen linear weights of the transformer blocks
stored in NF4, dequantized in each forward pass, while LoRA, the adapter and the special-token rows
train in full precision beside them.

NF4 is torchao's `NF4Tensor`: 4-bit NormalFloat codes, one scale per 64 weights, and those scales
themselves quantized to 8 bits per 256 (QLoRA's double quantization), about 4.1 bits per weight in
all. It is written in plain PyTorch ops, so the same tensor runs on a CPU and on a GPU, and its
linear layer has the backward pass LoRA needs (the input's gradient; the weight gets none). The
embedding, the head and the norms stay as they are: they are a small part of a 7B model, and the
head scores the special tokens' trained rows.
"""

from typing import Iterator, Literal, Optional

import torch
import torch.nn as nn

from lit_llama.errors import BadValue, MissingPackage
from lit_llama.model import LLaMA

Quantize = Literal["nf4"]
INSTALL = "pip install -e '.[quantize]' (torchao)"
BLOCK_SIZE = 64  # weights that share one scale
SCALER_BLOCK_SIZE = 256  # scales that share one 8-bit quantization of theirs


def nf4_tensor() -> type:
    try:
        from torchao.quantization import NF4Tensor
    except ImportError:
        raise MissingPackage(f"--quantize nf4 needs torchao: {INSTALL}") from None
    return NF4Tensor


def block_linears(model: LLaMA) -> Iterator[tuple[str, nn.Linear]]:
    """The linear layers of the transformer blocks: attention's c_attn and c_proj, the MLP's three."""
    for name, module in model.transformer.h.named_modules():
        if isinstance(module, nn.Linear):
            yield f"transformer.h.{name}", module


@torch.no_grad()
def quantize(model: LLaMA, method: Optional[Quantize], device: Optional[torch.device] = None,
             dtype: Optional[torch.dtype] = None) -> LLaMA:
    """Store the block linears' weights in `method` ("nf4"; None: leave the model as it is), quantized
    from `dtype` (by default their own), one layer at a time on `device` (by default where they are):
    moving a 70B base to a GPU this way never holds more than one dense layer there."""
    if method is not None:
        for i, block in enumerate(model.transformer.h):
            quantize_block(block, f"transformer.h.{i}", device, dtype)
    return model


@torch.no_grad()
def quantize_block(block: nn.Module, name: str, device: Optional[torch.device] = None,
                   dtype: Optional[torch.dtype] = None, shards: int = 1) -> None:
    """`quantize` for the linear layers of one block (named `name`), whose codes are then to be cut into
    `shards` equal row shards (FSDP2): each shard must hold whole NF4 blocks and scaler blocks."""
    NF4Tensor = nf4_tensor()
    for sub, module in block.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if module.weight.requires_grad:
            raise ValueError(f"{name}.{sub}.weight trains: only a frozen base is quantized (LoRA or adapter, not "
                             "full fine-tuning)")
        weight = module.weight.to(device=device, dtype=dtype)
        if weight.shape[0] % shards or weight.numel() % (BLOCK_SIZE * SCALER_BLOCK_SIZE * shards):
            raise BadValue(f"{name}.{sub}.weight {tuple(weight.shape)} does not split into {shards} equal row shards "
                           f"of whole NF4 blocks of {BLOCK_SIZE} x {SCALER_BLOCK_SIZE} weights"
                           + ("; train it on fewer processes" if shards > 1 else ""))
        module.weight = nn.Parameter(NF4Tensor.from_tensor(weight, BLOCK_SIZE, SCALER_BLOCK_SIZE), requires_grad=False)


@torch.no_grad()
def round_trip(model: LLaMA, method: Quantize, dtype: torch.dtype) -> LLaMA:
    """Dense block weights holding what their `method` codes stand for, quantized from `dtype` as a
    quantized fine-tune's training quantized them: the weights its trained part learned beside, with
    the quantization error in them."""
    NF4Tensor = nf4_tensor()
    for _, module in block_linears(model):
        codes = NF4Tensor.from_tensor(module.weight.to(dtype), BLOCK_SIZE, SCALER_BLOCK_SIZE)
        module.weight = nn.Parameter(codes.get_original_weight().to(module.weight.dtype), requires_grad=False)
    return model
