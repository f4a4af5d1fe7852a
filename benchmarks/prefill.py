"""Reading the prompts of requests that arrive together (the continuous batch's prefill): in one forward
pass, the shorter prompts padded, against one prompt at a time, on the same model and prompts.

The prompts are the first `batch_size` of batch_decode.py's LIMA-like workload (log-normal lengths,
median about 40 tokens). Both ways run the head at each prompt's last position only; the time is the
median of `runs` after a warm-up, and the logits of the two ways are checked to agree.

    python benchmarks/prefill.py --size 30M
"""

import time

import torch

from batch_decode import workload
from common import build_ours, environment, median, model_config, ratio, setup, table
from lit_llama.cli import run
from lit_llama.decoder import Decoder


def timed_prefill(decoder: Decoder, prompts: list[list[int]], together: bool, runs: int) -> tuple[float, torch.Tensor]:
    """The median seconds to read `prompts` into slots 0..n-1, together or one at a time, and the logits (n, V)."""
    slots = list(range(len(prompts)))
    times = []
    for _ in range(runs + 1):  # the first is the warm-up
        decoder.reset()
        start = time.perf_counter()
        if together:
            logits = decoder.prefill_many(slots, prompts, [0] * len(prompts))
        else:
            logits = torch.stack([decoder.prefill(slot, prompt) for slot, prompt in zip(slots, prompts)])
        times.append(time.perf_counter() - start)
    return median(times[1:]), logits


def main(size: str = "30M", batch_sizes: tuple[int, ...] = (8, 16), runs: int = 5, threads: int = 2) -> None:
    """Time both ways at each batch size and print the table for RESULTS.md.

    Args:
        size: 30M or 120M
        batch_sizes: how many requests arrive together
        runs: timed runs of each, after one warm-up
        threads: torch threads
    """
    setup(threads, "cpu")
    config = model_config(size)
    model = build_ours(config, torch.device("cpu"), torch.float32).eval()
    rows = []
    for batch_size in batch_sizes:
        prompts = workload(batch_size, config.block_size)[0]
        with torch.inference_mode(), Decoder(model, batch_size, config.block_size) as decoder:
            alone, expected = timed_prefill(decoder, prompts, together=False, runs=runs)
            together, logits = timed_prefill(decoder, prompts, together=True, runs=runs)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        lengths = sorted(len(p) for p in prompts)
        rows.append([str(batch_size), f"{lengths[0]} to {lengths[-1]}, {sum(lengths)} in all", f"{alone * 1e3:.0f}",
                     f"{together * 1e3:.0f}", ratio(alone, together)])
    table(f"prefill of the requests that arrive together, {size}, fp32, cpu, {threads} threads, median of {runs}; "
          f"{environment()}", ["requests", "prompt tokens", "one at a time (ms)", "one pass (ms)", "speed-up"], rows)


if __name__ == "__main__":
    run(main)
