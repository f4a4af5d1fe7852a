"""PEFT's LoRA adapter format, out and in: `adapter_config.json` and `adapter_model.safetensors` in
Hugging Face's module names, which transformers with PEFT, vLLM (`--enable-lora`) and llama.cpp
(`convert_lora_to_gguf.py`) read beside the base model.

    export_peft(lora_path, output_dir)              a LoRA out dir as an adapter, unmerged
    import_peft(adapter_dir, checkpoint_dir, out)   an adapter for a Llama model as a LoRA out dir

The special tokens' trained rows travel as LoRA too. A row that differs from the base's is a rank-1
change of its matrix, so the k rows of the special tokens are a rank-k LoRA on `embed_tokens` and
`lm_head`, padded to the adapter's rank (one rank and one alpha for every module: what both engines
take). That holds only where the base has the rows: a repurposed end-of-turn token. An appended one
grows the vocabulary, which no adapter carries: such a fine-tune is merged and served whole.
"""

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from lit_llama.checkpoint import (CONFIG_FILE, HPARAMS_FILE, base_dir_of, load_state_dict, read_config, read_hparams,
                                  read_weights)
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
    trained = load_state_dict(require_file(Path(lora_path) / method.weights_file, "the out dir has no trained weights"))
    base_dir = Path(checkpoint_dir or hparams["checkpoint_dir"])
    check_writable(output_dir, 0, "--output_dir")
    tensors = lora_tensors(trained, config, lora)
    rows = "token_rows.ids" in trained and len(trained["token_rows.ids"]) > 0
    if rows:
        base = read_weights(base_dir_of(lora_path, hparams, checkpoint_dir), ["transformer.wte.weight", "lm_head.weight"])
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


def pairs_of(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """An adapter's tensors by module (its Hugging Face name) and kind: A, B (a linear layer's) or
    embedding_A, embedding_B (an embedding's)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.endswith(".base_layer.weight"):  # a copy of a base matrix PEFT saves beside its LoRA (`same_as_base`)
            continue
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_(A|B|embedding_A|embedding_B)(?:\.weight)?", name)
        if match is None:
            raise BadValue(f"the adapter holds {name!r}, which is not a LoRA matrix (only LoRA pairs import)")
        pairs.setdefault(match[1], {})[match[2]] = tensor.float()
    return pairs


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter's settings and tensors; a kind of adapter our LoRA cannot hold is refused in one line."""
    settings = json.loads(require_file(Path(adapter_dir) / "adapter_config.json", "is this a PEFT adapter dir?").read_text())
    unsupported = {"peft_type": settings.get("peft_type") != "LORA", "use_dora": settings.get("use_dora"),
                   "use_rslora": settings.get("use_rslora"), "rank_pattern": settings.get("rank_pattern"),
                   "alpha_pattern": settings.get("alpha_pattern"), "modules_to_save": settings.get("modules_to_save"),
                   "fan_in_fan_out": settings.get("fan_in_fan_out"), "bias": settings.get("bias", "none") != "none"}
    refused = [name for name, on in unsupported.items() if on]
    if refused:
        raise BadValue(f"{adapter_dir}: {', '.join(f'{n}={settings.get(n)!r}' for n in refused)} is not a plain LoRA; "
                       "only those import (one rank and alpha, no DoRA or rsLoRA, no whole modules saved)")
    weights = require_file(Path(adapter_dir) / "adapter_model.safetensors", "is this a PEFT adapter dir?")
    return settings, load_file(weights)


def same_as_base(tensors: dict[str, torch.Tensor], base_dir: Path) -> None:
    """The base matrices an adapter saved (PEFT saves lm_head and embed_tokens beside their LoRA) must be
    the base's: an adapter trained on a resized or changed vocabulary is refused."""
    saved = {}
    for name, tensor in tensors.items():
        if name.endswith(".base_layer.weight"):
            hf = name.removeprefix(PREFIX).replace(".base_layer", "")
            if hf not in HF.top:
                raise BadValue(f"the adapter carries its own {hf}: merge it with PEFT and convert the merged model instead")
            saved[HF.top[hf]] = tensor
    base = read_weights(base_dir, list(saved)) if saved else {}
    for name, tensor in saved.items():
        if tensor.shape != base[name].shape or not torch.allclose(tensor.float(), base[name].float(), atol=1e-6):
            raise BadValue(f"the adapter carries its own {name}, not the base's: merge it with PEFT and convert the "
                           "merged model instead")


def fused_lora(pairs: dict, config: LLaMAConfig, lora: LoRAConfig) -> dict[str, torch.Tensor]:
    """Our blocks' LoRA parameters from the adapter's pairs: q, k and v stacked into c_attn's."""
    trained = {}
    for i in range(config.n_layer):
        for ours, chunks in block_modules(config, lora).items():
            found = [pairs.get(f"{HF.block_prefix}{i}.{hf}") for hf, _, _ in chunks]
            if not chunks or not all(found):
                continue
            trained[f"transformer.h.{i}.{ours}.lora_A"] = torch.cat([p["A"] for p in found])
            trained[f"transformer.h.{i}.{ours}.lora_B"] = torch.cat([p["B"] for p in found])
    return trained


def vocab_rows(pairs: dict, base_dir: Path, ids: list[int], scale: float) -> dict[str, torch.Tensor]:
    """The special tokens' rows from LoRA pairs on embed_tokens and lm_head (export_peft's): the base's
    rows plus the change; a pair that changes any other row is refused."""
    base = read_weights(base_dir, ["transformer.wte.weight", "lm_head.weight"])
    embed, head = pairs.pop(HF_EMBED), pairs.pop("lm_head")
    touched = set(embed["embedding_A"].abs().sum(0).nonzero().flatten().tolist())
    touched |= set(head["B"].abs().sum(1).nonzero().flatten().tolist())
    if not touched <= set(ids):
        raise BadValue("the adapter's LoRA on embed_tokens or lm_head changes rows of ordinary tokens, which a "
                       "LoRA here cannot hold: merge it with PEFT and convert the merged model instead")
    index = torch.tensor(ids)
    wte = (embed["embedding_B"] @ embed["embedding_A"][:, index]).T * scale  # (k, C)
    lm_head = (head["B"][index] @ head["A"]) * scale  # (k, C)
    return {"token_rows.ids": index, "token_rows.wte": base["transformer.wte.weight"][index].float() + wte,
            "token_rows.lm_head": base["lm_head.weight"][index].float() + lm_head}


def import_peft(adapter_dir: Path, checkpoint_dir: Path, out_dir: Path) -> None:
    """Write the PEFT LoRA adapter in `adapter_dir`, trained on the Llama model of our `checkpoint_dir`,
    as a finetune/lora.py out dir (generate, chat, serve and merge read it). Special tokens come along
    when the adapter dir holds our special_tokens.json (an adapter export_peft wrote)."""
    settings, tensors = read_adapter(adapter_dir)
    same_as_base(tensors, Path(checkpoint_dir))
    pairs = pairs_of(tensors)
    config = read_config(Path(checkpoint_dir) / CONFIG_FILE, "is --checkpoint_dir a checkpoint dir of this repo?")
    has = lambda hf: f"{HF.block_prefix}0.{hf}" in pairs  # noqa: E731
    mlp = [has(m) for m in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    if any(mlp) and not all(mlp):
        raise BadValue(f"{adapter_dir} adapts some of gate_proj, up_proj and down_proj: a LoRA here adapts all three or none")
    special = (Path(adapter_dir) / "special_tokens.json").is_file()
    if HF_EMBED in pairs and not special:
        raise BadValue(f"{adapter_dir} adapts embed_tokens, which a LoRA here does not: merge it with PEFT and "
                       "convert the merged model instead")
    tokenizer = Tokenizer.from_dir(adapter_dir if special else checkpoint_dir)
    lora = LoRAConfig(r=settings["r"], alpha=settings["lora_alpha"], dropout=settings.get("lora_dropout", 0.0),
                      query=has("self_attn.q_proj"), key=has("self_attn.k_proj"), value=has("self_attn.v_proj"),
                      projection=has("self_attn.o_proj"), mlp=all(mlp), head="lm_head" in pairs and not special)
    trained = fused_lora(pairs, config, lora)
    ids = [t.id for t in tokenizer.special]
    if special and HF_EMBED in pairs:
        trained.update(vocab_rows(pairs, Path(checkpoint_dir), ids, lora.alpha / lora.r))
    else:
        trained.update({"token_rows.ids": torch.zeros(0, dtype=torch.long),
                        "token_rows.wte": torch.zeros(0, config.n_embd), "token_rows.lm_head": torch.zeros(0, config.n_embd)})
    if lora.head:
        trained["lm_head.lora_A"], trained["lm_head.lora_B"] = pairs["lm_head"]["A"], pairs["lm_head"]["B"]
    out_dir = Path(out_dir)
    check_writable(out_dir, 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    method = method_of("lora")
    write_with(out_dir / method.weights_file, lambda tmp: torch.save(trained, tmp))
    config.save(out_dir / CONFIG_FILE)
    tokenizer.save(out_dir)
    write_json({"method": "lora", "checkpoint_dir": str(Path(checkpoint_dir).resolve()), "lora": asdict(lora),
                "precision": None, "quantize": None, "imported_from": str(Path(adapter_dir).resolve())},
               out_dir / HPARAMS_FILE)
    print(f"wrote {out_dir}: LoRA r={lora.r}, alpha {lora.alpha}, from {adapter_dir}")
