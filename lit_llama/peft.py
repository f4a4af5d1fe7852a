"""A LoRA out dir in PEFT's adapter format, unmerged: `adapter_config.json` and
`adapter_model.safetensors` in Hugging Face's module names, which transformers with PEFT, vLLM
(`--enable-lora`) and llama.cpp (`convert_lora_to_gguf.py`) read beside the base model.

The special tokens' trained rows travel as LoRA too. A row that differs from the base's is a rank-1
change of its matrix, so the k rows of the special tokens are a rank-k LoRA on `embed_tokens` and
`lm_head`, padded to the adapter's rank (one rank and one alpha for every module: what both engines
take). That holds only where the base has the rows: a repurposed end-of-turn token. An appended one
grows the vocabulary, which no adapter carries: such a fine-tune is merged and served whole.
"""

import re
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from lit_llama.checkpoint import CONFIG_FILE, read_config, read_hparams, read_weights
from lit_llama.convert import HF
from lit_llama.errors import BadValue
from lit_llama.export import hf_tokenizer_files
from lit_llama.files import check_writable, require_file, write_json, write_with
from lit_llama.lora import LoRAConfig
from lit_llama.methods import method_of
from lit_llama.model import LLaMAConfig
from lit_llama.tokenizer import Tokenizer

PREFIX = "base_model.model."  # PEFT's names: the wrapped model's, below its own
HF_EMBED = next(name for name, ours in HF.top.items() if ours == "transformer.wte.weight").removesuffix(".weight")
MERGE = "merge it (scripts/merge_lora.py) and serve the merged checkpoint, or fine-tune with a repurposed one " \
        "(prepare with --repurpose_eot)"


def block_modules(config: LLaMAConfig, lora: LoRAConfig) -> dict[str, list[tuple[str, int, int]]]:
    """Our LoRA modules of a block -> [(HF module, row start, rows)]: c_attn's enabled chunks, in its order."""
    hf = {ours.removesuffix(".weight"): name.removesuffix(".weight") for name, ours in HF.block.items()}
    kv = config.n_query_groups * config.head_size
    chunks = [("self_attn.q_proj", config.n_embd, lora.query), ("self_attn.k_proj", kv, lora.key),
              ("self_attn.v_proj", kv, lora.value)]
    enabled, start = [], 0
    for name, size, on in chunks:
        if on:
            enabled.append((name, start, size))
            start += size
    out = {"attn.c_attn": enabled}
    for ours in ("attn.c_proj", "mlp.c_fc1", "mlp.c_fc2", "mlp.c_proj"):
        out[ours] = [(hf[ours], 0, -1)]
    return out


def lora_tensors(trained: dict[str, torch.Tensor], config: LLaMAConfig, lora: LoRAConfig) -> dict[str, torch.Tensor]:
    """The blocks' LoRA pairs in PEFT's names: c_attn's stacked A blocks and B rows cut per q, k and v."""
    modules, r, out = block_modules(config, lora), lora.r, {}
    for name, tensor in trained.items():
        match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)\.lora_([AB])", name)
        if match is None:
            continue
        i, ours, which = match.groups()
        for j, (hf_name, start, rows) in enumerate(modules[ours]):
            key = f"{PREFIX}{HF.block_prefix}{i}.{hf_name}.lora_{which}.weight"
            if which == "A":  # (r * chunks, in): chunk j's block
                out[key] = tensor[j * r : (j + 1) * r]
            else:  # (rows of the enabled chunks, r)
                out[key] = tensor if rows < 0 else tensor[start : start + rows]  # B rows of the chunks before: start
    return out


def token_row_tensors(trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor], lora: LoRAConfig,
                      vocab_size: int) -> dict[str, torch.Tensor]:
    """The special tokens' rows as rank-k changes of embed_tokens and lm_head, padded to rank r: the
    j-th token's change is B's column j, picked by A's one-hot row j (embedding), or A's row j, placed
    by B's one-hot column j (head); each divided by the scaling PEFT multiplies back."""
    ids = trained["token_rows.ids"].tolist()
    if len(ids) > lora.r:
        raise BadValue(f"{len(ids)} special tokens need a LoRA rank of at least {len(ids)} (r is {lora.r}): {MERGE}")
    scale = lora.alpha / lora.r  # PEFT's scaling, applied to every module alike
    wte_delta = trained["token_rows.wte"].float() - base["transformer.wte.weight"][ids].float()  # (k, C)
    head_delta = trained["token_rows.lm_head"].float() - base["lm_head.weight"][ids].float()  # (k, C)
    n_embd = wte_delta.shape[1]
    embed_a, embed_b = torch.zeros(lora.r, vocab_size), torch.zeros(n_embd, lora.r)
    head_a, head_b = torch.zeros(lora.r, n_embd), torch.zeros(vocab_size, lora.r)
    for j, token in enumerate(ids):
        embed_a[j, token], embed_b[:, j] = 1.0, wte_delta[j] / scale  # row token of (B A)^T: wte_delta[j]
        head_a[j], head_b[token, j] = head_delta[j] / scale, 1.0  # row token of B A: head_delta[j]
    embed, head = f"{PREFIX}{HF_EMBED}", f"{PREFIX}lm_head"
    return {f"{embed}.lora_embedding_A": embed_a, f"{embed}.lora_embedding_B": embed_b,
            f"{head}.lora_A.weight": head_a, f"{head}.lora_B.weight": head_b}



def adapter_config(tensors: dict[str, torch.Tensor], lora: LoRAConfig, base_model: Optional[str]) -> dict:
    """PEFT's LoraConfig for `tensors`: its target modules are the names their LoRA pairs sit on."""
    targets = sorted({name.removeprefix(PREFIX).split(".lora_")[0].split(".")[-1] for name in tensors})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": lora.r,
            "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": targets, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "inference_mode": True}


def export_peft(lora_path: Path, output_dir: Path, base_model: Optional[str] = None,
                checkpoint_dir: Optional[Path] = None) -> None:
    """Write the LoRA out dir `lora_path` as a PEFT adapter in `output_dir`, for the base checkpoint it
    was trained on (or `checkpoint_dir`), named `base_model` in the config (default: that dir)."""
    hparams = read_hparams(lora_path)
    if hparams["method"] != "lora":
        raise BadValue(f"{lora_path} is a {hparams['method']} fine-tune: only a LoRA exports as a PEFT adapter")
    method = method_of("lora")
    lora = method.config(**hparams["lora"])
    if lora.head:
        raise BadValue(f"{lora_path} trained a LoRA on the head, beside the special tokens' rows there: {MERGE}")
    config = read_config(Path(lora_path) / CONFIG_FILE, "the out dir has no model config")
    tokenizer = Tokenizer.from_dir(lora_path)
    appended = [t.content for t in tokenizer.special if t.mode == "appended"]
    if appended:
        raise BadValue(f"{lora_path} appended {', '.join(appended)} to the vocabulary, which no adapter carries: {MERGE}")
    trained = torch.load(require_file(Path(lora_path) / method.weights_file, "the out dir has no trained weights"),
                         map_location="cpu", weights_only=True)
    base_dir = Path(checkpoint_dir or hparams["checkpoint_dir"])
    check_writable(output_dir, 0, "--output_dir")
    tensors = lora_tensors(trained, config, lora)
    rows = "token_rows.ids" in trained and len(trained["token_rows.ids"]) > 0
    if rows:
        base = read_weights(base_dir, ["transformer.wte.weight", "lm_head.weight"])
        tensors.update(token_row_tensors(trained, base, lora, config.vocab_size))
    tensors = {name: t.detach().float().contiguous() for name, t in tensors.items()}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_with(output_dir / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    settings = adapter_config(tensors, lora, base_model or str(base_dir))
    write_json(settings, output_dir / "adapter_config.json")
    tokenizer.save(output_dir)  # the fine-tune's tokenizer: the end-of-turn token named, which engines stop on
    for name, content in hf_tokenizer_files(tokenizer, config.block_size).items():
        write_json(content, output_dir / name)
    print(f"wrote {output_dir}: LoRA r={lora.r} on {', '.join(settings['target_modules'])}")
