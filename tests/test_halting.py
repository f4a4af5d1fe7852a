"""After a short LoRA fine-tune on the tiny model, replies end on EOT: evaluate_halting.py measures it,
and the generate scripts and chat stop there."""

import json
from pathlib import Path

import pytest

from conftest import REPO, load_script
from lit_llama.checkpoint import load_finetuned
from lit_llama.finetune import DataArgs, RunLayout
from lit_llama.generate import Sampling, Stopping
from lit_llama.inference import ModelSource, Replies
from lit_llama.lora import LoRAConfig
from lit_llama.prepare import PrepareDirs
from lit_llama.prompts import encode_prompt
from lit_llama.streaming import Chat
from lit_llama.training import TrainArgs


@pytest.fixture(scope="module")
def short_rows() -> list[dict]:
    rows = [json.loads(line) for line in (REPO / "data" / "lima_sample.jsonl").open()]
    return [r for r in rows if len(r["conversations"]) == 2 and len(r["conversations"][1].split()) < 25][:8]


@pytest.fixture(scope="module")
def finetuned(tiny_checkpoint: Path, short_rows: list[dict], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data dir, LoRA out dir): eight short conversations, learned well enough to end on EOT."""
    tmp_path = tmp_path_factory.mktemp("halting")
    (tmp_path / "short.jsonl").write_text("\n".join(json.dumps(r) for r in short_rows))
    load_script("scripts/prepare_lima.py").prepare(data_path=tmp_path / "short.jsonl", dirs=PrepareDirs(tiny_checkpoint, tmp_path / "data"))
    train = TrainArgs(learning_rate=3e-3, max_iters=200, warmup_iters=10, global_batch_size=4, micro_batch_size=4,
                      eval_interval=200, eval_iters=1)
    load_script("finetune/lora.py").setup(data=DataArgs(tmp_path / "data", checkpoint_dir=tiny_checkpoint),
                                          layout=RunLayout(tmp_path / "lora"),
                                          lora=LoRAConfig(mlp=True, projection=True), train=train)
    return tmp_path / "data", tmp_path / "lora"


def test_evaluate_halting_on_the_training_prompts(finetuned, tmp_path, capsys):
    data_dir, lora_dir = finetuned
    evaluate = load_script("scripts/evaluate_halting.py").main
    report = evaluate(data_dir=data_dir, source=ModelSource(lora_path=lora_dir), split="train", max_new_tokens=100,
                      output_file=tmp_path / "train.json")
    assert report["eot_rate"] >= 0.9, report
    assert report["prompts"] == 7 and report["eot_rate"] + report["eos_rate"] + report["max_new_tokens_rate"] == pytest.approx(1)
    assert 0.5 < report["length_ratio"] < 2
    assert json.loads((tmp_path / "train.json").read_text()) == report
    table = capsys.readouterr().out
    assert "stopped on EOT" in table and "mean reference length" in table

    # by default each reply's cap follows its reference: max(64, 2 x its tokens)
    capped = evaluate(data_dir=data_dir, source=ModelSource(lora_path=lora_dir), split="train", reference_factor=0.5,
                      min_new_tokens=3, output_file=tmp_path / "capped.json")
    assert capped["caps"] == "caps max(3, 0.5 x reference)"
    for row in capped["rows"]:
        assert row["max_new_tokens"] == max(3, -(-row["reference_tokens"] // 2))
        assert row["new_tokens"] <= row["max_new_tokens"]
        assert row["stop_reason"] != "max_new_tokens" or row["new_tokens"] == row["max_new_tokens"]
    assert capped["max_new_tokens_rate"] > 0  # half the reference's length is too short for most replies
    assert "hit its cap" in capsys.readouterr().out

    held_out = evaluate(data_dir=data_dir, source=ModelSource(lora_path=lora_dir))  # the one val prompt: reported, not judged
    assert held_out["split"] == "val" and (lora_dir / "halting_val.json").is_file()
    print(f"held-out EOT halt rate {held_out['eot_rate']:.2f} over {held_out['prompts']} prompt(s)")


@pytest.mark.parametrize("flag", [dict(reference_factor=0.0), dict(min_new_tokens=0), dict(max_new_tokens=0),
                                  dict(batch_size=0)])
def test_evaluate_halting_checks_its_flags_before_anything_loads(flag, tmp_path):
    with pytest.raises(ValueError, match="--reference_factor must be > 0, and --min_new_tokens, --max_new_tokens and "
                                         "--batch_size at least 1"):  # not the missing dirs, which load later
        load_script("scripts/evaluate_halting.py").main(data_dir=tmp_path / "no_data",
                                                        source=ModelSource(lora_path=tmp_path / "no_lora"), **flag)


def test_replies_stop_on_eot(finetuned, short_rows, tmp_path, capsys):
    _, lora_dir = finetuned
    lora = load_script("generate/lora.py").main
    question, answer = short_rows[0]["conversations"]
    lora(lora_path=lora_dir, replies=Replies(prompt=question), sampling=Sampling(temperature=0),
         stopping=Stopping(max_new_tokens=100))
    out, err = capsys.readouterr()
    assert err.startswith("stop reason: eot")

    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r["conversations"][0]) + "\n" for r in short_rows))
    lora(lora_path=lora_dir, replies=Replies(prompts_file=tmp_path / "in.jsonl", output_file=tmp_path / "out.jsonl"),
         sampling=Sampling(temperature=0), stopping=Stopping(max_new_tokens=100))
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["response"] + "\n" == out
    assert sum(r["stop_reason"] == "eot" for r in rows) >= 7


def test_chat_second_turn_reads_only_the_new_turn(finetuned, short_rows):
    _, lora_dir = finetuned
    model, tokenizer = load_finetuned(lora_dir)
    chat = Chat(model.eval(), tokenizer, max_new_tokens=100)  # greedy
    first = "".join(chat.send(short_rows[0]["conversations"][0]))
    assert chat.last.stop_id == tokenizer.eot_id and tokenizer.encode(first) == chat.last.tokens
    second = short_rows[1]["conversations"][0]
    "".join(chat.send(second))
    assert chat.decoder.prefilled == len(tokenizer.encode(second)) + 2  # the reply's EOT, the message, its EOT
    assert chat.decoder.held[0][: len(encode_prompt(tokenizer, chat.turns[:3]))] == encode_prompt(tokenizer, chat.turns[:3])
    chat.close()


def test_evaluate_halting_on_role_token_data(tiny_checkpoint, short_rows, tmp_path):
    """With role tokens the user's EOT is followed by <|ASSISTANT|>, never trained: the reply's prompt
    ends after it (this used to end in "has no sample with a trained reply to evaluate")."""
    from lit_llama.checkpoint import load_model, save_checkpoint_dir
    from lit_llama.tokenizer import Tokenizer, extend_tokenizer
    from lit_llama.vocab import add_special_tokens

    tokenizer = extend_tokenizer(Tokenizer.from_dir(tiny_checkpoint), role_tokens=True)
    model = load_model(tiny_checkpoint)
    add_special_tokens(model, tokenizer)
    save_checkpoint_dir(model, tokenizer, tmp_path / "roles")
    (tmp_path / "short.jsonl").write_text("\n".join(json.dumps(r) for r in short_rows))
    load_script("scripts/prepare_lima.py").prepare(data_path=tmp_path / "short.jsonl",
                                                   dirs=PrepareDirs(tmp_path / "roles", tmp_path / "data"))
    report = load_script("scripts/evaluate_halting.py").main(data_dir=tmp_path / "data",
                                                             source=ModelSource(checkpoint_dir=tmp_path / "roles"),
                                                             split="train", max_new_tokens=4)
    assert report["prompts"] == 7
