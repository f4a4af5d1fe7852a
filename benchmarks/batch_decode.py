"""Many prompts of different lengths, greedy, each reply ending at its own length: our continuous
batch against our batch of 1 and against transformers' `generate` over padded batches of the same
size, on the same weights and prompts.

The workload: `prompts` prompts whose lengths and reply limits are drawn from LIMA-like
distributions (log-normal; prompt median 40 tokens, reply median 64, both clipped). No stop ids:
each reply ends at its own limit, as replies of a fine-tune end on EOT at different points.
transformers gets the same per-reply limits (a stopping criterion that marks each row done at its
own limit); its batches are the prompts in order, `batch_size` at a time, left-padded with an
attention mask, and each batch runs until its longest reply is done. Tokens/s counts the tokens of
the replies only (the same total for every variant).

    python benchmarks/batch_decode.py --size 30M
    python benchmarks/batch_decode.py --size 120M --prompts 64
"""

import time
from typing import Any, Callable, Optional

import torch

from common import (BASE_VOCAB, SEED, build_hf, build_ours, environment, model_config, ratio, report, run_worker,
                    setup, table)
from lit_llama.cli import run
from lit_llama.generate import generate_batch


def workload(n: int, block_size: int) -> tuple[list[list[int]], list[int]]:
    """`n` prompts (bos first) and each one's reply limit; prompt and reply fit in `block_size`."""
    generator = torch.Generator().manual_seed(SEED)
    prompt_lengths = (torch.randn(n, generator=generator) * 0.8 + 3.7).exp().round().clamp(4, 200).long().tolist()
    limits = (torch.randn(n, generator=generator) * 0.6 + 4.16).exp().round().clamp(8, 200).long().tolist()
    prompts = [[1] + torch.randint(3, BASE_VOCAB, (length - 1,), generator=generator).tolist() for length in prompt_lengths]
    return prompts, [min(limit, block_size - len(p)) for p, limit in zip(prompts, limits)]


def decode_ours(size: str, batch_size: int, prompts: list[list[int]], limits: list[int]) -> list[list[int]]:
    model = build_ours(model_config(size), torch.device("cpu"), torch.float32).eval()
    return [g.tokens for g in generate_batch(model, prompts, limits, batch_size=batch_size)]


def decode_hf(size: str, batch_size: int, prompts: list[list[int]], limits: list[int]) -> list[list[int]]:
    model = build_hf(model_config(size), torch.device("cpu"), torch.float32).eval()
    return padded_generate(model, batch_size, prompts, limits)


def padded_generate(model: Any, batch_size: int, prompts: list[list[int]], limits: list[int],
                    per_batch: Callable[[int, int], dict] = lambda start, rows: {}) -> list[list[int]]:
    """transformers' `generate` over the prompts in order, `batch_size` at a time, left-padded, each row
    stopped at its own limit; `per_batch(start, rows)` gives more `generate` arguments for a batch."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    replies = []
    for start in range(0, len(prompts), batch_size):
        rows, row_limits = prompts[start : start + batch_size], limits[start : start + batch_size]
        width = max(len(p) for p in rows)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in rows])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
        done_at = torch.tensor(row_limits)

        class EachAtItsLimit(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
                return torch.full((len(rows),), input_ids.shape[1] - width) >= done_at

        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max(row_limits), do_sample=False,
                                 pad_token_id=0, eos_token_id=None, stopping_criteria=StoppingCriteriaList([EachAtItsLimit()]),
                                 **per_batch(start, len(rows)))
        replies += [row[width : width + limit].tolist() for row, limit in zip(out, row_limits)]
    return replies


def worker(impl: str, size: str, batch_size: int, prompts: int, threads: int) -> dict:
    setup(threads, "cpu")
    config = model_config(size)
    ids, limits = workload(prompts, config.block_size)
    decode = decode_ours if impl == "ours" else decode_hf
    decode(size, batch_size, ids[:2], [2, 2])  # warm-up
    start = time.perf_counter()
    replies = decode(size, batch_size, ids, limits)
    seconds = time.perf_counter() - start
    assert [len(r) for r in replies] == limits
    return dict(impl=impl, batch_size=batch_size, seconds=seconds, tokens_per_s=sum(limits) / seconds, replies=replies)


def main(size: str = "30M", prompts: int = 64, batch_sizes: tuple[int, ...] = (8, 16), threads: int = 2,
         impl: Optional[str] = None, batch_size: int = 1) -> None:
    """Time the workload through our continuous batch (batch 1 and `batch_sizes`) and transformers'
    padded batches, each variant in its own process.

    Args:
        size: 30M or 120M
        prompts: prompts in the workload
        batch_sizes: the batch sizes compared
        threads: torch threads, the same in every process
        impl: run one variant (ours or hf, at --batch_size) in this process and print its result as JSON
        batch_size: with --impl, the batch size of that variant
    """
    if impl is not None:
        report(worker(impl, size, batch_size, prompts, threads))
        return
    config = model_config(size)
    _, limits = workload(prompts, config.block_size)
    args = ["--size", size, "--prompts", str(prompts), "--threads", str(threads)]
    ours_1 = run_worker("batch_decode.py", [*args, "--impl", "ours", "--batch_size", "1"])
    rows = [["ours, batch 1", f"{ours_1['tokens_per_s']:.1f}", "1.00x", "-", "-"]]
    for b in batch_sizes:
        ours = run_worker("batch_decode.py", [*args, "--impl", "ours", "--batch_size", str(b)])
        hf = run_worker("batch_decode.py", [*args, "--impl", "hf", "--batch_size", str(b)])
        same = sum(a == c for a, c in zip(ours["replies"], ours_1["replies"]))
        hf_same = sum(a == c for a, c in zip(hf["replies"], ours_1["replies"]))
        rows.append([f"ours, continuous batch of {b}", f"{ours['tokens_per_s']:.1f}",
                     ratio(ours["tokens_per_s"], ours_1["tokens_per_s"]), ratio(ours["tokens_per_s"], hf["tokens_per_s"]),
                     f"{same}/{prompts}"])
        rows.append([f"transformers generate, padded batches of {b}", f"{hf['tokens_per_s']:.1f}",
                     ratio(hf["tokens_per_s"], ours_1["tokens_per_s"]), "1.00x", f"{hf_same}/{prompts}"])
    lengths = sorted(len(p) for p in workload(prompts, config.block_size)[0])
    table(f"greedy decoding of {prompts} prompts ({lengths[0]} to {lengths[-1]} tokens, median {lengths[len(lengths) // 2]}; "
          f"{sum(limits)} reply tokens, {min(limits)} to {max(limits)} per reply), {size}, fp32, cpu, {threads} threads; "
          f"{environment()}",
          ["", "reply tokens/s", "vs ours, batch 1", "vs transformers, same batch size", "replies equal to ours, batch 1"],
          rows)


if __name__ == "__main__":
    run(main)
