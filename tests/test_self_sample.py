"""scripts/self_sample.py on the tiny models: echo prompts, per-row seeds, resuming a killed run, the
blank-line stop of a base model, and the cap."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, load_script
from lit_llama.checkpoint import load_model, save_checkpoint_dir
from lit_llama.errors import BadValue
from lit_llama.generate import ContinuousBatch, Request, generate
from lit_llama.inference import ModelSource
from lit_llama.loss import loss_sum
from lit_llama.prepare import PrepareDirs
from lit_llama.self_sample import Server, echo_prompt
from lit_llama.tokenizer import Tokenizer

QUERIES = ["How do plants drink water?", "What is rain?", "Name a river.\n\nIn Africa.", "What is snow?", "Why is the sky blue?"]
ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUERIES[0]},
                  {"role": "assistant", "content": "Through their roots."}]},
    {"conversations": [QUERIES[1], "Water that falls from clouds.", "And snow?", "Frozen rain."]},
    {"instruction": "Name a river.", "input": "In Africa.", "output": "The Nile."},
    {"messages": [{"role": "user", "content": QUERIES[3]}, {"role": "assistant", "content": "Frozen water."}]},
    {"conversations": [QUERIES[4], "Air scatters blue light the most."]},
]
REFERENCES = ["Through their roots.", "Water that falls from clouds.", "The Nile.", "Frozen water.",
              "Air scatters blue light the most."]


@pytest.fixture(scope="module")
def self_sample():
    return load_script("scripts/self_sample.py")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mixed_input_makes_rows_prepare_conversations_reads(self_sample, eot_checkpoint, tmp_path, capsys):
    long_query = "word " * 300  # echoed twice it outgrows the context of 512
    data = write_jsonl(tmp_path / "in.jsonl", [ROWS[0], ROWS[1], "not json", ROWS[2], {"question": "?"},
                                               {"conversations": [long_query, "ok"]}])
    summary = self_sample.main(data_path=data, destination_path=tmp_path / "new" / "cache.jsonl",
                               source=ModelSource(checkpoint_dir=eot_checkpoint), max_new_tokens=16,
                               keep_unfinished=True)
    out, err = capsys.readouterr()
    assert f"{data}:3: skipped: invalid JSON" in err
    assert f"{data}:5: skipped: neither 'messages', 'conversations' nor an Alpaca 'instruction'" in err
    assert f"{data}:6: skipped: the echo prompt leaves no room for a reply" in err
    assert summary["read"] == 6 and sum(summary["bad_rows"].values()) == 2 and summary["too_long"] == 1
    assert summary["written"] == 3 and summary["empty_reply"] == 0
    assert out.strip().startswith("read 6 rows; replies cached: 3 new, 0 from before, 3 in all") and "2 bad rows" in out and "1 too long" in out

    rows = read_jsonl(tmp_path / "new" / "cache.jsonl")
    assert sorted((r["index"], r["source"]) for r in rows) == [(0, f"{data}:1"), (1, f"{data}:2"), (2, f"{data}:4")]
    for row in rows:
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": QUERIES[row["index"]]}  # the system message is left out
        assert assistant["role"] == "assistant" and assistant["content"] == assistant["content"].strip() != ""

    load_script("scripts/prepare_conversations.py").prepare(
        data_path=tmp_path / "new" / "cache.jsonl", dirs=PrepareDirs(eot_checkpoint, tmp_path / "prepared"))
    prepared = json.loads((tmp_path / "prepared" / "prepare.json").read_text())
    assert (prepared["train"], prepared["val"], prepared["report"]["dropped"]) == (2, 1, {})


def test_reply_is_the_echo_prompts_sample_with_the_rows_seed(self_sample, eot_checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", ROWS[:3])
    self_sample.main(data_path=data, destination_path=tmp_path / "cache.jsonl",
                     source=ModelSource(checkpoint_dir=eot_checkpoint), max_new_tokens=12, seed=7, batch_size=2,
                     keep_unfinished=True)
    rows = read_jsonl(tmp_path / "cache.jsonl")
    assert sorted(r["index"] for r in rows) == [0, 1, 2]

    model, tokenizer = load_model(eot_checkpoint), Tokenizer.from_dir(eot_checkpoint)
    bos, eot = tokenizer.bos_id, tokenizer.eot_id
    for row in rows:
        query, reference = QUERIES[row["index"]], REFERENCES[row["index"]]
        prompt = echo_prompt(tokenizer, query, reference)
        assert prompt == [bos, *tokenizer.encode(query), eot, *tokenizer.encode(reference), eot, *tokenizer.encode(query), eot]
        alone = generate(model, prompt, 12, temperature=0.7, top_p=0.95, stop_ids=tuple(tokenizer.stop_ids),
                         generator=torch.Generator().manual_seed(7 + row["index"]))
        assert row["messages"][1]["content"] == tokenizer.decode(alone.tokens).strip()


def test_a_killed_run_resumes_to_the_same_rows(self_sample, eot_checkpoint, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", ROWS)
    settings = dict(data_path=data, source=ModelSource(checkpoint_dir=eot_checkpoint), max_new_tokens=8, batch_size=2,
                    keep_unfinished=True)
    self_sample.main(destination_path=tmp_path / "full.jsonl", **settings)
    full = (tmp_path / "full.jsonl").read_text().splitlines()
    assert len(full) == 5

    # killed while writing the fourth row: three whole rows and half a line
    (tmp_path / "killed.jsonl").write_text("".join(line + "\n" for line in full[:3]) + full[3][: len(full[3]) // 2])
    capsys.readouterr()
    summary = self_sample.main(destination_path=tmp_path / "killed.jsonl", **settings)
    assert "removed a last line cut short" in capsys.readouterr().err
    assert (summary["resumed"], summary["written"], summary["cached"]) == (3, 2, 5)
    assert sorted((tmp_path / "killed.jsonl").read_text().splitlines()) == sorted(full)

    other = write_jsonl(tmp_path / "other.jsonl", ROWS[1:])
    with pytest.raises(ValueError, match="holds a reply to another query as row 0"):
        self_sample.main(**{**settings, "data_path": other}, destination_path=tmp_path / "full.jsonl")


def train_to_end_paragraphs(checkpoint_dir: Path, text: str, out_dir: Path) -> None:
    """The base model, trained a little on `text` (paragraphs between blank lines), as a checkpoint dir."""
    torch.manual_seed(0)
    model, tokenizer = load_model(checkpoint_dir), Tokenizer.from_dir(checkpoint_dir)
    ids = torch.tensor([tokenizer.encode(text, bos=True)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss_sum(model, ids[:, :-1], ids[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    save_checkpoint_dir(model.eval(), tokenizer, out_dir)


def test_base_model_gets_plain_text_and_stops_at_a_blank_line(self_sample, tiny_checkpoint, tmp_path, monkeypatch):
    query, reference, own = "Name a red fruit.", "An apple is red.", "A cherry is red too."
    train_to_end_paragraphs(tiny_checkpoint, f"{query}\n\n{reference}\n\n{query}\n\n{own}\n\nThe river is long and wide.",
                            tmp_path / "paragraphs")
    model, tokenizer = load_model(tmp_path / "paragraphs"), Tokenizer.from_dir(tmp_path / "paragraphs")
    prompt = echo_prompt(tokenizer, query, reference)
    assert tokenizer.eot_id is None and prompt[0] == tokenizer.bos_id
    assert tokenizer.decode(prompt) == f"{query}\n\n{reference}\n\n{query}\n\n"
    uncut = generate(model, prompt, 24, stop_ids=(tokenizer.eos_id,)).tokens
    blank = next(k for k in range(1, len(uncut) + 1) if "\n\n" in tokenizer.decode(uncut[:k]))
    assert tokenizer.decode(uncut[blank:]).strip(), "the trained model should go on after the blank line"

    cancelled, cancel = [], ContinuousBatch.cancel

    def spy(batch: ContinuousBatch, request: Request) -> None:
        cancelled.append(list(request.generation.tokens))  # what was decoded when the row was given up
        cancel(batch, request)

    monkeypatch.setattr(ContinuousBatch, "cancel", spy)
    data = write_jsonl(tmp_path / "in.jsonl", [{"instruction": query, "output": reference}])
    summary = self_sample.main(data_path=data, destination_path=tmp_path / "cache.jsonl",
                               source=ModelSource(checkpoint_dir=tmp_path / "paragraphs"), temperature=0,
                               max_new_tokens=24)
    [row] = read_jsonl(tmp_path / "cache.jsonl")
    assert row["messages"][1]["content"] == tokenizer.decode(uncut).split("\n\n")[0].strip() == own
    assert row["stop_reason"] == "blank line" and summary["hit_cap"] == 0
    assert cancelled == [uncut[:blank]]  # decoding stopped at the blank line, short of the cap of 24

    # a blank line on the very token that reaches the cap ends the paragraph all the same: the reply is kept
    summary = self_sample.main(data_path=data, destination_path=tmp_path / "capped.jsonl",
                               source=ModelSource(checkpoint_dir=tmp_path / "paragraphs"), temperature=0,
                               max_new_tokens=blank)
    [row] = read_jsonl(tmp_path / "capped.jsonl")
    assert (row["messages"][1]["content"], row["stop_reason"], summary["hit_cap"]) == (own, "blank line", 0)
    assert len(cancelled) == 1


def test_replies_cut_off_at_the_cap_are_dropped_unless_kept(self_sample, eot_checkpoint, tmp_path, capsys):
    data = tmp_path / "in.json"
    data.write_text(json.dumps(ROWS[:4]))  # a JSON array works as well as JSONL
    dropped = self_sample.main(data_path=data, destination_path=tmp_path / "dropped.jsonl",
                               source=ModelSource(checkpoint_dir=eot_checkpoint), max_new_tokens=2, max_rows=3)
    assert dropped["read"] == 3 and dropped["hit_cap"] > 0 and dropped["unfinished_kept"] == 0
    assert dropped["written"] + dropped["hit_cap"] + dropped["empty_reply"] == 3
    assert all(r["stop_reason"] != "max_new_tokens" for r in read_jsonl(tmp_path / "dropped.jsonl"))
    assert f"{data}[" in capsys.readouterr().err  # the first such row named by file[index]

    kept = self_sample.main(data_path=data, destination_path=tmp_path / "kept.jsonl",
                            source=ModelSource(checkpoint_dir=eot_checkpoint), max_new_tokens=2, max_rows=3,
                            keep_unfinished=True)
    rows = read_jsonl(tmp_path / "kept.jsonl")
    assert kept["unfinished_kept"] == dropped["hit_cap"] == sum(r["stop_reason"] == "max_new_tokens" for r in rows)
    assert len(rows) == dropped["written"] + dropped["hit_cap"]


def test_cli_help_and_errors(self_sample, tmp_path):
    with pytest.raises(ValueError, match="--destination_path .* is a directory"):
        self_sample.main(data_path=write_jsonl(tmp_path / "in.jsonl", ROWS), destination_path=tmp_path)
    run = lambda *args: subprocess.run([sys.executable, "scripts/self_sample.py", *args], cwd=REPO,  # noqa: E731
                                       capture_output=True, text=True)
    help_text = run("--help").stdout
    for flag in ("--data_path", "--destination_path", "--lora_path", "--temperature", "--top_p", "--max_new_tokens",
                 "--batch_size", "--seed", "--max_rows", "--precision", "--keep_unfinished"):
        assert flag in help_text
    missing = run("--data_path", str(tmp_path / "nope.jsonl"), "--destination_path", str(tmp_path / "out.jsonl"))
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: --data_path {tmp_path / 'nope.jsonl'} not found"


def test_sampling_through_the_server_caches_the_in_process_replies(self_sample, eot_checkpoint, tmp_path):
    """--base_url: the echo prompts go to generate/serve.py's chat endpoint, four at a time, and greedy
    replies are those decoded in process; a second run finds them all cached."""
    from test_serve import start_server

    data = write_jsonl(tmp_path / "in.jsonl", ROWS)
    local = tmp_path / "local.jsonl"
    self_sample.main(data_path=data, destination_path=local, source=ModelSource(checkpoint_dir=eot_checkpoint),
                     temperature=0.0, max_new_tokens=12, keep_unfinished=True)  # the tiny model seldom stops
    process, url = start_server(eot_checkpoint)
    try:
        remote = tmp_path / "remote.jsonl"
        summary = self_sample.main(data_path=data, destination_path=remote, server=Server(url, "eot", concurrency=4),
                                   temperature=0.0, max_new_tokens=12, keep_unfinished=True)
        assert summary["written"] == len(ROWS)
        again = self_sample.main(data_path=data, destination_path=remote, server=Server(url, "eot"), max_new_tokens=12)
        assert again["written"] == 0 and again["resumed"] == len(ROWS)
        with pytest.raises(BadValue, match="answered 404"):
            self_sample.main(data_path=data, destination_path=tmp_path / "other.jsonl", server=Server(url, "gpt-4"))
    finally:
        process.terminate()
        process.wait(timeout=60)
    by_index = lambda path: {row["index"]: row for row in read_jsonl(path)}  # noqa: E731
    ours, theirs = by_index(local), by_index(remote)
    assert {i: row["messages"] for i, row in ours.items()} == {i: row["messages"] for i, row in theirs.items()}
    for i, row in ours.items():
        assert theirs[i]["stop_reason"] == ("max_new_tokens" if row["stop_reason"] == "max_new_tokens" else "stop")
    with pytest.raises(BadValue, match="is the server running"):
        self_sample.main(data_path=data, destination_path=tmp_path / "none.jsonl", server=Server(url, "eot"))
