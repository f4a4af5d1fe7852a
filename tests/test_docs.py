"""The commands of README.md and howto/*.md, taken from their ```bash blocks as a reader copies them.

- Always: every command names a script that exists, with flags and values that script accepts.
- With `-m docs`: every block runs, page after page, in a temporary copy of the repo, on the tiny model:
  each command must exit 0, write the files its page says, and print what its page claims ("stop
  reason: eot", ...). A server (generate/serve.py) runs in the background for the commands after it
  and is stopped with SIGTERM at the end, when it must exit as a drained server does. Fine-tunes in the howto pages run a few steps only (their step counts are for
  real models); README's path runs as written. A block that needs what this machine lacks says so on
  a `# needs ...` line, and its commands are skipped with that reason.

CI also runs README's quickstart block as written (.ci/run): the demo, then the test suite.
"""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

from conftest import REPO, load_script, script_entry
from lit_llama.cli import build_parser

PAGES = ["README.md", "howto/prepare_data.md", "howto/special_tokens.md", "howto/finetune_lora.md",
         "howto/finetune_adapter.md", "howto/finetune_full.md", "howto/recipes.md", "howto/inference.md",
         "howto/chat.md", "howto/serve.md", "howto/evaluate.md", "howto/export.md", "howto/download_weights.md",
         "howto/troubleshooting.md"]  # in the order they run: makers before users

# a fine-tune in a howto page, cut short (the figures it prints are not what the page is about)
SHORT_TRAINING = ["--train.epochs", "null", "--train.max_iters", "4", "--train.warmup_iters", "1",
                  "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.eval_interval", "2",
                  "--train.eval_iters", "1"]
CHAT_INPUT = "How often should I water a cactus?\n/exit\n"

# script -> (the flag naming the dir it writes, the files the pages say it holds afterwards)
WRITES = {
    "scripts/prepare_tiny.py": ("out_dir", ["lit_model.pth", "model_config.json", "tokenizer.model"]),
    **{f"scripts/prepare_{name}.py": ("destination_path", ["train.pt", "val.pt", "tokenizer.model",
                                                           "special_tokens.json", "prepare.json"])
       for name in ("lima", "alpaca", "conversations")},
    **{f"finetune/{method}.py": ("out_dir", [weights, "hyperparameters.json", "model_config.json", "tokenizer.model",
                                             "special_tokens.json", "training_state.pth", "metrics.csv"])
       for method, weights in (("lora", "lit_model_lora.pth"), ("adapter", "lit_model_adapter.pth"),
                               ("full", "lit_model.pth"))},
    "scripts/merge_lora.py": ("out_dir", ["lit_model.pth", "model_config.json", "tokenizer.model", "special_tokens.json"]),
    "scripts/convert_lit_checkpoint.py": ("output_dir", ["model.safetensors", "config.json", "generation_config.json",
                                                         "tokenizer.model", "tokenizer_config.json"]),
}

# (page, how the command starts, up to a space) -> what the page says it prints (stdout and stderr together)
CLAIMS = {
    ("howto/finetune_lora.md", "python finetune/lora.py --data_dir data/lima --checkpoint_dir checkpoints/tiny --plan true "):
        ["peak per device"],
    ("README.md", "pip install -e . && python scripts/demo.py "): ["stop reason: eot after",
                                                                    "the reply ended on the end-of-turn token"],
    ("README.md", "python generate/lora.py --lora_path out/lora "): ["stop reason: eot after"],
    ("howto/inference.md", "python generate/lora.py --lora_path out/lora --prompt "): ["stop reason: eot after",
                                                                                      "decode steps", "peak memory"],
    ("howto/inference.md", "python generate/lora.py --lora_path out/lora --prompts_file "): ["replies, stop reasons: eot"],
    ("howto/inference.md", "python scripts/evaluate_halting.py "): ["stopped on EOT", "mean reference length"],
    ("howto/inference.md", "python generate/base.py "): ["stop reason: max_new_tokens after 400 tokens"],
    ("howto/chat.md", "python generate/chat.py --lora_path out/lora"): ["[eot after"],
    ("howto/serve.md", "curl -s http://127.0.0.1:8000/v1/models "): ['"id":"lora"'],
    ("howto/serve.md", "curl -s http://127.0.0.1:8000/v1/chat/completions "): ['"object":"chat.completion"',
                                                                               '"finish_reason":"stop"'],
    ("howto/serve.md", "curl -s http://127.0.0.1:8000/v1/completions "): ['"object":"text_completion"',
                                                                          '"token_logprobs":[null,'],
    ("howto/serve.md", "curl -s http://127.0.0.1:8000/tokenize "): ['"count":'],
    ("howto/recipes.md", "python scripts/self_sample.py "): ["replies cached: "],
    ("howto/prepare_data.md", "python scripts/prepare_alpaca.py "): ["read ", "kept ", "dropped: "],
    ("howto/prepare_data.md", "python scripts/prepare_conversations.py "): ["read ", "kept ", "dropped: "],
}


@dataclass
class Command:
    page: str
    line: int  # where it starts in the page
    text: str  # as written, continuation lines joined
    needs: Optional[str]  # what the block says it needs that this machine lacks

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def parts(self) -> list[list[str]]:
        """The argv of each command joined by &&, without leading VAR=value assignments."""
        argvs = []
        for part in self.text.split("&&"):
            argv = shlex.split(part, comments=True)
            while argv and re.fullmatch(r"\w+=\S*", argv[0]):
                argv = argv[1:]
            argvs.append(argv)
        return argvs

    def scripts(self) -> list[tuple[str, list[str]]]:
        """(script, its arguments) for each part that runs a script of this repo."""
        return [(argv[1], argv[2:]) for argv in self.parts() if argv[:1] == ["python"] and argv[1:2] != ["-m"]]


def page_commands(page: str) -> list[Command]:
    commands, block, needs, pending, start = [], False, None, "", 0
    for number, line in enumerate((REPO / page).read_text(encoding="utf-8").splitlines(), 1):
        if not block:
            block, needs = line.strip() == "```bash", None
            continue
        if line.startswith("```"):
            block = False
            continue
        if not pending:
            if note := re.match(r"#\s*needs (.+)", line.strip()):
                needs = "needs " + note[1]
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = number
        pending += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            commands.append(Command(page, start, " ".join(pending.split()), needs))
            pending = ""
    return commands


COMMANDS = [command for page in PAGES for command in page_commands(page)]


def test_every_page_is_read():
    assert sorted(PAGES) == sorted(["README.md", *(f"howto/{p.name}" for p in (REPO / "howto").glob("*.md"))])
    assert len(COMMANDS) > 30 and all(command.parts() for command in COMMANDS)


def parse(script: str, args: list[str], capsys) -> dict:
    """The flags of `args` as `script` reads them; a flag or value it rejects fails the test with its error line."""
    assert (REPO / script).is_file(), f"{script} does not exist"
    parser = build_parser(script_entry(script))
    try:
        return parser.parse_args(args).as_dict()
    except SystemExit:
        pytest.fail(f"{script} rejects the flags: {capsys.readouterr().err.strip()}")


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.scripts()], ids=lambda c: c.where)
def test_a_page_names_real_scripts_and_flags(command, capsys):
    for script, args in command.scripts():
        parse(script, args, capsys)


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repo's files (tracked, and new ones git does not ignore), without anything a run left in it."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    copy = tmp_path_factory.mktemp("docs") / "repo"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    return copy


def shell_text(command: Command) -> tuple[str, Optional[str]]:
    """What runs of `command`, or why nothing does. Installs are left out (the package is installed), the
    test suite does not run inside itself, a howto page's fine-tune is cut short, and the demo gets
    --debug: its valid command is the whole path, too long for the suite's own --debug test."""
    if command.needs:
        return "", command.needs
    kept = []
    for segment, argv in zip(command.text.split("&&"), command.parts()):
        segment = re.sub(r"\s+#[^'\"]*$", "", segment.strip())  # a trailing comment would swallow added flags
        if argv[:1] == ["pip"]:
            continue
        if argv[:3] == ["python", "-m", "pytest"]:
            return "", "the test suite itself"
        script = argv[1] if argv[:1] == ["python"] else ""
        if script == "scripts/demo.py":
            segment += " --debug"
        if script.startswith("finetune/") and command.page != "README.md":
            segment += " " + shlex.join(SHORT_TRAINING)
        kept.append(segment)
    return " && ".join(kept), None if kept else "installs packages, as the test environment did"


@pytest.fixture(scope="module")
def servers() -> Iterator[list[subprocess.Popen]]:
    """Servers the pages start; they run until the pages are done."""
    started: list[subprocess.Popen] = []
    yield started
    for server in started:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) in (0, -signal.SIGTERM), server.stdout.read()[-3000:]


def serve_in_background(command: Command, text: str, cwd: Path, env: dict, servers: list, capsys) -> None:
    """Start the page's server and wait until it answers."""
    [(script, args)] = command.scripts()
    port = parse(script, args, capsys)["port"]
    server = subprocess.Popen(["bash", "-c", f"exec {text}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    servers.append(server)
    deadline = time.monotonic() + 120
    while server.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return
        except OSError:
            time.sleep(0.5)
    output = server.stdout.read()[-3000:] if server.poll() is not None else "(no answer in 120 s)"
    pytest.fail(f"{command.where}: `{text}` did not start serving:\n{output}")


@pytest.mark.docs
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where)
def test_a_page_runs_as_written(command, repo_copy, servers, capsys):
    text, skipped = shell_text(command)
    if skipped:
        pytest.skip(f"{command.where}: {skipped}")
    is_chat = any(script == "generate/chat.py" for script, _ in command.scripts())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # "python" is ours
    if any(script == "generate/serve.py" for script, _ in command.scripts()):
        serve_in_background(command, text, repo_copy, env, servers, capsys)
        return
    result = subprocess.run(["bash", "-c", text], cwd=repo_copy, env=env, capture_output=True, text=True, timeout=900,
                            input=CHAT_INPUT if is_chat else "")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command.where}: `{text}` ended with exit code {result.returncode}:\n{output[-3000:]}"
    for (page, begins), claims in CLAIMS.items():
        if command.page == page and (command.text + " ").startswith(begins):
            for claim in claims:
                assert claim in output, f"{command.where}: the page says it prints {claim!r}; it printed:\n{output[-3000:]}"
    for script, args in command.scripts():
        if script in WRITES:
            flag, names = WRITES[script]
            parsed = parse(script, args, capsys)
            if parsed.get("plan"):  # a fine-tune's --plan prints the memory plan and writes nothing
                continue
            directory = repo_copy / str(parsed[flag])
            missing = [name for name in names if not (directory / name).is_file()]
            assert not missing, f"{command.where}: {directory.relative_to(repo_copy)} lacks {missing}"



def test_the_demo_prints_commands_a_reader_can_paste(monkeypatch, capfd):
    monkeypatch.chdir(REPO)
    load_script("scripts/demo.py").step("a step", ["generate/lora.py", "--help", "--prompt", "How often, and why?"])
    printed = [line for line in capfd.readouterr().out.splitlines() if line.startswith("$ ")]
    assert [shlex.split(line[2:]) for line in printed] == [
        ["python", "generate/lora.py", "--help", "--prompt", "How often, and why?"]]
