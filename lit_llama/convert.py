"""Hugging Face and Meta checkpoints into our checkpoint dirs (lit_llama/export.py writes ours back out).

Tensors are read lazily (safetensors' `safe_open`, memory-mapped `torch.load`), renamed one at a time
and q/k/v fused per block as soon as a block's three are in, so converting needs about one copy of
the weights in memory, not two (casting to another dtype: the converted copy plus the shard being read).

Hugging Face checkpoints already use our rotary layout (rotate-half). Meta's original checkpoints
rotate interleaved pairs, so their q and k rows are reordered (`interleaved_to_half`).
"""

import json
import re
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Optional

import torch
from safetensors import safe_open
from tqdm import tqdm

from lit_llama.checkpoint import load_state_dict, save_checkpoint_dir
from lit_llama.errors import BadValue, MissingFile, file_error
from lit_llama.files import check_writable, require_dir, require_file
from lit_llama.model import LLaMA, LLaMAConfig, configs, find_multiple
from lit_llama.tokenizer import MODEL_FILE as TOKENIZER_FILE
from lit_llama.tokenizer import Tokenizer

DType = Literal["float32", "bfloat16", "float16"]
HF_CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class Layout:
    """How a checkpoint format names the weights: `top` outside the blocks; `block` inside block i,
    whose names start with `block_prefix` + "{i}."; `qkv`: the block names fused, in this order, into
    our `attn.c_attn.weight`."""

    top: dict[str, str]
    block_prefix: str
    block: dict[str, str]
    qkv: tuple[str, str, str]

    def rename(self, name: str) -> tuple[str, Optional[int]]:
        """Our name for `name`, and its place in c_attn (0 q, 1 k, 2 v) or None."""
        if name in self.top:
            return self.top[name], None
        match = re.fullmatch(re.escape(self.block_prefix) + r"(\d+)\.(.+)", name)
        if match is None or match[2] not in self.block:
            raise BadValue(f"unexpected tensor {name!r}: not part of a Llama/Mistral checkpoint")
        i, suffix = match.groups()
        return f"transformer.h.{i}.{self.block[suffix]}", self.qkv.index(suffix) if suffix in self.qkv else None


# (ours, Hugging Face's, Meta's) name of each weight outside the blocks
TOP_NAMES = (
    ("transformer.wte.weight", "model.embed_tokens.weight", "tok_embeddings.weight"),
    ("transformer.ln_f.weight", "model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight", "output.weight"),
)
# and inside a block; q, k and v (the first three) fuse into our c_attn
BLOCK_NAMES = (
    ("attn.c_attn.weight", "self_attn.q_proj.weight", "attention.wq.weight"),
    ("attn.c_attn.weight", "self_attn.k_proj.weight", "attention.wk.weight"),
    ("attn.c_attn.weight", "self_attn.v_proj.weight", "attention.wv.weight"),
    ("attn.c_proj.weight", "self_attn.o_proj.weight", "attention.wo.weight"),
    ("mlp.c_fc1.weight", "mlp.gate_proj.weight", "feed_forward.w1.weight"),
    ("mlp.c_fc2.weight", "mlp.up_proj.weight", "feed_forward.w3.weight"),
    ("mlp.c_proj.weight", "mlp.down_proj.weight", "feed_forward.w2.weight"),
    ("rms_1.weight", "input_layernorm.weight", "attention_norm.weight"),
    ("rms_2.weight", "post_attention_layernorm.weight", "ffn_norm.weight"),
)


def names_in(column: int, block_prefix: str) -> Layout:
    """The layout whose names are `column` of TOP_NAMES and BLOCK_NAMES (1 Hugging Face's, 2 Meta's)."""
    return Layout(top={row[column]: row[0] for row in TOP_NAMES}, block_prefix=block_prefix,
                  block={row[column]: row[0] for row in BLOCK_NAMES},
                  qkv=tuple(row[column] for row in BLOCK_NAMES[:3]))


HF = names_in(1, block_prefix="model.layers.")
META = names_in(2, block_prefix="layers.")
# rotary frequencies some checkpoints store; our model computes them
SKIPPED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|rope\.freqs")
# Meta's model-parallel shards split these along dim 1 (the rest of the matrices along dim 0)
META_SPLIT_DIM1 = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")


def torch_dtype(dtype: Optional[DType]) -> Optional[torch.dtype]:
    return None if dtype is None else getattr(torch, dtype)


def config_name(config: LLaMAConfig, ignore_block_size: bool = False) -> Optional[str]:
    """The name of the named config that `config` equals, if any."""
    for name in configs:
        named = LLaMAConfig.from_name(name)
        if (replace(named, block_size=config.block_size) if ignore_block_size else named) == config:
            return name
    return None


def vocab_sizes(rows: int, tokenizer: Tokenizer, source: Path) -> dict[str, int]:
    """vocab_size and padded_vocab_size for a checkpoint with `rows` embedding rows. Rows beyond the
    tokenizer's ids (some checkpoints round the table up) are kept, as padding."""
    if tokenizer.vocab_size > rows:
        raise BadValue(f"{source}: the weights have {rows} token rows but tokenizer.model has {tokenizer.vocab_size} "
                       "ids; the tokenizer does not belong to this checkpoint")
    if tokenizer.vocab_size < rows:
        print(f"note: {rows} token rows but {tokenizer.vocab_size} tokenizer ids: the extra rows are kept as padding")
    return dict(vocab_size=tokenizer.vocab_size, padded_vocab_size=find_multiple(rows, 64))


def required(config: dict, field: str, source: Path) -> Any:
    if field not in config:
        raise BadValue(f"{source} has no {field!r}: it is not the config of a Llama or Mistral model")
    return config[field]


def config_from_hf(hf: dict, tokenizer: Tokenizer, source: Path) -> LLaMAConfig:
    """Our config for a Hugging Face config.json (`hf`); refuses what our model does not implement."""
    get = partial(required, hf, source=source)

    def refuse(field: str, value: object, why: str) -> None:
        raise BadValue(f"{source}: {field}={value!r} is not supported ({why})")

    if get("model_type") not in ("llama", "mistral"):
        refuse("model_type", hf["model_type"], "this converter reads Llama and Mistral checkpoints")
    if hf.get("rope_scaling"):
        refuse("rope_scaling", hf["rope_scaling"], "our model implements plain RoPE only")
    rope = hf.get("rope_parameters") or {}  # where transformers 5 writes rope_theta and the scaling type
    if rope.get("rope_type", "default") != "default":
        refuse("rope_parameters", rope, "our model implements plain RoPE only")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", hf["hidden_act"], "our MLP is SwiGLU with silu")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            refuse(field, hf[field], "our linear layers have no bias")
    n_embd, n_head = get("hidden_size"), get("num_attention_heads")
    if hf.get("head_dim") not in (None, n_embd // n_head):
        refuse("head_dim", hf["head_dim"], f"our head size is hidden_size / num_attention_heads = {n_embd // n_head}")
    block_size = get("max_position_embeddings")
    window = hf.get("sliding_window")
    if window is not None and window < block_size:
        # the window is the whole context for sequences up to its length
        print(f"note: sliding_window={window} < max_position_embeddings={block_size}: block_size set to {window}")
        block_size = window
    return LLaMAConfig(
        block_size=block_size,
        **vocab_sizes(get("vocab_size"), tokenizer, source),
        n_layer=get("num_hidden_layers"),
        n_head=n_head,
        n_embd=n_embd,
        n_query_groups=hf.get("num_key_value_heads") or n_head,
        intermediate_size=get("intermediate_size"),
        norm_eps=get("rms_norm_eps"),
        rope_base=hf.get("rope_theta") or rope.get("rope_theta", 10000.0),
    )


def config_from_meta(params: dict, tokenizer: Tokenizer, source: Path) -> LLaMAConfig:
    """Our config for Meta's params.json. Its block size is the one of the named config it matches
    (Meta's params do not record it), else our default."""
    if params.get("use_scaled_rope"):
        raise BadValue(f"{source}: use_scaled_rope=True is not supported (our model implements plain RoPE only)")
    get = partial(required, params, source=source)
    dim, n_head = get("dim"), get("n_heads")
    hidden = int(2 * 4 * dim / 3)  # Meta's FeedForward sizing
    if params.get("ffn_dim_multiplier"):
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    rows = params.get("vocab_size", -1)
    config = LLaMAConfig(
        **vocab_sizes(rows if rows > 0 else tokenizer.vocab_size, tokenizer, source),
        n_layer=get("n_layers"),
        n_head=n_head,
        n_embd=dim,
        n_query_groups=params.get("n_kv_heads") or n_head,
        intermediate_size=find_multiple(hidden, get("multiple_of")),
        norm_eps=get("norm_eps"),
        rope_base=params.get("rope_theta", 10000.0),
    )
    name = config_name(config, ignore_block_size=True)
    return config if name is None else replace(config, block_size=LLaMAConfig.from_name(name).block_size)


def interleaved_to_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of Meta's wq/wk, head by head, from rotating pairs (0, 1), (2, 3), ... to
    rotating pairs (j, j + head_size/2): row 2j goes to j and row 2j+1 to head_size/2 + j."""
    rows, cols = weight.shape
    head_size = rows // n_heads
    return weight.view(n_heads, head_size // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def assemble(tensors: Iterable[tuple[str, torch.Tensor]], total: int, layout: Layout,
             dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """Our state dict from (name in `layout`, tensor) pairs: renamed, cast, q/k/v fused per block as
    soon as its three are in (so the parts are dropped early)."""
    state, pending = {}, {}
    for name, tensor in tqdm(tensors, total=total, desc="converting", unit="tensor"):
        if SKIPPED.fullmatch(name):
            continue
        ours, part = layout.rename(name)
        tensor = tensor if dtype is None else tensor.to(dtype)
        if part is None:
            state[ours] = tensor
            continue
        parts = pending.setdefault(ours, {})
        parts[part] = tensor
        if len(parts) == 3:
            state[ours] = torch.cat([parts[0], parts[1], parts[2]])
            del pending[ours]
    if pending:
        raise BadValue(f"q, k or v missing for {', '.join(sorted(pending))}")
    return state


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] == rows:
        return weight
    padded = torch.zeros(rows, weight.shape[1], dtype=weight.dtype)
    padded[: weight.shape[0]] = weight
    return padded


def fit_to_config(state: dict[str, torch.Tensor], config: LLaMAConfig, tie_word_embeddings: bool,
                  source: Path) -> LLaMA:
    """The model of `state`: token rows padded to padded_vocab_size, every name and shape checked
    against `config`, built on the meta device and given `state`'s tensors as parameters (no copy)."""
    state["transformer.wte.weight"] = pad_rows(state["transformer.wte.weight"], config.padded_vocab_size)
    if "lm_head.weight" in state:
        state["lm_head.weight"] = pad_rows(state["lm_head.weight"], config.padded_vocab_size)
    elif tie_word_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"].clone()  # a copy: fine-tuning may untie them
    with torch.device("meta"):
        model = LLaMA(config)
    expected = model.state_dict()
    problems = [f"missing {n}" for n in expected if n not in state]
    problems += [f"unexpected {n}" for n in state if n not in expected]
    problems += [f"{n} has shape {tuple(state[n].shape)}, expected {tuple(t.shape)}"
                 for n, t in expected.items() if n in state and state[n].shape != t.shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BadValue(f"{source}: the weights do not fit the config: {'; '.join(problems[:3])}{more}")
    model.load_state_dict(state, assign=True)
    return model


def save_converted(model: LLaMA, tokenizer: Tokenizer, output_dir: Path) -> None:
    save_checkpoint_dir(model, tokenizer, output_dir)
    name = config_name(model.config)
    n_params = sum(p.numel() for p in model.parameters())
    dtype = model.lm_head.weight.dtype
    print(f"wrote {output_dir}: {n_params / 1e6:.1f}M parameters in {dtype}"
          + (f", the named config {name!r}" if name else ""))


def read_json(path: Path) -> dict:
    """A config file of a download; a damaged one is named in one line."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:  # there but unreadable (permissions)
        raise file_error(e, str(path)) from None
    except ValueError as e:  # invalid JSON or UTF-8
        raise BadValue(f"{path} is not valid JSON ({e}); download it again") from None


def hf_weight_loaders(checkpoint_dir: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> loader of every tensor of a Hugging Face checkpoint (safetensors preferred over .bin,
    sharded or not). Nothing is read until a loader is called."""
    for weights, index in (("model.safetensors", "model.safetensors.index.json"),
                           ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (checkpoint_dir / index).is_file():
            weight_map = read_json(checkpoint_dir / index)["weight_map"]
            files = [checkpoint_dir / f for f in sorted(set(weight_map.values()))]
            break
        if (checkpoint_dir / weights).is_file():
            files = [checkpoint_dir / weights]
            break
    else:
        raise MissingFile(f"no weights in {checkpoint_dir}: expected model.safetensors, pytorch_model.bin or "
                          "a sharded checkpoint's *.index.json; download them with the config")
    loaders = {}
    for path in files:
        require_file(path, "a shard named in the checkpoint's index is missing; download it too")
        if path.suffix == ".safetensors":
            handle = safe_open(str(path), framework="pt")
            loaders.update({name: partial(handle.get_tensor, name) for name in handle.keys()})
        else:
            shard = load_state_dict(path)
            loaders.update({name: partial(shard.pop, name) for name in shard})
    return loaders


def convert_hf_checkpoint(checkpoint_dir: Path, output_dir: Path, dtype: Optional[DType] = None) -> None:
    """Convert a Hugging Face Llama/Mistral checkpoint dir (config.json, weights, tokenizer.model) into
    our checkpoint dir. `dtype` casts the weights; None keeps the checkpoint's."""
    checkpoint_dir = require_dir(checkpoint_dir, "--checkpoint_dir", "give the Hugging Face model dir as downloaded "
                                 "(see howto/download_weights.md)")
    config_path = require_file(checkpoint_dir / HF_CONFIG_FILE, "is this a Hugging Face model dir? "
                               "Download the model's files, config.json included (see howto/download_weights.md)")
    require_file(checkpoint_dir / TOKENIZER_FILE, "download the model's sentencepiece tokenizer.model too")
    hf = read_json(config_path)
    tokenizer = Tokenizer.from_dir(checkpoint_dir)
    config = config_from_hf(hf, tokenizer, config_path)
    loaders = hf_weight_loaders(checkpoint_dir)
    check_writable(output_dir, 0, "--output_dir")  # before the slow part
    total = len(loaders)
    tensors = ((name, loaders.pop(name)()) for name in list(loaders))  # pop: a tensor is read once, then let go
    state = assemble(tensors, total, HF, torch_dtype(dtype))
    model = fit_to_config(state, config, hf.get("tie_word_embeddings", False), checkpoint_dir)
    save_converted(model, tokenizer, Path(output_dir))


def merge_meta_shards(shards: list[dict[str, torch.Tensor]], config: LLaMAConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) from Meta's model-parallel shards, q and k in the rotate-half layout."""
    for name in list(shards[0]):
        pieces = [shard.pop(name) for shard in shards]
        if len(pieces) == 1 or pieces[0].dim() == 1:  # norms are replicated
            tensor = pieces[0]
        else:
            tensor = torch.cat(pieces, dim=1 if name.endswith(META_SPLIT_DIM1) else 0)
        if name.endswith("attention.wq.weight"):
            tensor = interleaved_to_half(tensor, config.n_head)
        elif name.endswith("attention.wk.weight"):
            tensor = interleaved_to_half(tensor, config.n_query_groups)
        yield name, tensor


def convert_meta_checkpoint(checkpoint_dir: Path, output_dir: Path, tokenizer_path: Optional[Path] = None,
                            dtype: Optional[DType] = None) -> None:
    """Convert a checkpoint in Meta's original layout (params.json, consolidated.NN.pth) into our
    checkpoint dir. The tokenizer is `tokenizer_path`, else tokenizer.model in the dir or its parent."""
    checkpoint_dir = require_dir(checkpoint_dir, "--checkpoint_dir", "give one model folder of Meta's download "
                                 "(the one with params.json and consolidated.00.pth)")
    params_path = require_file(checkpoint_dir / "params.json", "point --checkpoint_dir at one model of Meta's "
                               "download (the folder with params.json and consolidated.00.pth)")
    shard_paths = sorted(checkpoint_dir.glob("consolidated.*.pth"))
    if not shard_paths:
        raise MissingFile(f"no consolidated.*.pth in {checkpoint_dir}: the weights are missing")
    if tokenizer_path is None:
        candidates = [checkpoint_dir / TOKENIZER_FILE, checkpoint_dir.parent / TOKENIZER_FILE]
        tokenizer_path = next((p for p in candidates if p.is_file()), candidates[0])
    tokenizer = Tokenizer(require_file(tokenizer_path, "pass --tokenizer_path, Meta's download has it next to "
                                       "the model folders").read_bytes())
    config = config_from_meta(read_json(params_path), tokenizer, params_path)
    check_writable(output_dir, 0, "--output_dir")  # before the slow part
    shards = [load_state_dict(path) for path in shard_paths]
    state = assemble(merge_meta_shards(shards, config), len(shards[0]), META, torch_dtype(dtype))
    model = fit_to_config(state, config, tie_word_embeddings=False, source=checkpoint_dir)
    save_converted(model, tokenizer, Path(output_dir))
