"""The whole user path in one command, on this machine's GPU: build the tiny model, fine-tune it every
way, generate, chat, serve, merge and export it. One line per check, and exit code 1 if any failed.

    python scripts/gpu_check.py                     # on a CUDA GPU: a few minutes
    python scripts/gpu_check.py --accelerator cpu   # the same checks on the CPU, a few steps each, on a
                                                    # simulated accelerator (lit_llama/device_check.py)

The checks, in order: setup (scripts/prepare_tiny.py, scripts/prepare_lima.py); lora (bf16, validating,
stopped by SIGTERM after its first checkpoint, then resumed); adapter, full and qlora (short bf16 runs);
generate, compile and batch (generate/lora.py eager, compiled, on a continuous batch of prompts); attention
(each attention path forced onto its fused kernel); chat;
halting (scripts/evaluate_halting.py); self_sample; serve (generate/serve.py through the openai client);
export (scripts/merge_lora.py, scripts/convert_lit_checkpoint.py); transformers (the export's logits
against ours); and with two devices, ddp and fsdp. Each prints PASS, FAIL with the reason, or SKIP with
the pip command of an optional package it needs. Commands whose exit code and signals are the point run
as subprocesses, as a user runs them; the rest run in this process, which saves an interpreter start each.
"""

import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Literal, Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lit_llama import device_check
from lit_llama.acceptance import Failed, Missing, Plan, Work, output_to
from lit_llama.acceptance_checks import Check, CheckName, selected
from lit_llama.cli import run
from lit_llama.errors import BadValue, UsageError
from lit_llama.files import check_writable


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def run_check(check: Check, work: Work) -> str:
    """Run one check and print its line; returns PASS, FAIL or SKIP."""
    begin, work.check = time.perf_counter(), check.name
    try:
        with output_to(work.log):  # what the check's own library calls print, too, stays off its line
            status, detail = "PASS", check.run(work)
    except Missing as e:
        status, detail = "SKIP", f"needs {e}"
    except (Failed, UsageError) as e:  # a library call's user error says what is wrong in its message
        status, detail = "FAIL", first_line(e)
    except Exception as e:  # a bug here or in the library: said in a line, and the other checks still run
        status, detail = "FAIL", f"{type(e).__name__}: {first_line(e)}"
    seconds = time.perf_counter() - begin
    print(f"{status:<4}  {check.name + ' ' + check.what:<52} {seconds:6.1f} s   {detail}", flush=True)
    return status


def device_line(accelerator: str) -> str:
    if accelerator == "cuda":
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)"
    return f"cpu ({os.cpu_count()} cores), on the simulated accelerator of lit_llama/device_check.py"


def resolve_accelerator(accelerator: Literal["auto", "cuda", "cpu"]) -> str:
    """cuda or cpu, as --accelerator asks; cpu hides the GPUs and puts every command on the simulated
    accelerator."""
    if accelerator == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything asks torch: in-process steps and children alike
        # every command on lit_llama/device_check.py's simulated accelerator: a tensor left on the host where the
        # GPU path needs it on the device fails its check here as it would on a GPU
        os.environ[device_check.ENV] = "1"
        if "OMP_NUM_THREADS" not in os.environ:
            # the tiny model's ops are too small to gain from a second thread, and on a busy machine threads
            # that wait for each other make every step many times slower
            os.environ["OMP_NUM_THREADS"] = "1"
            torch.set_num_threads(1)
        return "cpu"
    if not torch.cuda.is_available():
        if accelerator == "cuda":
            raise BadValue("--accelerator cuda: no CUDA device is visible; check the driver and "
                           "CUDA_VISIBLE_DEVICES, or run on the CPU with --accelerator cpu")
        return "cpu"
    return "cuda"


def run_checks(checks: list[Check], work: Work, keep: bool) -> None:
    """Run `checks` in order and print the summary; the work dir is removed unless `keep` or a check failed."""
    begin, statuses = time.perf_counter(), []
    try:
        for check in checks:
            statuses.append(run_check(check, work))
    finally:
        kept = keep or "FAIL" in statuses
        if not kept:
            shutil.rmtree(work.root, ignore_errors=True)
    counts = Counter(statuses)
    kept_note = f"; work dir {work.root} (what each check printed is in logs/)" if kept else ""
    print(f"summary: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
          f"{time.perf_counter() - begin:.1f} s{kept_note}")
    if counts["FAIL"]:
        raise SystemExit(1)


def main(
    accelerator: Literal["auto", "cuda", "cpu"] = "auto",
    devices: Optional[int] = None,
    work_dir: Optional[Path] = None,
    keep: bool = False,
    steps: Optional[int] = None,
    only: Optional[list[CheckName]] = None,
) -> None:
    """Run the whole user path on the tiny model on this machine's GPU, one line per check; exit code 1
    if any check failed. It should pass before a long GPU run.

    Args:
        accelerator: cuda, cpu, or auto (cuda when there is one); cpu hides the GPUs from every step
        devices: devices the checks may use; with 2 or more, the ddp and fsdp checks run on 2 of them (default:
            the GPUs visible, at most 2; 1 on the CPU, where each device is a process)
        work_dir: where the checks write (default: a new temporary dir, removed at the end unless
            --keep true or a check failed)
        keep: keep the temporary work dir
        steps: optimizer steps of each fine-tune (default: 6 on the CPU, 40 on a GPU)
        only: run these checks and those they build on, e.g. [serve,export] (names as the lines print them)
    """
    if accelerator == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything asks torch: in-process steps and children alike
        # every command on lit_llama/device_check.py's simulated accelerator: a tensor left on the host where the
    accelerator = resolve_accelerator(accelerator)
    if devices is None:
        devices = min(torch.cuda.device_count(), 2) if accelerator == "cuda" else 1
    if steps is not None and steps < 3:
        raise BadValue(f"--steps {steps}: give at least 3 (the lora check stops a run after its first step, "
                       "then resumes it)")
    checks = selected(only, devices)
    plan = Plan.on(accelerator, steps)
    root = Path(work_dir or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    check_writable(root, 0, "--work_dir")
    work = Work(root, plan)
    work.fresh("logs").mkdir(parents=True)
    print(f"gpu_check on {device_line(accelerator)}, torch {torch.__version__}; fine-tunes of {plan.steps} steps; "
          f"work dir {root}", flush=True)
    if only is None and devices < 2:
        print("(ddp and fsdp need 2 devices: --devices 2 runs them)", flush=True)
    run_checks(checks, work, keep=keep or work_dir is not None)


if __name__ == "__main__":
    run(main)
