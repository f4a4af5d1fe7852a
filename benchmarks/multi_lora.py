"""Several LoRAs in one continuous batch (generate/serve.py --lora): reply tokens/s with the rows of one
batch spread over 4 LoRAs, against 1 LoRA at the same batch size, and against PEFT's mixed-adapter
batches in transformers' `generate` at the same shapes.

Each variant runs in its own process, greedy, over batch_decode.py's LIMA-like workload (prompts of
different lengths, each reply ending at its own limit):

- merged: one LoRA merged into the base, as `generate/serve.py --lora_path` serves a LoRA alone;
- bank, 1 LoRA: every row on the same LoRA through the per-row gather of `--lora` (lit_llama/multi_lora.py);
- bank, 4 LoRAs: prompt i on LoRA i % 4, so every batch mixes them;
- PEFT, 4 LoRAs: transformers `generate` over padded batches with `adapter_names` per row (PEFT's
  mixed-batch inference), LoRAs of the same rank on the same layers.

The LoRAs are random (rank `--r` on q and v, an end-of-turn row of their own); ours and PEFT's hold
different random values, so only the speed compares across them. The replies of "bank, 1 LoRA" are
checked against "merged".

    python benchmarks/multi_lora.py --size 30M
"""

import time
from pathlib import Path
from typing import Optional

import torch

from batch_decode import padded_generate, workload
from common import BASE_VOCAB, SEED, build_hf, build_ours, environment, model_config, ratio, report, run_worker, setup, table
from lit_llama.cli import run
from lit_llama.decoder import Decoder
from lit_llama.generate import ContinuousBatch, Request
from lit_llama.lora import LoRAConfig, inject_lora, merge_lora
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.multi_lora import TrainedLoRA, attach_loras
from lit_llama.vocab import TokenRows, merge_token_rows

VARIANTS = ("merged", "bank1", "bank4", "peft4")


def random_lora(config: LLaMAConfig, r: int, seed: int) -> TrainedLoRA:
    """A LoRA on q and v with random matrices and a random end-of-turn row (the last id), as `load_loras` reads one."""
    with torch.device("meta"):
        weights = LLaMA(config)
    inject_lora(weights, LoRAConfig(r=r, alpha=2 * r))
    generator = torch.Generator().manual_seed(seed)
    for name, param in weights.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.02
    rows = [torch.randn(1, config.n_embd, generator=generator) * 0.02 for _ in range(2)]
    weights.token_rows = TokenRows(torch.tensor([BASE_VOCAB]), *rows)
    return TrainedLoRA(Path(f"lora{seed}"), {"method": "lora"}, weights)


def merged_into(model: LLaMA, lora: TrainedLoRA) -> LLaMA:
    """The base with `lora` merged, as `load_finetuned` gives a LoRA served alone."""
    for name, module in lora.weights.named_modules():
        if hasattr(module, "lora_A"):
            module.weight = model.get_submodule(name).weight
            model.set_submodule(name, module)
    model.token_rows = lora.weights.token_rows
    merge_lora(model)
    merge_token_rows(model)
    return model


def decode_ours(variant: str, size: str, r: int, batch_size: int, prompts: list, limits: list) -> list[list[int]]:
    config = model_config(size)
    model = build_ours(config, torch.device("cpu"), torch.float32).eval().requires_grad_(False)
    loras = [random_lora(config, r, SEED + i) for i in range(4 if variant == "bank4" else 1)]
    bank = None
    if variant == "merged":
        model = merged_into(model, loras[0])
    else:
        bank = attach_loras(model, ["base", *(f"lora{i}" for i in range(len(loras)))], loras, BASE_VOCAB)
    requests = [Request(p, limit, lora=1 + i % len(loras) if bank else 0) for i, (p, limit) in enumerate(zip(prompts, limits))]
    with torch.inference_mode(), Decoder(model, batch_size, config.block_size, bank=bank) as decoder:
        batch = ContinuousBatch(decoder)
        for request in requests:
            batch.submit(request)
        while batch.busy:
            batch.step()
    return [request.generation.tokens for request in requests]


def decode_peft(size: str, r: int, batch_size: int, prompts: list, limits: list) -> list[list[int]]:
    import peft

    model = build_hf(model_config(size), torch.device("cpu"), torch.float32).eval()
    lora = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(model, lora, adapter_name="lora0")
    for i in range(1, 4):
        model.add_adapter(f"lora{i}", lora)
    adapters = (lambda start, rows: {"adapter_names": [f"lora{(start + i) % 4}" for i in range(rows)]})
    return padded_generate(model.eval(), batch_size, prompts, limits, adapters)


def worker(variant: str, size: str, r: int, batch_size: int, prompts: int, threads: int) -> dict:
    setup(threads, "cpu")
    ids, limits = workload(prompts, model_config(size).block_size)
    if variant == "peft4":
        def decode(p: list, n: list) -> list:
            return decode_peft(size, r, batch_size, p, n)
    else:
        def decode(p: list, n: list) -> list:
            return decode_ours(variant, size, r, batch_size, p, n)
    decode(ids[:2], [2, 2])  # warm-up
    start = time.perf_counter()
    replies = decode(ids, limits)
    seconds = time.perf_counter() - start
    assert [len(reply) for reply in replies] == limits
    return dict(variant=variant, seconds=seconds, tokens_per_s=sum(limits) / seconds, replies=replies)


def main(size: str = "30M", r: int = 16, batch_size: int = 8, prompts: int = 64, threads: int = 2,
         variant: Optional[str] = None) -> None:
    """Time each variant in its own process and print the table for RESULTS.md.

    Args:
        size: 30M or 120M
        r: the LoRAs' rank
        batch_size: rows decoded side by side, the same for every variant
        prompts: prompts in the workload
        threads: torch threads, the same in every process
        variant: run one variant (merged, bank1, bank4 or peft4) in this process and print its result as JSON
    """
    args = ["--size", size, "--r", str(r), "--batch_size", str(batch_size), "--prompts", str(prompts),
            "--threads", str(threads)]
    if variant is not None:
        report(worker(variant, size, r, batch_size, prompts, threads))
        return
    results = {v: run_worker("multi_lora.py", [*args, "--variant", v]) for v in VARIANTS}
    one, names = results["bank1"]["tokens_per_s"], {
        "merged": "1 LoRA merged into the base (served alone)", "bank1": "1 LoRA, every row, per-row gather",
        "bank4": "4 LoRAs mixed in every batch, per-row gather", "peft4": "PEFT, 4 LoRAs mixed, transformers generate"}
    rows = [[names[v], f"{results[v]['tokens_per_s']:.1f}", ratio(results[v]["tokens_per_s"], one)] for v in VARIANTS]
    same = sum(a == b for a, b in zip(results["bank1"]["replies"], results["merged"]["replies"]))
    _, limits = workload(prompts, model_config(size).block_size)
    table(f"{prompts} prompts, {sum(limits)} reply tokens, greedy, batch {batch_size}, LoRAs of rank {r} on q and v, "
          f"{size}, fp32, cpu, {threads} threads; 1-LoRA per-row replies equal to merged: {same}/{prompts}; "
          f"{environment()}", ["", "reply tokens/s", "vs 1 LoRA, per-row gather"], rows)


if __name__ == "__main__":
    run(main)
