"""Loading a ~1B-parameter checkpoint (TinyLlama-1.1B's shape, random weights) from disk until the
model has scored one token: ours (`load_model`: meta device + mmap) against transformers'
`from_pretrained` on the same weights as safetensors. Time and peak RSS, each in a fresh process.
Both files are written once, are read from the page cache (warm) and are deleted at the end.

    python benchmarks/load.py
    python benchmarks/load.py --dtype float32
"""

import shutil
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import save_file

from common import (environment, hf_llama_config, mib, ratio, report, reset_peak_memory, rss_bytes, run_worker,
                    setup, table)
from lit_llama.checkpoint import CONFIG_FILE, MODEL_FILE, load_model
from lit_llama.cli import run
from lit_llama.export import hf_state
from lit_llama.model import LLaMA, LLaMAConfig

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def write_checkpoints(directory: Path, dtype: torch.dtype) -> int:
    """Random weights in our checkpoint dir (directory/ours) and as a Hugging Face model dir
    (directory/hf). Returns the weights' size in bytes."""
    config = LLaMAConfig.from_name("TinyLlama-1.1B", vocab_size=32000)
    with torch.device("meta"):
        shapes = LLaMA(config).state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.ones(t.shape, dtype=dtype) if t.dim() == 1
             else torch.empty(t.shape, dtype=dtype).normal_(0, 0.02, generator=generator) for name, t in shapes.items()}
    (directory / "ours").mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "ours" / MODEL_FILE)
    config.save(directory / "ours" / CONFIG_FILE)
    hf_llama_config(config, dtype).save_pretrained(directory / "hf")
    save_file(hf_state(state, config, None), directory / "hf" / "model.safetensors", metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in state.values())


def worker(impl: str, directory: Path, dtype: torch.dtype, threads: int) -> dict:
    setup(threads, "cpu")
    if impl == "hf":
        from transformers import AutoModelForCausalLM
    reset_peak_memory(torch.device("cpu"))
    baseline = rss_bytes()
    start = time.perf_counter()
    if impl == "ours":
        model = load_model(directory / "ours").eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(directory / "hf", dtype=dtype).eval()
    with torch.inference_mode():
        model(torch.tensor([[1]]))
    seconds = time.perf_counter() - start
    assert next(model.parameters()).dtype == dtype
    return dict(impl=impl, seconds=seconds, peak_rss=rss_bytes("VmHWM"), baseline_rss=baseline)


def main(dtype: Literal["bfloat16", "float32"] = "bfloat16", threads: int = 2,
         directory: Path = Path("/tmp/lit_llama_load_benchmark"), impl: Optional[Literal["ours", "hf"]] = None) -> None:
    """Time loading a 1.1B-parameter checkpoint to ready-to-generate, ours and transformers', each in its own process.

    Args:
        dtype: of the weights on disk and in memory
        threads: torch threads, the same in both processes
        directory: where the checkpoints are written, and deleted afterwards
        impl: load with one implementation in this process and print its result as JSON
    """
    if impl is not None:
        report(worker(impl, directory, DTYPES[dtype], threads))
        return
    try:
        size = write_checkpoints(directory, DTYPES[dtype])
        args = ["--dtype", dtype, "--threads", str(threads), "--directory", str(directory)]
        ours, hf = (run_worker("load.py", [*args, "--impl", name]) for name in ("ours", "hf"))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    rows = [["seconds", f"{ours['seconds']:.2f}", f"{hf['seconds']:.2f}", ratio(ours["seconds"], hf["seconds"])],
            ["peak RSS", mib(ours["peak_rss"]), mib(hf["peak_rss"]), ratio(ours["peak_rss"], hf["peak_rss"])],
            ["peak RSS / weights", f"{ours['peak_rss'] / size:.2f}", f"{hf['peak_rss'] / size:.2f}", ""],
            ["RSS after imports", mib(ours["baseline_rss"]), mib(hf["baseline_rss"]), ""],
            ["(peak - after imports) / weights", f"{(ours['peak_rss'] - ours['baseline_rss']) / size:.2f}",
             f"{(hf['peak_rss'] - hf['baseline_rss']) / size:.2f}", ""]]
    table(f"load TinyLlama-1.1B shape ({size / 1e9:.2f} GB of {dtype} weights) to one scored token, cpu, "
          f"{threads} threads, page cache warm; {environment()}",
          ["", "ours (load_model)", "transformers (from_pretrained)", "ours / theirs"], rows)


if __name__ == "__main__":
    run(main)
