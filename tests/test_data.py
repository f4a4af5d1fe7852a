import json
import os
import re

import pytest
import torch

from lit_llama.dataset import TokenDataset
from lit_llama.errors import BadValue
from lit_llama.prepare import encode_records
from lit_llama.prompts import Segment, conversation_segments, encode_conversation
from lit_llama.records import (BadRecord, PrepareReport, alpaca_turns, lima_turns, message_turns, read_records,
                               segments_layout)

PAIR = ["Hi there!", "Hello! How can I help?"]  # 7 + 11 tokens with the fixture tokenizer


def test_dataset_round_trip(tokenizer, tmp_path):
    samples = [encode_conversation(tokenizer, PAIR), encode_conversation(tokenizer, PAIR * 2)]
    TokenDataset.from_samples(samples).save(tmp_path / "train.pt")
    data = TokenDataset.load(tmp_path / "train.pt")
    assert len(data) == 2 and data.lengths.tolist() == [18, 35]
    ids, mask = data[1]
    assert ids.tolist() == samples[1].ids and mask.tolist() == samples[1].loss_mask


def test_a_split_cut_short_is_named_in_one_line(tokenizer, tmp_path):
    TokenDataset.from_samples([encode_conversation(tokenizer, PAIR)]).save(tmp_path / "train.pt")
    (tmp_path / "train.pt").write_bytes((tmp_path / "train.pt").read_bytes()[:300])  # a copy stopped midway
    with pytest.raises(BadValue, match=r"train.pt is truncated or corrupted, .*: prepare the data again$"):
        TokenDataset.load(tmp_path / "train.pt")


def encoded(conversations: list[list[str]], tokenizer, **fit) -> TokenDataset:
    """The conversations laid out, encoded and fitted as a prepare script does it."""
    layouts = [conversation_segments(tokenizer, turns) for turns in conversations]
    return encode_records(layouts, tokenizer, **fit)[0]


def test_overlong_drop_and_cut_turns(tokenizer):
    conversations = [PAIR, PAIR * 2, PAIR * 3]  # 18, 35, 52 tokens
    report = PrepareReport()
    kept = encoded(conversations, tokenizer, max_seq_length=40, report=report, overlong="drop")
    assert kept.lengths.tolist() == [18, 35]
    assert report.dropped == {"longer than max_seq_length": 1}

    report = PrepareReport()
    kept = encoded(conversations, tokenizer, max_seq_length=40, report=report, overlong="cut_turns")
    assert kept.lengths.tolist() == [18, 35, 35]  # cut after the second assistant turn, its EOT kept
    assert kept[2][0][-1] == tokenizer.eot_id and kept[2][1][-1]
    assert report.cut == 1 and report.dropped == {}

    report = PrepareReport()
    assert len(encoded([PAIR], tokenizer, max_seq_length=10, report=report, overlong="cut_turns")) == 0
    assert report.dropped == {"first exchange longer than max_seq_length": 1}


def test_bad_records_are_counted_by_reason_and_named(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"conversations": PAIR, "source": "ok"}),
        "{not json",
        json.dumps({"source": "no conversations"}),
        json.dumps({"conversations": ["only a user turn"]}),
        json.dumps({"conversations": ["a", 3]}),
        json.dumps({"conversations": ["a", "  "]}),
        "",
        json.dumps({"conversations": PAIR}),
    ]
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    report = PrepareReport()
    conversations = list(read_records(path, report, lima_turns))
    assert conversations == [PAIR, PAIR]
    assert report.read == 8
    assert report.dropped == {
        "invalid JSON (Expecting property name enclosed in double quotes)": 1,
        "no 'conversations' list": 1,
        "not user/assistant pairs (odd or fewer than 2 turns)": 1,
        "a turn that is not a string": 1,
        "an empty turn": 1,
        "invalid UTF-8": 1,
    }
    assert f"{path}:2: skipped: invalid JSON" in capsys.readouterr().err


def test_concat_and_select_keep_samples_whole(tokenizer):
    samples = [encode_conversation(tokenizer, PAIR * n) for n in (1, 2, 3)]
    data = TokenDataset.concat([TokenDataset.from_samples(samples[:1]), TokenDataset.from_samples(samples[1:])])
    assert data.lengths.tolist() == [18, 35, 52]
    picked = data.select(torch.tensor([2, 0]))
    assert [picked[i][0].tolist() for i in range(2)] == [samples[2].ids, samples[0].ids]
    assert [picked[i][1].tolist() for i in range(2)] == [samples[2].loss_mask, samples[0].loss_mask]
    assert len(data.select(torch.tensor([], dtype=torch.int64))) == 0 and len(TokenDataset.concat([])) == 0


def test_json_array_records_are_named_by_index(tmp_path, capsys):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"conversations": PAIR}, {"conversations": "oops"}, ["not an object"]], indent=2))
    report = PrepareReport()
    assert list(read_records(path, report, lima_turns)) == [PAIR]
    assert report.read == 3 and report.dropped == {"no 'conversations' list": 1, "not a JSON object": 1}
    assert f"{path}[1]: skipped: no 'conversations' list" in capsys.readouterr().err

    path.write_text('[\n  {"conversations": []},\n  {"conversations": [}\n]')
    with pytest.raises(ValueError, match=re.escape(f"{path}:3:22: invalid JSON (Expecting value)")):
        list(read_records(path, report, lima_turns))
    path.write_bytes(b'[{"conversations": ["\xff"]}]')
    with pytest.raises(ValueError, match=re.escape(f"{path}: invalid UTF-8 at byte 21")):
        list(read_records(path, report, lima_turns))


def test_byte_order_mark_is_not_an_error(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + (json.dumps({"conversations": PAIR}) + "\n").encode() * 2)
    report = PrepareReport()
    assert list(read_records(path, report, lima_turns)) == [PAIR, PAIR] and report.dropped == {}


def problem(parse, row) -> str:
    with pytest.raises(BadRecord) as e:
        parse(row)
    return str(e.value)


def test_alpaca_records():
    assert alpaca_turns({"instruction": "Add.", "input": "2 and 3", "output": "5"}) == ["Add.\n\n2 and 3", "5"]
    assert alpaca_turns({"instruction": "Add.", "output": "5"}) == alpaca_turns({"instruction": "Add.", "input": None, "output": "5"}) == ["Add.", "5"]
    assert problem(alpaca_turns, {"input": "", "output": "5"}) == "missing field 'instruction'"
    assert problem(alpaca_turns, {"instruction": "Add."}) == "missing field 'output'"
    assert problem(alpaca_turns, {"instruction": "Add.", "input": 2, "output": "5"}) == "a field that is not a string"
    assert problem(alpaca_turns, {"instruction": "Add.", "output": " "}) == "an empty instruction or output"


def test_message_records():
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert message_turns({"messages": turns}) == (None, ["Hi", "Hello"])
    assert message_turns({"messages": [{"role": "system", "content": "Be brief."}, *turns]}) == ("Be brief.", ["Hi", "Hello"])
    cases = {
        "no 'messages' list": "Hi",
        "a message without a 'role' or 'content'": [{"role": "user"}, turns[1]],
        "a turn that is not a string": [turns[0], {"role": "assistant", "content": ["parts"]}],
        "not user/assistant pairs (odd or fewer than 2 turns)": turns[:1],
        "an empty turn": [turns[0], {"role": "assistant", "content": ""}],
        "unknown role 'tool'": [turns[0], {"role": "tool", "content": "42"}],
        "a system message that is not the first message": [*turns, {"role": "system", "content": "Be brief."}, *turns],
        "a system message without text": [{"role": "system", "content": None}, *turns],
        "roles not alternating user, assistant, user, ...": turns[::-1],
    }
    for reason, messages in cases.items():
        assert problem(message_turns, {"messages": messages}) == reason
    assert problem(message_turns, {"messages": []}) == "not user/assistant pairs (odd or fewer than 2 turns)"


def test_segment_records(tokenizer):
    names = {"<s>": 1, "</s>": 2, "<|eot|>": 1024}
    row = {"segments": [{"text": "Q: 2+2? A:", "label": False}, {"text": " 4", "label": True},
                        {"special": "<|eot|>", "label": True}, {"text": "<|eot|>", "label": False}]}
    assert segments_layout(row, names, bos_id=1) == [
        Segment(special_id=1), Segment("Q: 2+2? A:", ends="turn"), Segment(" 4", label=True),
        Segment(special_id=1024, label=True, ends="reply"), Segment("<|eot|>", ends="turn")]
    # special names inside text become ids only when asked
    assert segments_layout(row, names, parse_special_in_text=True)[-1] == Segment(special_id=1024, ends="turn")
    cases = {
        "no 'segments' list, or an empty one": [],
        "a segment without exactly one of 'text' and 'special'": [{"text": "a", "special": "</s>", "label": True}],
        "a segment without a true/false 'label'": [{"text": "a", "label": "yes"}],
        "a segment whose 'text' is not a string": [{"text": 4, "label": True}],
        "unknown special token '<|user|>' (known: <s>, </s>, <|eot|>)": [{"special": "<|user|>", "label": True}],
        "unknown special token 2 (known: <s>, </s>, <|eot|>)": [{"special": 2, "label": True}],
        "no segment with label true": [{"text": "a", "label": False}],
    }
    for reason, segments in cases.items():
        assert problem(lambda r: segments_layout(r, names), {"segments": segments}) == reason


def test_prepared_splits_and_the_export_reach_the_disk_before_their_names(tmp_path, monkeypatch, eot_checkpoint):
    """What files.py promises every file a run depends on: the bytes are flushed to the disk before the
    rename, or a power cut can leave a complete-looking name over a truncated file."""
    from lit_llama.export import export_hf_checkpoint
    from lit_llama.prompts import EncodedConversation

    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd))[1])
    TokenDataset.from_samples([EncodedConversation([1, 5, 9], [False, True, True], [3], [3])]).save(tmp_path / "train.pt")
    assert str(tmp_path / "train.pt.tmp") in synced
    export_hf_checkpoint(eot_checkpoint, tmp_path / "hf")
    assert str(tmp_path / "hf" / "model.safetensors.tmp") in synced
