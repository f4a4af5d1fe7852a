import json

import torch

from lit_llama.data import IGNORE_INDEX, PrepareReport, TokenDataset, collate, encode_conversations, read_lima_jsonl
from lit_llama.prompts import encode_conversation

PAIR = ["Hi there!", "Hello! How can I help?"]  # 7 + 11 tokens with the fixture tokenizer


def test_dataset_round_trip(tokenizer, tmp_path):
    samples = [encode_conversation(tokenizer, PAIR), encode_conversation(tokenizer, PAIR * 2)]
    TokenDataset.from_samples(samples).save(tmp_path / "train.pt")
    data = TokenDataset.load(tmp_path / "train.pt")
    assert len(data) == 2 and data.lengths.tolist() == [18, 35]
    ids, mask = data[1]
    assert ids.tolist() == samples[1].ids and mask.tolist() == samples[1].loss_mask


def test_collate_pads_right_and_never_trains_padding():
    a = (torch.tensor([1, 5, 6]), torch.tensor([False, True, True]))
    b = (torch.tensor([1, 7]), torch.tensor([False, True]))
    input_ids, labels = collate([a, b], pad_id=2)
    assert input_ids.tolist() == [[1, 5, 6], [1, 7, 2]]
    assert labels.tolist() == [[IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX]]


def test_overlong_drop_and_cut_turns(tokenizer):
    conversations = [PAIR, PAIR * 2, PAIR * 3]  # 18, 35, 52 tokens
    report = PrepareReport()
    kept = encode_conversations(conversations, tokenizer, max_seq_length=40, report=report, overlong="drop")
    assert [len(s.ids) for s in kept] == [18, 35]
    assert report.dropped == {"longer than max_seq_length": 1}

    report = PrepareReport()
    kept = encode_conversations(conversations, tokenizer, max_seq_length=40, report=report, overlong="cut_turns")
    assert [len(s.ids) for s in kept] == [18, 35, 35]  # cut after the second assistant turn, its EOT kept
    assert kept[2].ids[-1] == tokenizer.eot_id and kept[2].loss_mask[-1]
    assert report.cut == 1 and report.dropped == {}

    report = PrepareReport()
    assert encode_conversations([PAIR], tokenizer, max_seq_length=10, report=report, overlong="cut_turns") == []
    assert report.dropped == {"first exchange longer than max_seq_length": 1}


def test_bad_rows_are_counted_by_reason_and_named(tmp_path, capsys):
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
    conversations = read_lima_jsonl(path, report)
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
