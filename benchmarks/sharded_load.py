"""Host memory of an fsdp fine-tune while it loads its base, takes its first step and validates, summed
over its processes, at 1, 2 and 4 gloo processes on the CPU.

The measure is the proportional set size (PSS, from /proc/<pid>/smaps_rollup): a page that several
processes map (the page cache of a memory-mapped checkpoint, the libraries) counts a 1/n share in
each, so the sum over the processes counts every page once. It is sampled every 100 ms, from outside,
from the launch: once every rank has started (imports done, processes joined, no model yet), while
it loads (until the training loop starts), and on until the run's first metrics row (step 1, its
validation and its sample reply).

The run is the user's: `finetune/lora.py --strategy fsdp --precision bf16-true` (LoRA r=8 on q and v,
the EOT's rows), one step of one sample per process, at TinyLlama-1.1B's shape with random bf16
weights and a 32000-piece tokenizer, on the shipped LIMA sample cut to 128 tokens. The weights'
size is the checkpoint file's. Each process runs with 2 // N threads (at least 1). With `--method
full` it is `finetune/full.py`, whose weights all train and are kept in fp32 (twice the file's
size, sharded), measured until its training loop starts and then stopped; `--loading_only true` stops
any run there (a CPU without bf16 matrix units takes hours over a bf16 step at this shape).

    python benchmarks/sharded_load.py
    python benchmarks/sharded_load.py --checkout /path/to/another/checkout   # its figures, same files
    python benchmarks/sharded_load.py --quantize nf4 --processes '[2, 4]'   # QLoRA: the base in 4 bits
    python benchmarks/sharded_load.py --method full                          # fp32 weights, loading only
    python benchmarks/sharded_load.py --quantize nf4 --processes '[2, 4]' --loading_only true

The second form runs another checkout's finetune script on the same checkpoint and data: the way to
put two versions side by side.
"""

import csv
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import sentencepiece as spm
import torch

from common import ROOT, mib, table
from lit_llama.checkpoint import CONFIG_FILE, MODEL_FILE
from lit_llama.cli import run
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.tokenizer import Tokenizer


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """A sentencepiece model of `vocab_size` pieces, LLaMA's special ids, trained in a second on random words."""
    rng = random.Random(0)
    words = sorted({"".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(40000)})
    lines = [" ".join(words[i : i + 20]) for i in range(0, len(words), 20)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, model_type="word",
                                   vocab_size=vocab_size, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                   num_threads=1, minloglevel=2)
    return Tokenizer(proto.getvalue())


def write_checkpoint(directory: Path) -> int:
    """Random bf16 weights of TinyLlama-1.1B's shape, its config and a 32000-piece tokenizer. Returns the
    weights' size in bytes."""
    config = LLaMAConfig.from_name("TinyLlama-1.1B", vocab_size=32000)
    with torch.device("meta"):
        shapes = LLaMA(config).state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.ones(t.shape, dtype=torch.bfloat16) if t.dim() == 1
             else torch.empty(t.shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
             for name, t in shapes.items()}
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / MODEL_FILE)
    config.save(directory / CONFIG_FILE)
    word_tokenizer(config.vocab_size).save(directory)
    return (directory / MODEL_FILE).stat().st_size


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Lightning launches ranks 1.. as children of rank 0)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:  # the task ended while we looked
                pass
    return found


def pss(pid: int) -> int:
    """The proportional set size of `pid` in bytes (0 if it has ended)."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return next(int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("Pss:"))


def pss_phases(proc: subprocess.Popen, processes: int, log: Path, done: Path,
               loading_only: bool) -> tuple[int, int, Optional[int]]:
    """Sums of PSS over `proc`'s process tree: once every rank has started (its log shows each rank's
    seed: imports done, processes joined, no model yet), the peak while loading (until the training
    loop's progress bar), and the peak in all, until the file `done` has a data row (None with
    `loading_only`: then the sampling ends with the loading)."""
    started, loading, peak = None, 0, 0
    while proc.poll() is None:
        total = sum(pss(pid) for pid in process_tree(proc.pid))
        text = log.read_text(errors="replace")
        if started is None and text.count("Seed set to") == processes:
            started = total
        if "fine-tuning:" not in text:
            loading = max(loading, total)
        elif loading_only:
            return started, loading, None
        peak = max(peak, total)
        if done.is_file() and len(list(csv.reader(done.open()))) > 1:
            break
        time.sleep(0.1)
    return started, loading, peak


def measure(checkout: Path, checkpoint: Path, data: Path, out_dir: Path, processes: int, *, method: str,
            quantize: Optional[str], loading_only: bool) -> tuple[int, int, Optional[int]]:
    """`pss_phases` of a run on `processes` processes, stopped once loaded with `loading_only`."""
    command = [sys.executable, f"finetune/{method}.py", "--data_dir", str(data), "--checkpoint_dir", str(checkpoint),
               "--out_dir", str(out_dir), "--accelerator", "cpu", "--devices", str(processes), "--strategy", "fsdp",
               "--precision", "bf16-true", "--train.max_iters", "1", "--train.warmup_iters", "1",
               "--train.global_batch_size", str(processes), "--train.micro_batch_size", "1", "--train.eval_iters", "1",
               *(["--lora.dropout", "0"] if method == "lora" else []), *(["--quantize", quantize] if quantize else [])]
    # a fixed mmap threshold: glibc returns each freed tensor to the system at once, so that PSS follows the
    # live tensors (its default raises the threshold as tensors are freed, and keeps freed ones in its heap)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // processes)), "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
    log = out_dir.with_suffix(".log")
    shutil.rmtree(out_dir, ignore_errors=True)  # an earlier run's metrics would end the sampling at once
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=checkout, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        sums = pss_phases(proc, processes, log, out_dir / "metrics.csv", loading_only=loading_only)
        if loading_only:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        elif proc.wait(timeout=1800):
            raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()[-3000:]}")
    return sums


def main(checkout: Path = ROOT, work_dir: Path = Path("/tmp/sharded_load"), processes: tuple[int, ...] = (1, 2, 4),
         method: Literal["lora", "full"] = "lora", quantize: Optional[str] = None, loading_only: bool = False,
         keep: bool = False) -> None:
    """Sum of PSS over the processes of an fsdp fine-tune at TinyLlama-1.1B's shape, against the weights' size.

    Args:
        checkout: the checkout whose finetune scripts run (by default this one)
        work_dir: where the checkpoint, the data and the runs are written
        processes: the process counts to run
        method: lora, or full (its weights train in fp32; measured while loading only: its first step, with
            AdamW's state, needs more memory than this machine has at 1.1B)
        quantize: nf4 for QLoRA (the base's block weights in 4 bits, sharded under fsdp)
        loading_only: stop each run once its training loop starts (always so with method full)
        keep: keep work_dir (the checkpoint is 2.2 GB) for another run, e.g. with another --checkout
    """
    checkpoint, data = work_dir / "checkpoint", work_dir / "data"
    if not (checkpoint / MODEL_FILE).is_file():
        write_checkpoint(checkpoint)
    if not (data / "train.pt").is_file():
        subprocess.run([sys.executable, "scripts/prepare_lima.py", "--data_path", "data/lima_sample.jsonl",
                        "--checkpoint_dir", str(checkpoint), "--destination_path", str(data), "--max_seq_length", "128",
                        "--overlong", "cut_turns"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    weights = (checkpoint / MODEL_FILE).stat().st_size
    rows = []
    for n in processes:
        started, loading, peak = measure(Path(checkout), checkpoint, data, work_dir / f"run{n}", n, method=method,
                                         quantize=quantize, loading_only=loading_only or method == "full")
        rows.append([str(n), mib(started), mib(loading), f"{loading / weights:.2f}x", f"{(loading - started) / weights:.2f}x",
                     "-" if peak is None else mib(peak), "-" if peak is None else f"{peak / weights:.2f}x"])
        print(rows[-1], flush=True)
    name = {"full": "full fine-tune", "lora": "QLoRA (nf4)" if quantize else "LoRA"}[method]
    table(f"fsdp {name}, bf16-true, TinyLlama-1.1B's shape ({mib(weights)} of bf16 weights), {checkout}: sums of PSS "
          "over the processes once started, at their peak while loading, and at their peak in all (load, step 1, "
          "its validation and sample reply)",
          ["processes", "started", "loading", "x weights", "loading - started, x weights", "in all", "x weights"], rows)
    if not keep:
        shutil.rmtree(work_dir)


if __name__ == "__main__":
    run(main)
