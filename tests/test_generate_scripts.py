"""The generate scripts' flags, on the tiny base checkpoint and on a checkpoint dir that has an EOT."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, load_script
from lit_llama.checkpoint import load_model
from lit_llama.generate import Sampling, Stopping, generate, stop_reason
from lit_llama.inference import Replies
from lit_llama.prompt_records import read_prompts
from lit_llama.prompts import encode_prompt
from lit_llama.tokenizer import Tokenizer


def stats_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("stop reason: ")]


def test_base_checkpoint_continues_plain_text_and_stops_on_eos(tiny_checkpoint, capsys):
    load_script("generate/base.py").main(checkpoint_dir=tiny_checkpoint, replies=Replies(prompt="The river"),
                                         sampling=Sampling(temperature=0), stopping=Stopping(max_new_tokens=30))
    out, err = capsys.readouterr()
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    expected = generate(load_model(tiny_checkpoint), tokenizer.encode("The river", bos=True), 30, stop_ids=(tokenizer.eos_id,))
    assert out == tokenizer.decode(expected.tokens) + "\n"
    assert "no end-of-turn token" in err and "decoding stops on </s>" in err
    [line] = stats_lines(err)
    assert line.startswith(f"stop reason: {stop_reason(expected, tokenizer)} after {len(expected.tokens)} tokens")
    assert "tokens/s" in line and "peak memory" in line


def test_prompt_in_the_training_format_and_samples(eot_checkpoint, capsys):
    full = load_script("generate/full.py")
    model, tokenizer = load_model(eot_checkpoint), Tokenizer.from_dir(eot_checkpoint)
    prompt = encode_prompt(tokenizer, ["How do plants drink water?"])

    full.main(checkpoint_dir=eot_checkpoint, replies=Replies(prompt="How do plants drink water?"),
              sampling=Sampling(temperature=0), stopping=Stopping(max_new_tokens=20))
    out, err = capsys.readouterr()
    assert out == tokenizer.decode(generate(model, prompt, 20, stop_ids=tuple(tokenizer.stop_ids)).tokens) + "\n"
    assert err.startswith("stop reason: ")

    full.main(checkpoint_dir=eot_checkpoint, sampling=Sampling(temperature=1.0, top_k=200, top_p=0.9),
              replies=Replies(prompt="How do plants drink water?", num_samples=3, seed=7),
              stopping=Stopping(max_new_tokens=20))
    out, err = capsys.readouterr()
    samples = [generate(model, prompt, 20, temperature=1.0, top_k=200, top_p=0.9, stop_ids=tuple(tokenizer.stop_ids),
                        generator=torch.Generator().manual_seed(7 + i)) for i in range(3)]
    assert out == "".join(tokenizer.decode(s.tokens) + "\n" for s in samples)
    assert len(stats_lines(err)) == 3

    full.main(checkpoint_dir=eot_checkpoint, replies=Replies(prompt="How do plants", raw=True),
              sampling=Sampling(temperature=0), stopping=Stopping(max_new_tokens=20))
    raw = generate(model, tokenizer.encode("How do plants", bos=True), 20, stop_ids=tuple(tokenizer.stop_ids))
    assert capsys.readouterr().out == tokenizer.decode(raw.tokens) + "\n"


def test_stop_flags(tiny_checkpoint, capsys):
    base = load_script("generate/base.py")
    model, tokenizer = load_model(tiny_checkpoint), Tokenizer.from_dir(tiny_checkpoint)
    ids = tokenizer.encode("The river", bos=True)
    unstopped = generate(model, ids, 30).tokens
    stop = unstopped[5]
    base.main(checkpoint_dir=tiny_checkpoint, replies=Replies(prompt="The river"), sampling=Sampling(temperature=0),
              stopping=Stopping(max_new_tokens=30, stop_on_eos=False, stop_tokens=(str(stop),)))
    out, err = capsys.readouterr()
    assert out == tokenizer.decode(unstopped[: unstopped.index(stop)]) + "\n"
    assert "decoding stops on " + tokenizer.processor.id_to_piece(stop) in err
    assert stats_lines(err)[0].startswith(f"stop reason: {tokenizer.processor.id_to_piece(stop)} after")


def test_prompts_file_replies_to_every_record_in_batches(eot_checkpoint, tmp_path, capsys):
    records = ["How do plants drink water?", "How do cats drink water?",
               {"prompt": "What is rain?", "id": 7},
               ["What is rain?", "Water that falls from clouds.", "And snow?"],
               {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is rain?"}]}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    replies = Replies(prompts_file=tmp_path / "in.jsonl", output_file=tmp_path / "out.jsonl")
    load_script("generate/full.py").main(checkpoint_dir=eot_checkpoint, replies=replies, sampling=Sampling(temperature=0),
                                         stopping=Stopping(max_new_tokens=12))
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o.get("id") for o in out] == [None, None, 7, None, None]
    assert out[1]["prompt"] == "How do cats drink water?" and out[3]["conversations"] == records[3]

    model, tokenizer = load_model(eot_checkpoint), Tokenizer.from_dir(eot_checkpoint)
    prompts = [encode_prompt(tokenizer, turns) for turns in ([records[0]], [records[1]], ["What is rain?"], records[3])]
    prompts.append(encode_prompt(tokenizer, ["What is rain?"], system="Answer briefly."))
    for o, prompt in zip(out, prompts):
        alone = generate(model, prompt, 12, stop_ids=tuple(tokenizer.stop_ids))
        assert o["response"] == tokenizer.decode(alone.tokens) and o["stop_reason"] == stop_reason(alone, tokenizer)
        assert (o["prompt_tokens"], o["new_tokens"]) == (len(prompt), len(alone.tokens))
    assert capsys.readouterr().err.splitlines()[-1].startswith("5 replies, stop reasons: ")  # after the progress bar

    (tmp_path / "bad.jsonl").write_text('"fine"\n{"messages": [{"role": "assistant", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: messages must alternate user, assistant"):
        load_script("generate/full.py").main(checkpoint_dir=eot_checkpoint,
                                             replies=Replies(prompts_file=tmp_path / "bad.jsonl"))


def test_each_reply_to_a_prompts_file_samples_with_its_own_seed(eot_checkpoint, tmp_path):
    """Sample i of record j is the run's reply j x num_samples + i: it samples with seed + j x num_samples + i."""
    questions = ["How do plants drink water?", "What is rain?"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    load_script("generate/full.py").main(checkpoint_dir=eot_checkpoint, sampling=Sampling(temperature=1.0, top_k=200),
                                         replies=Replies(prompts_file=tmp_path / "in.jsonl", num_samples=2, seed=7,
                                                         output_file=tmp_path / "out.jsonl"),
                                         stopping=Stopping(max_new_tokens=8))
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(o["prompt"], o["sample"]) for o in out] == [(q, i) for q in questions for i in range(2)]
    model, tokenizer = load_model(eot_checkpoint), Tokenizer.from_dir(eot_checkpoint)
    for n, o in enumerate(out):
        alone = generate(model, encode_prompt(tokenizer, [o["prompt"]]), 8, temperature=1.0, top_k=200,
                         stop_ids=tuple(tokenizer.stop_ids), generator=torch.Generator().manual_seed(7 + n))
        assert o["response"] == tokenizer.decode(alone.tokens)


@pytest.mark.parametrize("line, reason", [
    ('{"messages": {"role": "user", "content": "hi"}}', "'messages' must be a list of objects"),
    ('{"messages": null}', "'messages' must be a list of objects"),
    ('{"messages": ["hi"]}', "'messages' must be a list of objects"),
    ('{"messages": [{"role": "user", "content": 7}]}', "'messages' must be a list of objects with a 'role' and a text"),
    ('{"conversations": "hey"}', "expected an odd number of text turns"),
    ('"caf\xe9"', "'utf-8' codec can't decode"),
])
def test_every_malformed_prompt_record_is_named_by_file_and_line(line, reason, tmp_path):
    (tmp_path / "prompts.jsonl").write_bytes(b'"fine"\n' + line.encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=f"prompts.jsonl:2: {reason}"):
        read_prompts(tmp_path / "prompts.jsonl")


def test_cli_flags_and_errors(eot_checkpoint):
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)  # noqa: E731
    help_text = run("generate/lora.py", "--help").stdout
    for flag in ("--lora_path", "--prompt", "--top_p", "--num_samples", "--stop_on_eos", "--prompts_file", "--compile"):
        assert flag in help_text
    bad = run("generate/full.py", "--checkpoint_dir", str(eot_checkpoint), "--top_p", "2")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --top_p must be in (0, 1], got 2.0"
