"""Several LoRAs of one base in one continuous batch: each row of the batch adds the update of its own
LoRA, or none (the base itself). The base weights are shared; each adapted layer holds every LoRA's
A and B stacked, and gathers each row's pair in every forward pass:

    y = x W^T + (x A_i^T) (s_i B_i)^T      for a row of LoRA i;  A_0 = B_0 = 0 for the base

Ranks and targets may differ between the LoRAs: a smaller rank is padded with zeros and a layer a
LoRA leaves alone holds zeros for it, which add nothing. The special tokens' trained rows are chosen
per row the same way, so the LoRAs must share one vocabulary (the same special tokens at the same ids).

    load_loras(out_dirs, checkpoint_dir)     the base, and its LoRAs checked against it and each other
    attach_loras(model, names, loras, ...)   the base's layers batched over them, placed -> LoRABank
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.checkpoint import GIVE_OUT_DIR, base_dir_of, check_base, load_model, load_trained, read_hparams
from lit_llama.errors import BadValue
from lit_llama.files import require_dir
from lit_llama.lora import LoRALinear
from lit_llama.model import LLaMA
from lit_llama.precision import frozen_dtype
from lit_llama.quantize import round_trip
from lit_llama.tokenizer import Tokenizer
from lit_llama.vocab import grow_vocab


class LoRABank:
    """The names a model answers to (`names[0]` its base, then each LoRA), and which of them each row of
    the forward pass in progress uses: `rows` (B,) of indices into `names`, set before each pass."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.rows: Optional[torch.Tensor] = None


def per_row(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (..., C) as (R, N, C), one slice per entry of `rows` (R,): a batch's rows, or, when `rows` has one
    entry, every position of the one sequence being read (x may then be (T, C) or (C,))."""
    return x.reshape(len(rows), -1, x.shape[-1])


class RowLoRALinear(nn.Linear):
    """A frozen linear layer plus, for each row, the low-rank update of that row's LoRA."""

    def __init__(self, base: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, bank: LoRABank) -> None:
        """lora_A (n, R, in) and lora_B (n, out, R), B scaled by alpha / r already: entry i is names[i]'s."""
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight  # shared, not copied (NF4 codes stay NF4)
        self.register_buffer("lora_A", lora_A)
        self.register_buffer("lora_B", lora_B)
        self.bank = bank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.bank.rows
        a, b = self.lora_A[rows], self.lora_B[rows]  # (R, r, in), (R, out, r): each row's pair, gathered
        update = per_row(x, rows) @ a.transpose(1, 2) @ b.transpose(1, 2)  # (R, N, out)
        return F.linear(x, self.weight) + update.view(*x.shape[:-1], -1)


class RowTokenRows(nn.Module):
    """The special tokens' embedding and head rows of each row's LoRA (`TokenRows`, one set per name).
    The base has no row for an id appended to its vocabulary: it never scores one."""

    def __init__(self, ids: torch.Tensor, wte: torch.Tensor, head: torch.Tensor, known: torch.Tensor,
                 bank: LoRABank) -> None:
        """ids (k,); wte and head (n, k, C); known (n, k): whether names[i] has a row for ids[j]."""
        super().__init__()
        for name, tensor in (("ids", ids), ("wte", wte), ("lm_head", head), ("known", known)):
            self.register_buffer(name, tensor)
        self.bank = bank

    def embed(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # idx: (B, T); x: (B, T, C) looked up in the shared table
        match = idx.unsqueeze(-1) == self.ids  # (B, T, k)
        rows = match.to(x.dtype) @ self.wte[self.bank.rows]  # (B, T, k) @ (B, k, C): zero where no id matched
        return torch.where(match.any(-1, keepdim=True), rows, x)

    def head(self, x: torch.Tensor, lm_head: nn.Module, vocab_size: int) -> torch.Tensor:
        # x: (..., C) -> logits (..., vocab_size), the special ids scored by each row's own rows
        rows = self.bank.rows
        logits = lm_head(x)[..., :vocab_size]
        scores = per_row(x, rows) @ self.lm_head[rows].transpose(1, 2)  # (R, N, k)
        scores = scores.masked_fill(~self.known[rows].unsqueeze(1), float("-inf"))
        logits[..., self.ids] = scores.view(*x.shape[:-1], -1).to(logits.dtype)
        return logits


@dataclass
class TrainedLoRA:
    """One LoRA out dir, read: its settings and a model on the meta device holding only its trained weights."""

    out_dir: Path
    hparams: dict
    weights: LLaMA


def named_dirs(values: list[str]) -> dict[str, Path]:
    """`--lora NAME=DIR` values as {name: out dir}, in the order given."""
    named: dict[str, Path] = {}
    for value in values:
        name, sep, out_dir = value.partition("=")
        if not (sep and name and out_dir):
            raise BadValue(f"--lora {value!r}: give NAME=DIR, the model name clients ask for and a finetune/lora.py out dir")
        if name in named:
            raise BadValue(f"--lora {name} is given twice: each LoRA needs a name of its own")
        named[name] = require_dir(Path(out_dir), f"--lora {name}", GIVE_OUT_DIR)
    return named


def load_loras(out_dirs: list[Path], checkpoint_dir: Optional[Path] = None) -> tuple[LLaMA, Tokenizer, list[TrainedLoRA]]:
    """The base (`checkpoint_dir`, or the one the first LoRA names), its LoRAs of `out_dirs`, checked against
    it and against each other, and their shared tokenizer. The base grows to their vocabulary and, for LoRAs
    trained beside a quantized base, holds the weights they learned against (as `load_finetuned` gives them)."""
    settings = [read_hparams(out_dir) for out_dir in out_dirs]
    for out_dir, hparams in zip(out_dirs, settings):  # before the base is loaded
        if hparams["method"] != "lora":
            raise BadValue(f"--lora {out_dir} is a {hparams['method']} fine-tune: --lora takes finetune/lora.py out "
                           f"dirs (serve another alone with --lora_path, --adapter_path or --checkpoint_dir)")
    base_dir = base_dir_of(out_dirs[0], settings[0], checkpoint_dir)
    model = load_model(base_dir)
    loras, tokenizer = [], None
    for out_dir, hparams in zip(out_dirs, settings):
        own = Tokenizer.from_dir(out_dir)
        check_base(model.config, base_dir, out_dir, own)
        if tokenizer is None:
            tokenizer = own
        elif (own.special, own.eot_id, own.roles) != (tokenizer.special, tokenizer.eot_id, tokenizer.roles):
            raise BadValue(f"--lora {out_dir} has other special tokens than {out_dirs[0]} ({describe(own)} against "
                           f"{describe(tokenizer)}): the LoRAs of one server share one vocabulary; serve it alone")
        if loras and trained_beside(hparams) != trained_beside(loras[0].hparams):
            raise BadValue(f"--lora {out_dir} learned beside {trained_beside(hparams)} and {out_dirs[0]} beside "
                           f"{trained_beside(loras[0].hparams)}: they need different base weights; serve them apart")
        with torch.device("meta"):
            weights = LLaMA(model.config)
        grow_vocab(weights, own.vocab_size)
        load_trained(weights, out_dir, hparams, base_dir, assign=True)
        loras.append(TrainedLoRA(out_dir, hparams, weights))
    grow_vocab(model, tokenizer.vocab_size)
    if quantized := loras[0].hparams.get("quantize"):
        round_trip(model, quantized, frozen_dtype(loras[0].hparams["precision"]))
    return model, tokenizer, loras


def trained_beside(hparams: dict) -> str:
    """The base weights a LoRA learned against: as they are, or through its quantization's round trip."""
    return f"a {hparams['quantize']} base quantized from {hparams['precision']}" if hparams.get("quantize") else "the base"


def describe(tokenizer: Tokenizer) -> str:
    return ", ".join(f"{t.content}={t.id}" for t in tokenizer.special) or "none"


@torch.no_grad()
def attach_loras(model: LLaMA, names: list[str], loras: list[TrainedLoRA], base_vocab_size: int) -> LoRABank:
    """Batch `model`'s layers over the base (`names[0]`) and `loras` (the others, in order), placed where
    and in the dtype the model runs: each layer a LoRA adapts becomes a `RowLoRALinear`, and the special
    tokens' rows a `RowTokenRows`. The bank says which each row uses."""
    bank = LoRABank(names)
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    adapted = sorted({name for lora in loras for name, m in lora.weights.named_modules() if isinstance(m, LoRALinear)})
    for name in adapted:
        base = model.get_submodule(name)
        own = [lora.weights.get_submodule(name) for lora in loras]
        rank = max(m.lora_A.shape[0] for m in own if isinstance(m, LoRALinear))
        lora_A = torch.zeros(len(names), rank, base.in_features)  # (n, r, in); entry 0, the base's, stays zero
        lora_B = torch.zeros(len(names), base.out_features, rank)  # (n, out, r)
        for i, m in enumerate(own, start=1):
            if isinstance(m, LoRALinear):
                lora_A[i, : m.lora_A.shape[0]] = m.lora_A.float()
                lora_B[i, :, : m.lora_A.shape[0]] = m.block_b().float() * m.scaling
        model.set_submodule(name, RowLoRALinear(base, lora_A.to(device, dtype), lora_B.to(device, dtype), bank))
    ids = loras[0].weights.token_rows.ids.to(device)
    own_wte = [model.transformer.wte.weight[ids]] + [lora.weights.token_rows.wte for lora in loras]
    own_head = [model.lm_head.weight[ids]] + [lora.weights.token_rows.lm_head for lora in loras]
    known = torch.ones(len(names), len(ids), dtype=torch.bool, device=device)  # (n, k)
    known[0] = ids < base_vocab_size
    model.token_rows = RowTokenRows(ids, torch.stack([w.to(device, dtype) for w in own_wte]),  # (n, k, C)
                                    torch.stack([h.to(device, dtype) for h in own_head]), known, bank)
    return bank
