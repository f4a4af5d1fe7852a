"""The three prepare scripts on small real-shaped inputs: exact ids and labels, bad rows, overlong rows."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, REPO, load_script
from lit_llama.dataset import TokenDataset
from lit_llama.model import LLaMAConfig
from lit_llama.prepare import PrepareDirs, Samples, VocabChange
from lit_llama.tokenizer import Tokenizer

HI = [565, 959, 264, 267, 36]  # "Hi there!" with the fixture tokenizer
HELLO = [565, 503, 955, 36, 565, 318, 351, 358, 750, 1006]  # "Hello! How can I help?"
BE_BRIEF = [919, 595, 959, 952, 968, 973]  # "Be brief."
ADD = [348, 962, 962, 264, 789, 972, 362, 973]  # "Add the numbers."
NAME = [657, 531, 260, 675, 285, 973]  # "Name a color."
BLUE = [437, 961, 845, 973]  # "Blue."
FIVE = [951, 1005]  # "5"
BOS, EOT = 1, 1024
PAIR = ["Hi there!", "Hello! How can I help?"]
PAIR_IDS = [BOS, *HI, EOT, *HELLO, EOT]
PAIR_MASK = [False] * 7 + [True] * 11


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint dir with what preparation reads: the fixture tokenizer and the tiny config (block_size 512)."""
    directory = tmp_path_factory.mktemp("checkpoint")
    shutil.copy(FIXTURES / "tokenizer.model", directory)
    LLaMAConfig.from_name("tiny").save(directory / "model_config.json")
    return directory


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def prepared(directory: Path) -> list[tuple[list[int], list[bool]]]:
    """Every sample of both splits, sorted (the split is random)."""
    splits = [TokenDataset.load(directory / f"{name}.pt") for name in ("train", "val")]
    return sorted((ids.tolist(), mask.tolist()) for split in splits for ids, mask in (split[i] for i in range(len(split))))


def report(directory: Path) -> dict:
    return json.loads((directory / "prepare.json").read_text())["report"]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True, text=True)


# LIMA


def test_lima_single_and_multi_turn(checkpoint_dir, tmp_path):
    # a LIMA folder: train.jsonl is read; a test.jsonl row (user turn only) would be dropped
    (tmp_path / "lima").mkdir()
    write_jsonl(tmp_path / "lima" / "train.jsonl", [{"conversations": PAIR, "source": "stackexchange"},
                                                     {"conversations": PAIR * 2, "source": "multi_turn"},
                                                     {"conversations": PAIR[:1], "source": "test"}])
    load_script("scripts/prepare_lima.py").prepare(data_path=tmp_path / "lima",
                                                   dirs=PrepareDirs(checkpoint_dir, tmp_path / "out"))
    # the multi-turn conversation is one sample with both assistant turns trained
    assert prepared(tmp_path / "out") == [(PAIR_IDS, PAIR_MASK), (PAIR_IDS + PAIR_IDS[1:], PAIR_MASK + PAIR_MASK[1:])]
    assert report(tmp_path / "out") == {"read": 3, "kept": 2, "cut": 0, "tokens": 53, "trained_tokens": 33, "longest": 35,
                                        "dropped": {"not user/assistant pairs (odd or fewer than 2 turns)": 1}}


@pytest.mark.parametrize("overlong, expected, dropped", [
    ("drop", [PAIR_IDS, PAIR_IDS], {"longer than max_seq_length": 1}),
    ("cut_turns", [PAIR_IDS, PAIR_IDS, PAIR_IDS], {}),  # cut after its first assistant turn's EOT
])
def test_lima_overlong(checkpoint_dir, tmp_path, capsys, overlong, expected, dropped):
    data_path = write_jsonl(tmp_path / "lima.jsonl", [{"conversations": PAIR}] * 2 + [{"conversations": PAIR * 2}])
    load_script("scripts/prepare_lima.py").prepare(data_path=data_path, dirs=PrepareDirs(checkpoint_dir, tmp_path),
                                                   samples=Samples(max_seq_length=30, overlong=overlong))
    assert [ids for ids, _ in prepared(tmp_path)] == expected
    assert report(tmp_path)["dropped"] == dropped and report(tmp_path)["cut"] == int(overlong == "cut_turns")
    assert f"read 3, kept {len(expected)} ({int(overlong == 'cut_turns')} cut at a turn boundary)" in capsys.readouterr().out


def test_lima_strict_and_nothing_usable(checkpoint_dir, tmp_path):
    prepare = load_script("scripts/prepare_lima.py").prepare
    data_path = write_jsonl(tmp_path / "lima.jsonl", [{"conversations": PAIR}] * 2 + ["{broken"])
    prepare(data_path=data_path, dirs=PrepareDirs(checkpoint_dir, tmp_path / "out"))  # counted, not fatal
    with pytest.raises(ValueError, match="1 rows dropped and --strict is set"):
        prepare(data_path=data_path, dirs=PrepareDirs(checkpoint_dir, tmp_path / "out"), samples=Samples(strict=True))
    with pytest.raises(ValueError, match="0 usable samples"):
        prepare(data_path=write_jsonl(tmp_path / "bad.jsonl", ["{broken"]), dirs=PrepareDirs(checkpoint_dir, tmp_path / "out"))


def test_lima_cli_exits_2_when_nothing_is_usable(checkpoint_dir, tmp_path):
    data_path = write_jsonl(tmp_path / "bad.jsonl", ['{"conversations": ["a", 1]}', "[1, 2"])
    out = run_script("scripts/prepare_lima.py", "--data_path", data_path, "--checkpoint_dir", checkpoint_dir,
                     "--destination_path", tmp_path / "out")
    assert out.returncode == 2
    assert "read 2, kept 0 (0 cut at a turn boundary), dropped: 1 a turn that is not a string, 1 invalid JSON" in out.stdout
    assert f"{data_path}:1: skipped: a turn that is not a string" in out.stderr
    assert f"{data_path}:2: skipped: invalid JSON (Expecting ',' delimiter)" in out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"error: {data_path}: 0 usable samples; need at least 2 (one for validation)"


# Alpaca


def test_alpaca_with_and_without_input(checkpoint_dir, tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Name a color.", "input": "", "output": "Blue."},
            {"instruction": "Name a color.", "output": "Blue."}]  # no "input" at all: the same
    (tmp_path / "alpaca.json").write_text(json.dumps(rows, indent=2))  # one JSON array, as published
    load_script("scripts/prepare_alpaca.py").prepare(data_path=tmp_path / "alpaca.json",
                                                     dirs=PrepareDirs(checkpoint_dir, tmp_path / "out"),
                                                     samples=Samples(val_split_fraction=0.3))
    with_input = [BOS, *ADD, 13, 13, 1001, 280, 951, 1004, EOT, *FIVE, EOT]  # "Add the numbers.\n\n2 and 3"
    without_input = [BOS, *NAME, EOT, *BLUE, EOT]
    assert prepared(tmp_path / "out") == [(with_input, [False] * 16 + [True] * 3), (without_input, [False] * 8 + [True] * 5),
                                          (without_input, [False] * 8 + [True] * 5)]


def test_alpaca_prompt_style_round_trip(checkpoint_dir, tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}, {"instruction": "Name a color.", "output": "Blue."}]
    write_jsonl(tmp_path / "alpaca.jsonl", rows)
    load_script("scripts/prepare_alpaca.py").prepare(data_path=tmp_path / "alpaca.jsonl",
                                                     dirs=PrepareDirs(checkpoint_dir, tmp_path / "out"), prompt_style="alpaca")
    tokenizer = Tokenizer.from_dir(tmp_path / "out")
    decoded = sorted(tokenizer.decode(ids, skip_special=False) for ids, _ in prepared(tmp_path / "out"))
    assert decoded == [
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a response "
        "that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n"
        "### Response:<|eot|>5<|eot|>",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a color.\n\n### Response:<|eot|>Blue.<|eot|>",
    ]


def test_alpaca_cli_counts_bad_rows_and_goes_on(checkpoint_dir, tmp_path):
    good = {"instruction": "Name a color.", "output": "Blue."}
    data_path = write_jsonl(tmp_path / "alpaca.jsonl", [good, '{"instruction": "x" "output": "y"}', {"instruction": "x"},
                                                        {"instruction": "x", "output": 5}, good])
    out = run_script("scripts/prepare_alpaca.py", "--data_path", data_path, "--checkpoint_dir", checkpoint_dir,
                     "--destination_path", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    assert ("read 5, kept 2 (0 cut at a turn boundary), dropped: 1 a field that is not a string, "
            "1 invalid JSON (Expecting ',' delimiter), 1 missing field 'output'; 26 tokens (10 trained)") in out.stdout
    assert f"{data_path}:2: skipped: invalid JSON (Expecting ',' delimiter)" in out.stderr
    assert f"{data_path}:3: skipped: missing field 'output'" in out.stderr


# messages and segments


def test_messages_with_a_system_turn(checkpoint_dir, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"},
                {"role": "assistant", "content": "Hello! How can I help?"}]
    # message contents are text, always: a typed "<|eot|>" or "</s>" stays characters
    typed = [{"role": "user", "content": "Hi <|eot|></s>"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    write_jsonl(tmp_path / "chats.jsonl", [{"messages": messages}, {"messages": typed}])
    load_script("scripts/prepare_conversations.py").prepare(data_path=tmp_path / "chats.jsonl",
                                                            dirs=PrepareDirs(checkpoint_dir, tmp_path / "out"),
                                                            parse_special_in_text=True)
    samples = prepared(tmp_path / "out")
    assert ([BOS, *BE_BRIEF, EOT, *HI, EOT, *HELLO, EOT], [False] * 14 + [True] * 11) in samples
    tokenizer = Tokenizer.from_dir(tmp_path / "out")
    [typed_ids] = [ids for ids, _ in samples if ids[1] != BE_BRIEF[0]]
    assert [i for i in typed_ids if i in (1, 2, EOT)] == [BOS, EOT, EOT]
    assert tokenizer.decode(typed_ids, skip_special=False) == "Hi <|eot|></s><|eot|>Hello! How can I help?<|eot|>"


SEGMENTS = [{"text": "Q: Hi there!", "label": False}, {"text": " A: Hello!", "label": True}, {"special": "<|eot|>", "label": True},
            {"text": "Q: Hi there!", "label": False}, {"text": " A: Hello!<|eot|>", "label": True}]


@pytest.mark.parametrize("parse_special_in_text", [False, True])
def test_segments_as_written(checkpoint_dir, tmp_path, parse_special_in_text):
    write_jsonl(tmp_path / "segments.jsonl", [{"segments": SEGMENTS}, {"segments": SEGMENTS[:3]}])
    load_script("scripts/prepare_conversations.py").prepare(data_path=tmp_path / "segments.jsonl",
                                                            dirs=PrepareDirs(checkpoint_dir, tmp_path / "out"),
                                                            parse_special_in_text=parse_special_in_text)
    question, answer = [951, 84, 1003, *HI], [348, 1003, 565, 503, 955, 36]  # "Q: Hi there!" and, continuing it, " A: Hello!"
    literal_eot = [63, 127, 952, 322, 127, 65]  # "<|eot|>" as text, continuing text
    short = [BOS, *question, *answer, EOT]
    last = [EOT] if parse_special_in_text else literal_eot
    assert prepared(tmp_path / "out") == [
        (short, [False] * 9 + [True] * 7),
        (short + question + answer + last, [False] * 9 + [True] * 7 + [False] * 8 + [True] * (6 + len(last))),
    ]
    # decoded, a sample is its segments as written, the special tokens shown by name
    tokenizer = Tokenizer.from_dir(tmp_path / "out")
    assert tokenizer.decode(prepared(tmp_path / "out")[1][0], skip_special=False) == (
        "Q: Hi there! A: Hello!<|eot|>Q: Hi there! A: Hello!<|eot|>")


def test_segments_bos_off_unknown_special_and_cut(checkpoint_dir, tmp_path, capsys):
    rows = [{"segments": SEGMENTS}, {"segments": SEGMENTS[:3]}, {"segments": [{"special": "<|user|>", "label": False}, *SEGMENTS]},
            {"chat": []}]
    write_jsonl(tmp_path / "segments.jsonl", rows)
    load_script("scripts/prepare_conversations.py").prepare(
        data_path=tmp_path / "segments.jsonl", dirs=PrepareDirs(checkpoint_dir, tmp_path / "out"),
        segments_bos=False, samples=Samples(max_seq_length=20, overlong="cut_turns"))
    short = [951, 84, 1003, *HI, 348, 1003, 565, 503, 955, 36, EOT]
    assert prepared(tmp_path / "out") == [(short, [False] * 8 + [True] * 7)] * 2  # the long one cut after its first reply
    assert report(tmp_path / "out")["dropped"] == {"neither 'messages' nor 'segments'": 1,
                                                   "unknown special token '<|user|>' (known: <s>, </s>, <|eot|>)": 1}
    assert f"{tmp_path / 'segments.jsonl'}:3: skipped: unknown special token '<|user|>'" in capsys.readouterr().err
    # an extra special token can be placed once the tokenizer has it
    load_script("scripts/prepare_conversations.py").prepare(
        data_path=tmp_path / "segments.jsonl", dirs=PrepareDirs(checkpoint_dir, tmp_path / "out"),
        vocab=VocabChange(extra_special_tokens=["<|user|>"]))
    assert [ids[:2] for ids, _ in prepared(tmp_path / "out")] == [[BOS, 951], [BOS, 951], [BOS, 1025]]


def test_conversations_cli_exits_2_when_nothing_is_usable(checkpoint_dir, tmp_path):
    data_path = tmp_path / "chats.jsonl"
    data_path.write_bytes(b'{"messages": [{"role": "user", "content": "\xff"}]}\n{"messages": []}\n\n')
    out = run_script("scripts/prepare_conversations.py", "--data_path", data_path, "--checkpoint_dir", checkpoint_dir,
                     "--destination_path", tmp_path / "out")
    assert out.returncode == 2
    assert "dropped: 1 invalid UTF-8, 1 not user/assistant pairs (odd or fewer than 2 turns)" in out.stdout
    assert f"{data_path}:1: skipped: invalid UTF-8" in out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"error: {data_path}: 0 usable samples; need at least 2 (one for validation)"


def source_text(row: dict) -> str:
    """A row's text with the special tokens the format adds, as `Tokenizer.decode(skip_special=False)` shows it."""
    if "segments" in row:
        return "".join(s.get("text", s.get("special")) for s in row["segments"])
    if "messages" in row:
        return "".join(m["content"] + "<|eot|>" for m in row["messages"])
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return f"{user}<|eot|>{row['output']}<|eot|>"


@pytest.mark.parametrize("script, sample", [("prepare_alpaca.py", "alpaca_sample.json"),
                                            ("prepare_conversations.py", "conversations_sample.jsonl")])
def test_shipped_samples_round_trip(checkpoint_dir, tmp_path, script, sample):
    path = REPO / "data" / sample
    rows = json.loads(path.read_text()) if path.suffix == ".json" else [json.loads(line) for line in path.open()]
    load_script(f"scripts/{script}").prepare(data_path=path, dirs=PrepareDirs(checkpoint_dir, tmp_path),
                                             samples=Samples(strict=True))
    tokenizer = Tokenizer.from_dir(tmp_path)
    samples = prepared(tmp_path)
    assert all(ids[0] == BOS and ids[-1] == EOT and mask[-1] for ids, mask in samples)
    assert sorted(tokenizer.decode(ids, skip_special=False) for ids, _ in samples) == sorted(map(source_text, rows))


def test_role_tokens_and_the_system_text_record_travel_with_the_data(checkpoint_dir, tmp_path):
    write_jsonl(tmp_path / "lima.jsonl", [{"conversations": PAIR}, {"conversations": PAIR}])
    load_script("scripts/prepare_lima.py").prepare(data_path=tmp_path / "lima.jsonl",
                                                   dirs=PrepareDirs(checkpoint_dir, tmp_path / "roles"),
                                                   vocab=VocabChange(role_tokens=True))
    tokenizer = Tokenizer.from_dir(tmp_path / "roles")
    assert tokenizer.roles == {"system": 1025, "user": 1026, "assistant": 1027} and tokenizer.system_text is False
    ids, mask = prepared(tmp_path / "roles")[0]
    assert ids[:2] == [1, 1026] and ids.count(1027) == 1 and not mask[ids.index(1027)]
    assert json.loads((tmp_path / "roles" / "prepare.json").read_text())["system_text"] is False

    write_jsonl(tmp_path / "messages.jsonl", [{"messages": [{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": PAIR[0]},
                                                            {"role": "assistant", "content": PAIR[1]}]}] * 2)
    load_script("scripts/prepare_conversations.py").prepare(data_path=tmp_path / "messages.jsonl",
                                                            dirs=PrepareDirs(checkpoint_dir, tmp_path / "sys"))
    assert Tokenizer.from_dir(tmp_path / "sys").system_text is True and not Tokenizer.from_dir(tmp_path / "sys").roles
