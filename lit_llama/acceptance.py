"""The acceptance run's harness (scripts/gpu_check.py): a work dir, the repo's scripts run as a user runs
them, and what every check requires of their output. Commands whose exit code and signals are the point
run as subprocesses; the rest run in this process, which saves an interpreter start each."""

import contextlib
import csv
import functools
import importlib
import importlib.util
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from lit_llama.cli import run

REPO = Path(__file__).resolve().parents[1]
STOP_REASONS = ("eot", "eos", "max_new_tokens")
COMMAND_TIMEOUT = 240  # seconds: a hung command fails its check instead of using up a GPU loan


class Failed(Exception):
    """A check found something wrong; the message says what, in one line."""


class Missing(Exception):
    """A check needs an optional package that is not installed; the message is the command installing it."""


@dataclass
class Plan:
    """How much each check does: a few steps on the CPU, enough on a GPU for timings that mean something."""

    accelerator: str  # cuda or cpu
    steps: int  # optimizer steps of each fine-tune
    pretrain_steps: int
    micro_batch_size: int
    global_batch_size: int
    eval_iters: int
    max_new_tokens: int

    @classmethod
    def on(cls, accelerator: str, steps: Optional[int]) -> "Plan":
        if accelerator == "cuda":
            return cls(accelerator="cuda", steps=steps or 40, pretrain_steps=200, micro_batch_size=4,
                       global_batch_size=16, eval_iters=0, max_new_tokens=128)
        return cls(accelerator="cpu", steps=steps or 6, pretrain_steps=20, micro_batch_size=2, global_batch_size=4,
                   eval_iters=1, max_new_tokens=24)


@dataclass
class Work:
    """The work dir: what the checks write (the base checkpoint, the prepared data, the LoRA out dir, its
    merge and HF export), and under logs/ one file per check with all it printed."""

    root: Path
    plan: Plan
    check: str = ""  # the check running now
    base: Path = field(init=False)
    data: Path = field(init=False)
    lora: Path = field(init=False)
    merged: Path = field(init=False)
    hf: Path = field(init=False)

    def __post_init__(self) -> None:
        self.base, self.data, self.lora, self.merged, self.hf = (
            self.root / name for name in ("base", "data", "lora", "merged", "hf"))

    def fresh(self, name: str) -> Path:
        """An empty path under the work dir: a given --work_dir may hold an earlier run's files."""
        path = self.root / name
        if path.is_dir():
            shutil.rmtree(path)
        path.unlink(missing_ok=True)
        return path

    @property
    def log(self) -> Path:
        return self.root / "logs" / f"{self.check}.log"


@dataclass
class Result:
    code: int
    output: str  # stdout and stderr together
    value: Any = None  # in process: what the script's function returned


def read_from(log: Path, offset: int) -> str:
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


@dataclass
class Started:
    """A command running as a subprocess, its output appended to `log` from `offset` on. Leaving its
    `with` block ends it and the processes it started, if it still runs (a timeout, Ctrl-C, a failure)."""

    script: str
    proc: subprocess.Popen
    log: Path
    offset: int

    def output(self) -> str:
        return read_from(self.log, self.offset)

    def __enter__(self) -> "Started":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it may end meanwhile
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def child_env(processes: int = 1) -> dict[str, str]:
    """The environment of every command the checks start: ours, with Python's output unbuffered (a
    server's lines arrive as it prints them) and the cores shared among a multi-process run's processes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if processes > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    return env


def start(work: Work, script: str, args: Sequence[Any] = (), *, processes: int = 1) -> Started:
    """`python script args...` from the repo root, as a user types it, its output going to the check's log.
    It runs in a session of its own, so that ending it ends the processes it starts (ddp's other ranks)."""
    with open(work.log, "ab") as out:
        offset = out.tell()  # before the command shares the file
        proc = subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO,
                                env=child_env(processes), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Started(script, proc, work.log, offset)


def finish(command: Started, expect: tuple[int, ...] = (0,)) -> Result:
    """Wait for a started command and check its exit code."""
    try:
        code = command.proc.wait(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise Failed(f"{command.script} did not end in {COMMAND_TIMEOUT} s") from None
    return checked(command.script, Result(code, command.output()), expect)


@functools.cache
def script_entry(script: str) -> Callable[..., Any]:
    """The function a script hands to run(...), from the script imported as a module."""
    path = REPO / script
    spec = importlib.util.spec_from_file_location(f"{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # jsonargparse looks functions' signatures up through their module
    spec.loader.exec_module(module)
    return getattr(module, re.search(r"^\s+run\((\w+)\)", path.read_text(), re.M)[1])


@contextlib.contextmanager
def output_to(log: Path, stdin: str = "") -> Iterator[None]:
    """This process's stdout and stderr appended to `log` at the file-descriptor level (so loggers bound
    to them at import, and C code, write there too), and `stdin` read as its input."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds, saved_stdin = (os.dup(1), os.dup(2)), sys.stdin
    with open(log, "ab") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        sys.stdin = io.StringIO(stdin)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdin = saved_stdin
            for fd, saved in zip((1, 2), saved_fds):
                os.dup2(saved, fd)
                os.close(saved)


def call_in_process(script: str, args: list[Any], log: Path, stdin: str = "") -> Result:
    """A script's function run here on `args` as its command line, through the same run(...) as its
    `python script` (flags parsed alike, a user error exit code 2); a crash is exit code 1 with its
    traceback in the output, as in a subprocess."""
    code, value = 0, None
    offset = log.stat().st_size if log.is_file() else 0
    with output_to(log, stdin):
        try:
            value = run(script_entry(script), [str(arg) for arg in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
    if code == 130:  # Ctrl-C, turned into an exit code by run(...): it stops this script too
        raise KeyboardInterrupt
    return Result(code, read_from(log, offset), value)


def run_script(work: Work, script: str, args: Sequence[Any] = (), *, in_process: bool = False, stdin: str = "",
               processes: int = 1) -> Result:
    """Run `script` with `args`, as a subprocess or in this process, its output in the check's log; a
    failure unless it exits 0."""
    if in_process:
        return checked(script, call_in_process(script, list(args), work.log, stdin), (0,))
    with start(work, script, args, processes=processes) as command:
        return finish(command)


def checked(script: str, result: Result, expect: tuple[int, ...]) -> Result:
    if result.code not in expect:
        raise Failed(f"{script} exited {result.code}: {last_error(result.output)}")
    return result


def last_error(output: str) -> str:
    """The line of a command's output that says why it failed: its `error:` line, a traceback's last
    line, or else its last line (progress bars split on their carriage returns)."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", output) if line.strip()]
    errors = [line for line in lines if re.match(r"error:|\w*(Error|Exception|Interrupt)\b", line)]
    return (errors or lines or ["no output"])[-1]


def tokens_per_second(output: str) -> float:
    """The overall tokens/s of a generate script's last summary line ("... | 858.3 tokens/s, decode
    steps ..." for a prompt, "... | 300 tokens, 120.5 tokens/s | ..." for a prompts file)."""
    lines = [line for line in output.splitlines() if " tokens/s" in line]
    if not lines:
        raise Failed("no tokens/s in the output")
    return float(re.search(r"([\d.]+) tokens/s", lines[-1])[1])


def require_reasons(reasons: list[str], count: int) -> str:
    """Every one of `count` replies has a stop reason; returns how many of each, for the line."""
    if len(reasons) != count:
        raise Failed(f"{len(reasons)} stop reasons for {count} replies")
    if unknown := [reason for reason in reasons if reason not in STOP_REASONS]:
        raise Failed(f"unknown stop reasons {unknown}")
    return "stop reasons: " + ", ".join(f"{reason} {n}" for reason, n in sorted(Counter(reasons).items()))


def require(module: str, install: str) -> ModuleType:
    """`module`, imported; if it is not installed the check is skipped, naming the command that installs it."""
    if importlib.util.find_spec(module) is None:
        raise Missing(install)
    return importlib.import_module(module)


def metrics_rows(out_dir: Path) -> list[dict]:
    with open(out_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def require_cpu_tensors(path: Path) -> None:
    """Weights any machine loads as they are: torch.load without map_location gives CPU tensors (a GPU's
    tensors, saved as they were, load back onto a GPU, and fail to load where there is none)."""
    state = torch.load(path, weights_only=True)
    devices = Counter(t.device.type for t in state.values() if isinstance(t, torch.Tensor))
    if elsewhere := {device: n for device, n in devices.items() if device != "cpu"}:
        raise Failed(f"{path.name} holds {', '.join(f'{n} {d}' for d, n in elsewhere.items())} tensors: saved weights "
                     "must be CPU tensors, which load on any machine")


def train_args(work: Work, out_dir: Path, extra: Sequence[Any] = ()) -> list[Any]:
    """A short fine-tune of the tiny base on the prepared sample, in bf16: the GPU path, which runs on the CPU too."""
    plan = work.plan
    return ["--data_dir", work.data, "--checkpoint_dir", work.base, "--out_dir", out_dir,
            "--accelerator", plan.accelerator, "--precision", "bf16-true", "--train.max_iters", plan.steps,
            "--train.warmup_iters", 1, "--train.global_batch_size", plan.global_batch_size,
            "--train.micro_batch_size", plan.micro_batch_size, "--train.eval_iters", plan.eval_iters, *extra]


def require_trained(work: Work, out_dir: Path, weights: str) -> str:
    """What every fine-tune leaves: one metrics row per step, numbered on from 1, and its trained
    weights as CPU tensors. Returns its last tokens/s."""
    rows = metrics_rows(out_dir)
    steps = [int(row["step"]) for row in rows]
    if steps != list(range(1, work.plan.steps + 1)):
        raise Failed(f"metrics.csv has steps {steps}, not 1 to {work.plan.steps}")
    require_cpu_tensors(out_dir / weights)
    return f"{float(rows[-1]['tokens_per_sec']):.0f} tok/s"

