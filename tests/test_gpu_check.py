"""scripts/gpu_check.py as CI's smoke run uses it: on the CPU every check passes (all extras are installed
here, so none is skipped), on the simulated accelerator of lit_llama/device_check.py, so a device
mistake on any path it takes fails here. And its --help, its user errors, what --only selects, and the
one line a skipped or failed check prints."""

import re
import subprocess
import sys

import torch

from conftest import REPO, load_script
from lit_llama.acceptance import Missing, Plan, Work, tokens_per_second
from lit_llama.acceptance_checks import Check, selected

CHECKS = ["setup", "lora", "adapter", "full", "qlora", "generate", "attention", "compile", "batch", "chat", "halting",
          "self_sample", "serve", "multi_lora", "export", "transformers"]
LINE = re.compile(r"^(PASS|FAIL|SKIP)  (\w+) ")


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/gpu_check.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


def test_every_check_passes_on_the_cpu(tmp_path):
    result = gpu_check("--accelerator", "cpu", "--work_dir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if LINE.match(line)]
    assert [LINE.match(line)[2] for line in lines] == CHECKS, result.stdout
    assert all(line.startswith("PASS") for line in lines), result.stdout
    assert re.search(rf"^summary: {len(CHECKS)} passed, 0 failed, 0 skipped in ", result.stdout, re.M), result.stdout
    assert (tmp_path / "work" / "logs" / "lora.log").is_file()  # a given work dir is kept
    assert "on the simulated accelerator" in result.stdout.splitlines()[0]


def test_help_lists_the_flags():
    result = gpu_check("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--accelerator", "--devices", "--work_dir", "--keep", "--steps", "--only"):
        assert flag in result.stdout


def test_only_runs_a_check_with_those_it_builds_on():
    names = [check.name for check in selected(["transformers"], devices=1)]
    assert names == ["setup", "lora", "export", "transformers"]
    assert [check.name for check in selected(["fsdp", "setup"], devices=2)] == ["setup", "fsdp"]
    assert "ddp" in [check.name for check in selected(None, devices=2)]
    assert "ddp" not in [check.name for check in selected(None, devices=1)]


def test_user_errors_end_in_one_line():
    result = gpu_check("--accelerator", "cpu", "--only", "[ddp]")
    assert result.returncode == 2 and result.stderr.strip() == "error: --only ddp: needs 2 devices, pass --devices 2"
    result = gpu_check("--steps", "2")
    assert result.returncode == 2 and result.stderr.strip().startswith("error: --steps 2: give at least 3")
    if not torch.cuda.is_available():
        result = gpu_check("--accelerator", "cuda")
        assert result.returncode == 2 and result.stderr.strip().startswith("error: --accelerator cuda: no CUDA device")


def test_tokens_per_second_reads_the_generate_scripts_summaries():
    reply = ("stop reason: eot after 30 tokens | 858.3 tokens/s, decode steps 1020.4 tokens/s | peak memory 0.34 GB "
             "(process)")
    batch = "12 replies, stop reasons: eot 12 | 300 tokens, 120.5 tokens/s | peak memory 0.3 GB (process)"
    assert tokens_per_second(f"text\n{reply}\n") == 858.3
    assert tokens_per_second(f"{batch}\n") == 120.5


def test_a_missing_package_skips_and_an_error_fails_with_one_line(tmp_path, capsys):
    script = load_script("scripts/gpu_check.py")
    work = Work(tmp_path, Plan.on("cpu", None))
    (tmp_path / "logs").mkdir()

    def missing(work):
        raise Missing("pip install something")

    def broken(work):
        raise RuntimeError("first line\nsecond line")

    assert script.run_check(Check("serve", "x", missing), work) == "SKIP"
    assert script.run_check(Check("chat", "y", broken), work) == "FAIL"
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"SKIP  serve x +\d+\.\d s   needs pip install something", lines[0])
    assert re.fullmatch(r"FAIL  chat y +\d+\.\d s   RuntimeError: first line", lines[1])
