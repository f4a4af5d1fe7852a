"""Bad command lines end in one line and exit code 2: every script, a bad flag and a missing path.

The scripts run in-process through the same `run(...)` their `__main__` block calls, with sys.argv
patched; a few run as real processes to show the whole path (exit code, no traceback, --debug)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

import lit_llama.training  # noqa: F401  (before any capture: lightning's log handler keeps the stderr it first sees)
from conftest import REPO, script_entry
from lit_llama import cli
from lit_llama.errors import BadValue

SCRIPTS = ["finetune/lora.py", "finetune/adapter.py", "finetune/full.py",
           "generate/base.py", "generate/lora.py", "generate/adapter.py", "generate/full.py", "generate/chat.py",
           "scripts/convert_checkpoint.py", "scripts/convert_hf_checkpoint.py", "scripts/convert_lit_checkpoint.py",
           "scripts/demo.py", "scripts/evaluate_halting.py", "scripts/merge_lora.py", "scripts/prepare_alpaca.py",
           "scripts/prepare_conversations.py", "scripts/prepare_lima.py", "scripts/prepare_tiny.py"]

# script -> (arguments, stderr): a flag the parser rejects
BAD_FLAGS = {
    "finetune/lora.py": (["--data_dir", "d", "--lora.r", "four"], "error: --lora.r: expected int, got 'four'"),
    "finetune/adapter.py": (["--data_dir", "d", "--adapter.prompt_length", "ten"],
                            "error: --adapter.prompt_length: expected int, got 'ten'"),
    "finetune/full.py": (["--data_dir", "d", "--resume", "maybe"],
                         "error: --resume: expected true or false, got 'maybe'"),
    "generate/base.py": (["--temperature", "hot"], "error: --temperature: expected float, got 'hot'"),
    "generate/lora.py": (["--top_k", "many"], "error: --top_k: expected int or null, got 'many'"),
    "generate/adapter.py": (["--adapter_path", "a", "--promt", "hi"],
                            "error: unrecognized arguments: --promt hi (did you mean --prompt? "
                            "--help lists the flags)"),
    "generate/full.py": (["--precision", "fp8"],
                         "error: --precision: expected one of 32-true, bf16-true, 16-true or null, got 'fp8'"),
    "generate/chat.py": (["--max_new_tokens", "lots"], "error: --max_new_tokens: expected int, got 'lots'"),
    "scripts/convert_checkpoint.py": (["--checkpoint_dir", "c", "--output_dir", "o", "--dtype", "float64"],
                                      "error: --dtype: expected one of float32, bfloat16, float16 or null, "
                                      "got 'float64'"),
    "scripts/convert_hf_checkpoint.py": (["--checkpoint_dir", "c"],
                                         "error: --output_dir is required (--help lists the flags)"),
    "scripts/convert_lit_checkpoint.py": (["--checkpoint_dir", "c", "--output_dir"],
                                          "error: --output_dir needs a value"),
    "scripts/demo.py": (["--steps", "3"], "error: unrecognized arguments: --steps 3 (--help lists the flags)"),
    "scripts/evaluate_halting.py": (["--data_dir", "d", "--split", "test"],
                                    "error: --split: expected one of val, train, got 'test'"),
    "scripts/merge_lora.py": (["--lora_path", "l", "--out_dir", "o", "--checkpoint", "c"],  # no abbreviations
                              "error: unrecognized arguments: --checkpoint c (did you mean --checkpoint_dir? "
                              "--help lists the flags)"),
    "scripts/prepare_alpaca.py": (["--data_path", "a.json", "--prompt_style", "fancy"],
                                  "error: --prompt_style: expected one of plain, alpaca, got 'fancy'"),
    "scripts/prepare_conversations.py": (["--data_path", "c.jsonl", "--overlong", "cut"],
                                         "error: --overlong: expected one of drop, cut_turns, got 'cut'"),
    "scripts/prepare_lima.py": (["--val_split_fraction", "half"],
                                "error: --val_split_fraction: expected float, got 'half'"),
    "scripts/prepare_tiny.py": (["--steps", "many"], "error: --steps: expected int, got 'many'"),
}

LIMA_SAMPLE = str(REPO / "data" / "lima_sample.jsonl")
MAKE_CHECKPOINT = "make a checkpoint dir with scripts/prepare_tiny.py or scripts/convert_hf_checkpoint.py"
GIVE_OUT_DIR = "give the out dir that finetune/lora.py or finetune/adapter.py wrote"
PREPARE_FIRST = "prepare the data first with a scripts/prepare_*.py script"

# script -> (arguments, how the last line of stderr starts): a path that does not exist, given relative
# to the working directory, so the message shows it as typed. "." is an existing directory.
MISSING_PATHS = {
    "finetune/lora.py": (["--data_dir", "no/data", "--accelerator", "cpu"],
                         f"error: --data_dir no/data not found: {PREPARE_FIRST}"),
    "finetune/adapter.py": (["--data_dir", "no/data", "--accelerator", "cpu"],
                            f"error: --data_dir no/data not found: {PREPARE_FIRST}"),
    "finetune/full.py": (["--data_dir", ".", "--checkpoint_dir", "no/base", "--accelerator", "cpu"],
                         "error: --checkpoint_dir no/base not found: the base checkpoint the data was prepared for; "
                         + MAKE_CHECKPOINT),
    "generate/base.py": (["--checkpoint_dir", "no/base"],
                         f"error: --checkpoint_dir no/base not found: {MAKE_CHECKPOINT}"),
    "generate/lora.py": (["--lora_path", "no/lora"], f"error: --lora_path no/lora not found: {GIVE_OUT_DIR}"),
    "generate/adapter.py": (["--adapter_path", "no/adapter"], f"error: --adapter_path no/adapter not found: {GIVE_OUT_DIR}"),
    "generate/full.py": (["--checkpoint_dir", "no/full"],
                         f"error: --checkpoint_dir no/full not found: {MAKE_CHECKPOINT}"),
    "generate/chat.py": (["--lora_path", "no/lora"], f"error: --lora_path no/lora not found: {GIVE_OUT_DIR}"),
    "scripts/convert_checkpoint.py": (["--checkpoint_dir", "no/llama-2-7b", "--output_dir", "out"],
                                      "error: --checkpoint_dir no/llama-2-7b not found: give one model folder of "
                                      "Meta's download (the one with params.json and consolidated.00.pth)"),
    "scripts/convert_hf_checkpoint.py": (["--checkpoint_dir", "no/hf", "--output_dir", "out"],
                                         "error: --checkpoint_dir no/hf not found: give the Hugging Face model dir "
                                         "as downloaded (see howto/download_weights.md)"),
    "scripts/convert_lit_checkpoint.py": (["--checkpoint_dir", "no/merged", "--output_dir", "out"],
                                          "error: --checkpoint_dir no/merged not found: give a checkpoint dir of "
                                          "this repo (lit_model.pth, model_config.json, tokenizer.model)"),
    # a directory that can't be made: a file stands where its parent should be
    "scripts/demo.py": (["--work_dir", "file/demo"], "error: --work_dir file/demo is not writable"),
    "scripts/evaluate_halting.py": (["--data_dir", "no/data", "--lora_path", "no/lora"],
                                    "error: --data_dir no/data not found: give a dir that a scripts/prepare_*.py "
                                    "script wrote"),
    "scripts/merge_lora.py": (["--lora_path", "no/lora", "--out_dir", "merged"],
                              f"error: no/lora not found: {GIVE_OUT_DIR}"),
    "scripts/prepare_alpaca.py": (["--data_path", "no/alpaca.json"], "error: --data_path no/alpaca.json not found"),
    "scripts/prepare_conversations.py": (["--data_path", "no/chats.jsonl"],
                                         "error: --data_path no/chats.jsonl not found"),
    "scripts/prepare_lima.py": (["--data_path", LIMA_SAMPLE, "--checkpoint_dir", "no/base"],
                                "error: --checkpoint_dir no/base not found: the base checkpoint whose tokenizer gets "
                                f"the end-of-turn token; {MAKE_CHECKPOINT}"),
    "scripts/prepare_tiny.py": (["--corpus", "no/corpus.txt"],
                                "error: --corpus no/corpus.txt not found: give a plain text file, one document "
                                "per line"),
}


def run_script(relative_path: str, args: list[str], capsys) -> tuple[int, str, str]:
    """Run a script's command line in-process: (exit code, stdout, stderr)."""
    entry = script_entry(relative_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [relative_path, *args])
        mp.delenv(cli.DEBUG_ENV, raising=False)
        with pytest.raises(SystemExit) as exit_info:
            cli.run(entry)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_every_script_is_covered():
    assert sorted(BAD_FLAGS) == sorted(MISSING_PATHS) == sorted(SCRIPTS)
    for path in SCRIPTS:
        assert re.search(r"^\s+run\((\w+)\)", (REPO / path).read_text(), re.M), path


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_flag_ends_in_one_line_naming_it(script, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, expected = BAD_FLAGS[script]
    code, out, err = run_script(script, args, capsys)
    assert code == 2
    assert err.strip().splitlines() == [expected]
    assert "Traceback" not in out + err and "usage:" not in err


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_path_ends_in_one_line_naming_it(script, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("a file where a directory should be")
    args, expected = MISSING_PATHS[script]
    code, out, err = run_script(script, args, capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(expected)
    assert "Traceback" not in out + err
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()  # failed before writing anything


def test_bad_values_name_the_flag(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = [
        ("scripts/prepare_lima.py", ["--data_path", LIMA_SAMPLE, "--val_split_fraction", "2"],
         "error: --val_split_fraction must be between 0 and 1, got 2.0"),
        ("scripts/prepare_lima.py", ["--data_path", "."], "error: --data_path . has no train.jsonl"),
        ("scripts/prepare_alpaca.py", ["--data_path", "."], "error: --data_path . is a directory"),
        ("generate/chat.py", ["--lora_path", "a", "--adapter_path", "b"], "error: pass --lora_path or --adapter_path"),
        ("generate/base.py", ["--checkpoint_dir", "file"], "error: --checkpoint_dir file is a file, not a directory"),
        ("finetune/lora.py", [], "error: --data_dir is required"),
        ("finetune/lora.py", ["--data_dir", "d", "--config", "no.yaml"], "error: --config no.yaml not found"),
        ("finetune/lora.py", ["--config", "data_dir: no/data"], "error: --data_dir no/data not found"),  # inline YAML
        ("finetune/lora.py", ["--data_dir", "d", "--train.bogus", "1"], "error: unrecognized arguments: --train.bogus"),
        ("generate/lora.py", ["--stop_tokens", "a", "b"], "error: --stop_tokens: expected a list such as [a,b]"),
        ("finetune/full.py", ["--data_dir", "d", "--precision", "fp8"],
         "error: --precision: expected one of bf16-true, bf16-mixed, 16-mixed, 32-true or null, got 'fp8'"),
    ]
    (tmp_path / "file").write_text("")
    for script, args, expected in cases:
        code, out, err = run_script(script, args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, (script, args, err)
        assert err.startswith(expected), (script, args, err)


def test_a_config_file_is_read_and_its_errors_named(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("data_dir: no/data\naccelerator: cpu\ntrain:\n  max_iters: 3\n")
    code, _, err = run_script("finetune/lora.py", ["--config", "run.yaml"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --data_dir no/data not found")
    (tmp_path / "bad.yaml").write_text("data_dir: d\nlearning_rate: 0.1\n")
    code, _, err = run_script("finetune/lora.py", ["--config", "bad.yaml"], capsys)
    assert code == 2
    assert err.strip() == "error: 'learning_rate' in the --config file is not a flag of this script (--help lists them)"
    (tmp_path / "badtype.yaml").write_text("data_dir: d\ntrain:\n  max_iters: many\n")
    code, _, err = run_script("finetune/lora.py", ["--config", "badtype.yaml"], capsys)
    assert code == 2 and err.strip() == "error: --train.max_iters: expected int, got 'many'"


def test_help_shows_the_docstrings_and_debug(capsys):
    code, out, _ = run_script("finetune/lora.py", ["--help"], capsys)
    assert code == 0
    assert "Fine-tune a base checkpoint with LoRA" in out
    flat = " ".join(out.split())
    for text in ("--data_dir DATA_DIR prepared data: train.pt, val.pt", "--config CONFIG Path to a configuration file",
                 "--train.learning_rate LEARNING_RATE peak learning rate", "--lora.r R rank of the update",
                 "--debug on an error, show the whole traceback"):
        assert text in flat, text
    code, out, _ = run_script("generate/lora.py", ["--help"], capsys)  # **flags: the flags of reply()
    flat = " ".join(out.split())
    assert code == 0 and "--lora_path LORA_PATH a finetune/lora.py out dir" in flat
    assert "--temperature TEMPERATURE sampling temperature" in flat and "--debug" in flat


def test_debug_shows_the_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entry = script_entry("generate/lora.py")
    monkeypatch.setattr(sys, "argv", ["generate/lora.py", "--lora_path", "no/lora", "--debug"])
    with pytest.raises(FileNotFoundError, match="no/lora not found"):
        cli.run(entry)
    monkeypatch.setattr(sys, "argv", ["generate/lora.py", "--lora_path", "no/lora"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError, match="no/lora not found"):
        cli.run(entry)
    # a bad flag with --debug: jsonargparse's full report, usage included
    monkeypatch.setattr(sys, "argv", ["generate/lora.py", "--top_k", "many", "--debug"])
    monkeypatch.delenv(cli.DEBUG_ENV)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(entry)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage:" in err and 'Parser key "top_k"' in err


def test_a_usage_error_ends_in_one_line_and_with_debug_shows_its_traceback(capsys):
    def refuses(steps: int = 1) -> None:
        raise BadValue(f"--steps {steps}: give at most 2")

    with pytest.raises(SystemExit) as exit_info:
        cli.run(refuses, ["--steps", "3"])
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: --steps 3: give at most 2\n"
    with pytest.raises(BadValue, match="--steps 3: give at most 2"):
        cli.run(refuses, ["--steps", "3", "--debug"])


def test_an_error_that_is_no_usage_error_shows_its_traceback(tmp_path):
    """A ValueError or an OSError of a library or a bug is not the user's to fix: no one line hides it."""
    (tmp_path / "buggy.py").write_text("from lit_llama.cli import run\n\n"
                                       "def main(steps: int = 1) -> None:\n"
                                       "    raise ValueError('a bug, not the user')\n\n"
                                       "run(main)\n")
    result = run_process(str(tmp_path / "buggy.py"), cwd=tmp_path)
    assert result.returncode == 1 and "error:" not in result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "ValueError: a bug, not the user"


def test_an_unusable_prompts_file_ends_in_one_line(eot_checkpoint, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('"fine"\n{"messages": {"role": "user", "content": "hi"}}\n')
    for prompts_file, expected in [("no/prompts.jsonl", "error: no/prompts.jsonl: No such file or directory"),
                                   (".", "error: .: Is a directory"),
                                   ("bad.jsonl", "error: bad.jsonl:2: 'messages' must be a list of objects")]:
        code, out, err = run_script("generate/full.py", ["--checkpoint_dir", str(eot_checkpoint),
                                                         "--prompts_file", prompts_file], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(expected), (prompts_file, err)


def test_ctrl_c_ends_with_exit_code_130(capsys):
    def interrupted(steps: int = 1) -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        cli.run(interrupted, [])
    assert exit_info.value.code == 130 and capsys.readouterr().err == "stopped (Ctrl-C)\n"


def run_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_real_processes_exit_2_without_traceback(tmp_path):
    missing = run_process(str(REPO / "generate" / "lora.py"), "--lora_path", "no/lora", cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stdout + missing.stderr
    assert missing.stderr.strip().splitlines() == [
        "error: --lora_path no/lora not found: give the out dir that finetune/lora.py or finetune/adapter.py wrote"]
    bad = run_process(str(REPO / "scripts" / "prepare_lima.py"), "--overlong", "truncate", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stdout + bad.stderr
    assert bad.stderr.strip().splitlines() == ["error: --overlong: expected one of drop, cut_turns, got 'truncate'"]


def test_real_process_with_debug_shows_the_traceback(tmp_path):
    result = run_process(str(REPO / "generate" / "lora.py"), "--lora_path", "no/lora", "--debug", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("lit_llama.errors.MissingFile: --lora_path no/lora not found: give the "
                                                     "out dir that finetune/lora.py or finetune/adapter.py wrote")


def test_every_script_runs_a_valid_command_with_debug(tiny_checkpoint, lima_data, tmp_path, monkeypatch, capsys):
    """--debug changes only what an error shows: a valid command runs to its end (exit code 0), each script
    once, in the order a user runs them (each writes what the next reads). The demo's valid command is the
    whole path; it runs under `-m docs`."""
    from test_convert import random_hf_model, save_meta

    monkeypatch.chdir(tmp_path)
    save_meta(random_hf_model("llama"), tmp_path / "meta" / "tiny")
    shutil.copy(tiny_checkpoint / "tokenizer.model", tmp_path / "meta" / "tokenizer.model")
    (tmp_path / "prompts.jsonl").write_text('"What is rain?"\n')
    train = ["--train.max_iters", "1", "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
             "--train.eval_iters", "1", "--accelerator", "cpu"]
    fine_tune = ["--data_dir", str(lima_data), "--checkpoint_dir", str(tiny_checkpoint), *train]
    short = ["--max_new_tokens", "3"]
    commands = {
        "scripts/prepare_tiny.py": ["--out_dir", "tiny", "--steps", "1", "--vocab_size", "512"],
        "scripts/prepare_lima.py": ["--data_path", LIMA_SAMPLE, "--checkpoint_dir", "tiny", "--destination_path", "lima"],
        "scripts/prepare_alpaca.py": ["--data_path", str(REPO / "data" / "alpaca_sample.json"), "--checkpoint_dir", "tiny",
                                      "--destination_path", "alpaca"],
        "scripts/prepare_conversations.py": ["--data_path", str(REPO / "data" / "conversations_sample.jsonl"),
                                             "--checkpoint_dir", "tiny", "--destination_path", "chats"],
        "finetune/lora.py": [*fine_tune, "--out_dir", "lora"],
        "finetune/adapter.py": [*fine_tune, "--out_dir", "adapter"],
        "finetune/full.py": [*fine_tune, "--out_dir", "full"],
        "generate/base.py": ["--checkpoint_dir", str(tiny_checkpoint), *short],
        "generate/lora.py": ["--lora_path", "lora", "--prompts_file", "prompts.jsonl", *short],
        "generate/adapter.py": ["--adapter_path", "adapter", *short],
        "generate/full.py": ["--checkpoint_dir", "full", *short],
        "generate/chat.py": ["--lora_path", "lora", *short],
        "scripts/evaluate_halting.py": ["--data_dir", str(lima_data), "--lora_path", "lora", "--max_samples", "2", *short],
        "scripts/merge_lora.py": ["--lora_path", "lora", "--out_dir", "merged"],
        "scripts/convert_lit_checkpoint.py": ["--checkpoint_dir", "merged", "--output_dir", "hf"],
        "scripts/convert_hf_checkpoint.py": ["--checkpoint_dir", "hf", "--output_dir", "from_hf"],
        "scripts/convert_checkpoint.py": ["--checkpoint_dir", "meta/tiny", "--output_dir", "from_meta"],
    }
    assert sorted(commands) == sorted(set(SCRIPTS) - {"scripts/demo.py"})
    lines = iter(["What is rain?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    for script, args in commands.items():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "argv", [script, *args, "--debug"])
            cli.run(script_entry(script))  # an exception or SystemExit fails the test
        capsys.readouterr()
    assert (tmp_path / "from_meta" / "lit_model.pth").is_file() and (tmp_path / "from_hf" / "lit_model.pth").is_file()


def test_a_list_flag_is_given_once_per_item_or_whole():
    def command(lora: Optional[list[str]] = None, name: str = "x") -> list[str]:
        """Args:
            lora: one item per --lora
            name: a plain flag
        """
        return lora

    assert cli.run(command, ["--lora", "a=x", "--name", "z", "--lora=b=y"]) == ["a=x", "b=y"]
    assert cli.run(command, ["--lora", "[a=x, b=y]"]) == ["a=x", "b=y"]
    assert cli.run(command, []) is None
