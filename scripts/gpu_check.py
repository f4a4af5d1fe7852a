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

import contextlib
import csv
import functools
import importlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Literal, Optional

REPO = Path(__file__).resolve().parents[1]
# run from a checkout without installing the package
sys.path.insert(0, str(REPO))

import torch

from lit_llama import device_check
from lit_llama.checkpoint import check_writable, load_model
from lit_llama.cli import run
from lit_llama.data import TokenDataset
from lit_llama.errors import BadValue, UsageError
from lit_llama.prompts import encode_prompt
from lit_llama.tokenizer import Tokenizer

CheckName = Literal["setup", "lora", "adapter", "full", "qlora", "generate", "attention", "compile", "batch", "chat",
                    "halting", "self_sample", "serve", "export", "transformers", "ddp", "fsdp"]
STOP_REASONS = ("eot", "eos", "max_new_tokens")
SERVER_DRAINED = (0, -signal.SIGTERM)  # after draining, uvicorn exits by the signal it caught
COMMAND_TIMEOUT = 240  # seconds: a hung command fails its check instead of using up a GPU loan
# logits of the export against ours, as a share of the largest logit
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
PROMPTS = [
    "How often should I water a cactus?", "What is a variable in programming?", "Why is the sky blue?",
    "How do plants drink water?", "What makes bread rise?", "How do I boil an egg?", "Why do cats purr?",
    "What is a good name for a dog?", "How far away is the moon?", "Why do leaves change colour?",
    "How do bees make honey?", "What is the capital of France?",
]


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
            return cls("cuda", steps or 40, 200, 4, 16, 0, 128)
        return cls("cpu", steps or 6, 20, 2, 4, 1, 24)


@dataclass
class Work:
    """The work dir: what the checks write, and under logs/ one file per check with all it printed."""

    root: Path
    plan: Plan
    check: str = ""  # the check running now

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def lora(self) -> Path:
        return self.root / "lora"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def hf(self) -> Path:
        return self.root / "hf"

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
    """The environment of every command this script starts: ours, with Python's output unbuffered (a
    server's lines arrive as it prints them) and the cores shared among a multi-process run's processes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if processes > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    return env


def start(work: Work, script: str, *args: Any, processes: int = 1) -> Started:
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


def run_script(work: Work, script: str, *args: Any, in_process: bool = False, stdin: str = "",
               processes: int = 1) -> Result:
    """Run `script` with `args`, as a subprocess or in this process, its output in the check's log; a
    failure unless it exits 0."""
    if in_process:
        return checked(script, call_in_process(script, list(args), work.log, stdin), (0,))
    with start(work, script, *args, processes=processes) as command:
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


def train_args(work: Work, out_dir: Path, *extra: Any) -> list[Any]:
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


def check_setup(work: Work) -> str:
    run_script(work, "scripts/prepare_tiny.py", "--out_dir", work.fresh("base"),
               "--steps", work.plan.pretrain_steps, in_process=True)
    run_script(work, "scripts/prepare_lima.py", "--data_path", REPO / "data" / "lima_sample.jsonl",
               "--checkpoint_dir", work.base, "--destination_path", work.fresh("data"), in_process=True)
    train, val = (len(TokenDataset.load(work.data / f"{split}.pt")) for split in ("train", "val"))
    return f"{train} train / {val} val samples, EOT id {Tokenizer.from_dir(work.data).eot_id}"


def check_lora(work: Work) -> str:
    """A run stopped by SIGTERM once its first checkpoint is written, then resumed to its last step."""
    steps, every = work.plan.steps, max(1, work.plan.steps // 3)
    out_dir = work.fresh("lora")
    args = train_args(work, out_dir, "--train.eval_interval", every, "--train.save_interval", 1)
    with start(work, "finetune/lora.py", *args) as command:
        deadline, first_checkpoint = time.monotonic() + COMMAND_TIMEOUT, out_dir / "training_state.pth"
        while command.proc.poll() is None and not first_checkpoint.is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        if command.proc.poll() is not None:
            raise Failed(f"finetune/lora.py ended (exit {command.proc.returncode}) before it could be stopped after "
                         f"its first checkpoint: {last_error(command.output())}")
        command.proc.send_signal(signal.SIGTERM)
        stopped = finish(command, expect=(130,))
    if "SIGTERM: saved a checkpoint" not in stopped.output:
        raise Failed("stopped by SIGTERM, finetune/lora.py did not say it saved a checkpoint")
    saved = len(metrics_rows(out_dir))
    if saved >= steps:
        raise Failed(f"SIGTERM stopped the run only at its last step, {saved}: give more --steps")
    resumed = run_script(work, "finetune/lora.py", *args, "--resume", "true")
    if f"resuming from step {saved}" not in resumed.output:
        raise Failed(f"the resumed run did not say it resumed from step {saved}")
    validated = [int(row["step"]) for row in metrics_rows(out_dir) if row["val_loss"]]
    expected = [step for step in range(1, steps + 1) if step % every == 0 or step == steps]
    if validated != expected:
        raise Failed(f"validation ran at steps {validated}, not {expected}")
    samples = re.findall(r"; sample .* \[(\S+)\]$", stopped.output + resumed.output, re.M)
    require_reasons(samples, len(expected))
    return f"stopped at step {saved} of {steps}, {require_trained(work, out_dir, 'lit_model_lora.pth')}"


def check_adapter(work: Work) -> str:
    out_dir = work.fresh("adapter")
    run_script(work, "finetune/adapter.py", *train_args(work, out_dir), in_process=True)
    return require_trained(work, out_dir, "lit_model_adapter.pth")


def check_full(work: Work) -> str:
    out_dir = work.fresh("full")
    run_script(work, "finetune/full.py", *train_args(work, out_dir), in_process=True)
    return require_trained(work, out_dir, "lit_model.pth")


def check_qlora(work: Work) -> str:
    require("torchao", "pip install -e '.[quantize]'")
    out_dir = work.fresh("qlora")
    run_script(work, "finetune/lora.py", *train_args(work, out_dir, "--quantize", "nf4"), in_process=True)
    return require_trained(work, out_dir, "lit_model_lora.pth")


def greedy_reply(work: Work, *flags: Any, samples: int = 1) -> str:
    """`samples` greedy replies to one prompt; the line's tokens/s is the last one's."""
    result = run_script(work, "generate/lora.py", "--lora_path", work.lora, "--prompt", PROMPTS[0],
                        "--temperature", 0, "--max_new_tokens", work.plan.max_new_tokens, "--num_samples", samples,
                        *flags, in_process=True)
    reasons = require_reasons(re.findall(r"^stop reason: (\S+) after \d+ tokens", result.output, re.M), samples)
    return f"{reasons}, {tokens_per_second(result.output):.0f} tok/s"


def check_generate(work: Work) -> str:
    return greedy_reply(work)


def check_compile(work: Work) -> str:
    # torch.compile does not trace through the device check's modes (lit_llama/device_check.py): the compiled
    # step runs off it; the eager step it compiles is checked by the generate check
    simulated = os.environ.pop(device_check.ENV, None)
    try:
        return greedy_reply(work, "--compile", "true", samples=2)  # the second reply's rate: compiled already
    finally:
        if simulated is not None:
            os.environ[device_check.ENV] = simulated


def check_batch(work: Work) -> str:
    prompts, replies = work.fresh("prompts.jsonl"), work.fresh("replies.jsonl")
    prompts.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in PROMPTS))
    result = run_script(work, "generate/lora.py", "--lora_path", work.lora, "--prompts_file", prompts,
                        "--batch_size", 4, "--output_file", replies, "--max_new_tokens", work.plan.max_new_tokens,
                        in_process=True)
    rows = [json.loads(line) for line in replies.read_text().splitlines()]
    reasons = require_reasons([row["stop_reason"] for row in rows], len(PROMPTS))
    return f"{reasons}, {tokens_per_second(result.output):.0f} tok/s"


def check_chat(work: Work) -> str:
    result = run_script(work, "generate/chat.py", "--lora_path", work.lora, "--temperature", 0,
                        "--max_new_tokens", work.plan.max_new_tokens, stdin=f"{PROMPTS[0]}\n{PROMPTS[1]}\n",
                        in_process=True)
    return require_reasons(re.findall(r"\[(\S+) after \d+ tokens, read", result.output), 2)


def check_halting(work: Work) -> str:
    report = run_script(work, "scripts/evaluate_halting.py", "--lora_path", work.lora, "--data_dir", work.data,
                        "--max_new_tokens", work.plan.max_new_tokens, "--output_file", work.fresh("halting.json"),
                        in_process=True).value
    if not report["prompts"]:
        raise Failed("no prompts evaluated")
    return require_reasons([row["stop_reason"] for row in report["rows"]], report["prompts"])


def check_self_sample(work: Work) -> str:
    rows, cache = 4, work.fresh("self_sampled.jsonl")
    summary = run_script(work, "scripts/self_sample.py", "--lora_path", work.lora,
                         "--data_path", REPO / "data" / "lima_sample.jsonl", "--destination_path", cache,
                         "--max_rows", rows, "--max_new_tokens", work.plan.max_new_tokens, "--keep_unfinished", "true",
                         in_process=True).value
    if summary["written"] + summary["empty_reply"] + summary["too_long"] != rows:
        raise Failed(f"of {rows} rows, {summary['written']} replies cached, {summary['empty_reply']} empty, "
                     f"{summary['too_long']} too long")
    cached = [json.loads(line) for line in cache.read_text().splitlines()]
    return require_reasons([row["stop_reason"] for row in cached], summary["written"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(server: Started, url: str) -> None:
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while server.proc.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    if server.proc.poll() is None:
        raise Failed(f"generate/serve.py did not answer in {COMMAND_TIMEOUT} s")
    raise Failed(f"generate/serve.py exited {server.proc.returncode}: {last_error(server.output())}")


def check_serve(work: Work) -> str:
    openai = require("openai", "pip install openai")
    require("fastapi", "pip install -e '.[serve]'")
    require("uvicorn", "pip install -e '.[serve]'")
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    with start(work, "generate/serve.py", "--lora_path", work.lora, "--port", port, "--batch_size", 4) as server:
        wait_until_serving(server, url)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=COMMAND_TIMEOUT)
        request = dict(model=client.models.list().data[0].id, messages=[{"role": "user", "content": PROMPTS[0]}],
                       max_tokens=work.plan.max_new_tokens, temperature=0)
        begin = time.perf_counter()
        plain = client.chat.completions.create(**request)
        rate = plain.usage.completion_tokens / (time.perf_counter() - begin)
        replies = [(plain.choices[0].message.content, plain.choices[0].finish_reason)]
        pieces, reason = [], None
        for chunk in client.chat.completions.create(stream=True, **request):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                reason = chunk.choices[0].finish_reason or reason
        replies.append(("".join(pieces), reason))
        server.proc.send_signal(signal.SIGTERM)
        stopped = finish(server, expect=SERVER_DRAINED)
    for kind, (content, reason) in zip(("plain", "streamed"), replies):
        if reason not in ("stop", "length") or not content:
            raise Failed(f"the {kind} reply has finish_reason {reason!r} and {len(content or '')} characters")
    if "Traceback" in stopped.output:
        raise Failed(f"generate/serve.py stopped with a traceback: {last_error(stopped.output)}")
    return f"finish_reason {replies[0][1]}, {rate:.0f} tok/s"


def check_export(work: Work) -> str:
    run_script(work, "scripts/merge_lora.py", "--lora_path", work.lora, "--out_dir", work.fresh("merged"),
               in_process=True)
    run_script(work, "scripts/convert_lit_checkpoint.py", "--checkpoint_dir", work.merged,
               "--output_dir", work.fresh("hf"), in_process=True)
    eos = json.loads((work.hf / "generation_config.json").read_text())["eos_token_id"]
    eot_id = Tokenizer.from_dir(work.merged).eot_id
    if eot_id not in (eos if isinstance(eos, list) else [eos]):
        raise Failed(f"generation_config.json stops on {eos}, not on the EOT id {eot_id}")
    return f"eos ids {eos}"


def check_transformers(work: Work) -> str:
    transformers = require("transformers", "pip install transformers")
    device = torch.device(work.plan.accelerator)
    tokenizer = Tokenizer.from_dir(work.merged)
    ours = load_model(work.merged).to(device).eval()
    dtype = ours.lm_head.weight.dtype
    theirs = transformers.AutoModelForCausalLM.from_pretrained(work.hf, dtype=dtype).to(device).eval()
    eos = theirs.generation_config.eos_token_id
    if tokenizer.eot_id not in (eos if isinstance(eos, list) else [eos]):
        raise Failed(f"transformers' generation config stops on {eos}, not on the EOT id {tokenizer.eot_id}")
    ids = torch.tensor([encode_prompt(tokenizer, [PROMPTS[0]])], device=device)
    with torch.no_grad():
        expected, logits = ours(ids).float(), theirs(ids).logits.float()
    if logits.shape != expected.shape:
        raise Failed(f"transformers' logits have shape {tuple(logits.shape)}, ours {tuple(expected.shape)}")
    difference, largest = (logits - expected).abs().max().item(), expected.abs().max().item()
    if difference > TOLERANCE[dtype] * largest:
        raise Failed(f"logits differ by up to {difference:.3g} (largest {largest:.3g}) in {dtype}")
    return f"logits within {difference:.1e} in {str(dtype).removeprefix('torch.')}"


def check_attention(work: Work) -> str:
    """Each attention path on its fused kernel, forced, so a path the kernel refuses raises instead of
    falling back to math (fp32 (B, heads, T, S) scores): flash the causal one (training, prompts without a
    cache), and the KV cache's masked one the memory-efficient kernel on a GPU (CPU flash on the CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = work.plan.accelerator == "cuda"
    device, dtype = torch.device(work.plan.accelerator), torch.bfloat16 if cuda else torch.float32
    masked = SDPBackend.EFFICIENT_ATTENTION if cuda else SDPBackend.FLASH_ATTENTION
    model = load_model(work.base).to(device=device, dtype=dtype).eval()
    ids = torch.tensor([Tokenizer.from_dir(work.base).encode(PROMPTS[0], bos=True)], device=device)
    T = ids.shape[1]
    with torch.inference_mode():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            whole = model(ids)
        model.set_kv_cache(batch_size=1, max_seq_length=T + 1)
        with sdpa_kernel(masked):
            prompt = model(ids[:, :-1], torch.arange(T - 1, device=device).unsqueeze(0), kv_length=T - 1)
            step = model(ids[:, -1:], torch.tensor([[T - 1]], device=device), kv_length=T)
    cached = torch.cat([prompt, step], dim=1).float()
    difference, largest = (cached - whole.float()).abs().max().item(), whole.float().abs().max().item()
    if difference > TOLERANCE[dtype] * largest:
        raise Failed(f"the cached path's logits differ from the causal path's by up to {difference:.3g}")
    return f"causal: flash; masked: {'memory-efficient' if cuda else 'flash (CPU)'}; {model.config.n_head} query " \
           f"heads over {model.config.n_query_groups} k/v heads"


def parallel_check(strategy: str) -> Callable[[Work], str]:
    def check(work: Work) -> str:
        out_dir = work.fresh(strategy)
        result = run_script(work, "finetune/lora.py",
                            *train_args(work, out_dir, "--devices", 2, "--strategy", strategy), processes=2)
        if "trained weights agree across 2 ranks: True" not in result.output:
            raise Failed("the two ranks' trained weights differ")
        return require_trained(work, out_dir, "lit_model_lora.pth")

    return check


@dataclass
class Check:
    name: CheckName
    what: str  # printed after the name
    run: Callable[[Work], str]  # the line's detail (counts, tokens/s); raises Failed, or Missing
    needs: tuple[CheckName, ...] = ()  # checks whose outputs it reads


CHECKS = [
    Check("setup", "prepare_tiny, prepare_lima", check_setup),
    Check("lora", "bf16: validate, SIGTERM stop, resume", check_lora, ("setup",)),
    Check("adapter", "bf16", check_adapter, ("setup",)),
    Check("full", "bf16", check_full, ("setup",)),
    Check("qlora", "nf4 base, bf16", check_qlora, ("setup",)),
    Check("generate", "eager, greedy", check_generate, ("lora",)),
    Check("attention", "fused kernels, forced", check_attention, ("setup",)),
    Check("compile", "generate --compile true", check_compile, ("lora",)),
    Check("batch", f"{len(PROMPTS)} prompts, continuous batch of 4", check_batch, ("lora",)),
    Check("chat", "two messages", check_chat, ("lora",)),
    Check("halting", "evaluate_halting on the val split", check_halting, ("lora",)),
    Check("self_sample", "4 rows", check_self_sample, ("lora",)),
    Check("serve", "openai client: plain, streamed; SIGTERM", check_serve, ("lora",)),
    Check("export", "merge_lora, convert_lit_checkpoint", check_export, ("lora",)),
    Check("transformers", "the export's logits and eos ids", check_transformers, ("export",)),
    Check("ddp", "lora on 2 devices", parallel_check("ddp"), ("setup",)),
    Check("fsdp", "lora on 2 devices", parallel_check("fsdp"), ("setup",)),
]
MULTI_DEVICE = ("ddp", "fsdp")


def selected(only: Optional[list[str]], devices: int) -> list[Check]:
    """The checks to run, in order: all of them (ddp and fsdp with 2 devices or more), or those in
    `only` and the checks they build on."""
    if only is None:
        return [check for check in CHECKS if devices >= 2 or check.name not in MULTI_DEVICE]
    if devices < 2 and (named := [name for name in only if name in MULTI_DEVICE]):
        raise BadValue(f"--only {','.join(named)}: needs 2 devices, pass --devices 2")
    by_name, wanted = {check.name: check for check in CHECKS}, set()
    pending = list(only)
    while pending:
        name = pending.pop()
        wanted.add(name)
        pending.extend(set(by_name[name].needs) - wanted)
    return [check for check in CHECKS if check.name in wanted]


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
        # GPU path needs it on the device fails its check here as it would on a GPU
        os.environ[device_check.ENV] = "1"
        if "OMP_NUM_THREADS" not in os.environ:
            # the tiny model's ops are too small to gain from a second thread, and on a busy machine threads
            # that wait for each other make every step many times slower
            os.environ["OMP_NUM_THREADS"] = "1"
            torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        if accelerator == "cuda":
            raise BadValue("--accelerator cuda: no CUDA device is visible; check the driver and "
                           "CUDA_VISIBLE_DEVICES, or run on the CPU with --accelerator cpu")
        accelerator = "cpu"
    else:
        accelerator = "cuda"
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
    begin, statuses = time.perf_counter(), []
    try:
        for check in checks:
            statuses.append(run_check(check, work))
    finally:
        kept = keep or work_dir is not None or "FAIL" in statuses
        if not kept:
            shutil.rmtree(root, ignore_errors=True)
    counts = Counter(statuses)
    kept_note = f"; work dir {root} (what each check printed is in logs/)" if kept else ""
    print(f"summary: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
          f"{time.perf_counter() - begin:.1f} s{kept_note}")
    if counts["FAIL"]:
        raise SystemExit(1)


if __name__ == "__main__":
    run(main)
