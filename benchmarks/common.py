"""What the benchmarks share: model sizes, the same random weights for our model and for transformers'
LlamaForCausalLM, the same batches, threads, peak memory, timing, and the driver that runs each
implementation in its own process (peak RSS is per process) and prints the side-by-side table."""

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Literal, Optional

import torch

# run from a checkout without installing the package
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_llama.cli import FlagGroup, flags  # noqa: E402,F401 (flags: the benchmarks take it from here)
from lit_llama.export import hf_config, hf_state  # noqa: E402
from lit_llama.dataset import IGNORE_INDEX  # noqa: E402
from lit_llama.model import LLaMA, LLaMAConfig  # noqa: E402
from lit_llama.precision import TrainPrecision, compute_dtype, default_precision  # noqa: E402

BASE_VOCAB = 32000  # LLaMA's sentencepiece vocabulary
EOT_ID = BASE_VOCAB  # the end-of-turn token, appended
SEED = 1234

# ~30M and ~120M parameters on the CPU (1.1B, TinyLlama's shape, for memory), a 7B shape on a GPU; the
# vocabulary is LLaMA's plus the EOT
SIZES = {
    "30M": dict(n_layer=4, n_head=6, n_embd=384, intermediate_size=1024, block_size=512),
    "120M": dict(n_layer=10, n_head=12, n_embd=768, intermediate_size=2048, block_size=512),
    "1.1B": dict(n_layer=22, n_head=32, n_embd=2048, n_query_groups=4, intermediate_size=5632, block_size=2048),
    "7B": dict(n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, block_size=2048),
}

# dense bf16 tensor-core peak and memory bandwidth of the GPUs the numbers are read against
GPU_PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}


@dataclass
class TrainStep(FlagGroup):
    """The fine-tuning step that finetune.py and checkpointing.py time.

    Args:
        method: lora (q and v, r=8, plus the EOT rows) or full
        size: 30M, 120M (CPU) or 7B (GPU)
        batch_size: sequences per step
        seq_len: tokens per sequence
        warmup: steps before timing
        runs: timed steps; the median counts
        threads: torch threads, the same in every process
        device: cpu or cuda; it sets the precision (32-true on the CPU, bf16-true on a GPU)
    """

    method: Literal["lora", "full"] = "lora"
    size: str = "30M"
    batch_size: int = 2
    seq_len: int = 512
    warmup: int = 1
    runs: int = 3
    threads: int = 2
    device: str = "cpu"

    def flags(self) -> list[str]:
        """The flags that give a worker process this step."""
        return flags(**asdict(self))


def model_config(size: str) -> LLaMAConfig:
    return LLaMAConfig(vocab_size=BASE_VOCAB + 1, **SIZES[size])


def setup(threads: int, device: str) -> torch.device:
    """Pin the threads (the same number in every process) and fix the seed."""
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def training_precision(device: torch.device) -> TrainPrecision:
    """The `--precision` training defaults to on `device`: bf16-true on a GPU with bf16, 32-true on the CPU."""
    return default_precision() if device.type == "cuda" else "32-true"


def autocast(precision: TrainPrecision, device: torch.device) -> torch.autocast:
    """The autocast Fabric's precision plugin runs training's forward pass under; off under 32-true."""
    dtype = compute_dtype(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def build_ours(config: LLaMAConfig, device: torch.device, dtype: torch.dtype) -> LLaMA:
    """Our model with the seed's random weights, built directly in `dtype` on `device`."""
    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LLaMA(config)
    finally:
        torch.set_default_dtype(previous)


def hf_llama_config(config: LLaMAConfig, dtype: torch.dtype):
    from transformers import LlamaConfig

    # bos/eos ids only matter to generation defaults, which the benchmarks override
    ids = SimpleNamespace(bos_id=1, stop_ids=[2])
    return LlamaConfig(**hf_config(config, ids, dtype), attn_implementation="sdpa")


def build_hf(config: LLaMAConfig, device: torch.device, dtype: torch.dtype):
    """transformers' LlamaForCausalLM holding exactly the weights `build_ours` makes."""
    from transformers import LlamaForCausalLM

    ours = build_ours(config, device, dtype)
    state = hf_state(ours.state_dict(), config, None)
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_llama_config(config, dtype))
    model.load_state_dict(state, assign=True, strict=True)
    with torch.device(device):  # the rotary buffers are not in the state dict: build them where the model lives
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    del ours, state
    gc.collect()
    return model.to(device)


def batch(batch_size: int, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and labels shaped like LIMA data: turns of 128 tokens each ending with the EOT; labels mask
    the user turns (the even ones) and keep the assistant turns with their EOT."""
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(3, BASE_VOCAB, (batch_size, seq_len), generator=generator)
    ids[:, 0] = 1  # bos
    ids[:, 127::128] = EOT_ID
    labels = ids.clone()
    turn = torch.arange(seq_len) // 128
    labels[:, turn % 2 == 0] = IGNORE_INDEX
    return ids.to(device), labels.to(device)


def clock(device: torch.device) -> float:
    """`time.perf_counter()` once `device` has finished the work queued on it: CUDA kernels run
    asynchronously, and a clock read without waiting would count their launches, not their work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak_memory(device: torch.device) -> None:
    """From here on, peak memory counts only what the measured work holds."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(device: torch.device) -> int:
    """Peak bytes: `max_memory_allocated` on a GPU, the process' peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return rss_bytes("VmHWM")


def timed(fn: Callable[[], object], device: torch.device, warmup: int, runs: int) -> list[float]:
    """Seconds of each of `runs` calls of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = clock(device)
        fn()
        times.append(clock(device) - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def gpu_peaks(device: torch.device) -> Optional[tuple[float, float]]:
    """(peak bf16 FLOP/s, peak memory bytes/s) of the GPU, when known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks for key, peaks in GPU_PEAKS.items() if key in name), None)


def report(result: dict) -> None:
    """A worker's result: one JSON line, the last of its stdout."""
    print(json.dumps(result), flush=True)


def run_worker(script: str, args: list[str]) -> dict:
    """Run `script` with `args` in a fresh process; its last stdout line is its JSON result."""
    command = [sys.executable, str(Path(__file__).with_name(script)), *args]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{' '.join(command)} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_bandwidth(threads: int) -> float:
    """Bytes per second this machine reads with `threads` threads: the median of summing 1 GB of fp32."""
    torch.set_num_threads(threads)
    data = torch.ones(2**28)
    seconds = median(timed(data.sum, torch.device("cpu"), 1, 5))
    del data
    return 2**30 / seconds


def environment() -> str:
    import peft
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu} ({os.cpu_count()} cores){gpu}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}")


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, ready for RESULTS.md."""
    print(f"\n{title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x"
