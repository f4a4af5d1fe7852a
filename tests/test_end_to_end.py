"""The user's path on the tiny model: prepare_tiny -> prepare_lima -> finetune/lora.py -> generate/lora.py."""

import csv
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import REPO, load_script
from lit_llama.checkpoint import load_finetuned, load_model
from lit_llama.batches import collate
from lit_llama.dataset import TokenDataset, load_prepared
from lit_llama.finetune import DataArgs, RunLayout
from lit_llama.generate import Sampling, Stopping, generate, stop_reason
from lit_llama.inference import Replies
from lit_llama.lora import LoRAConfig
from lit_llama.loss import loss_sum
from lit_llama.prepare import PrepareDirs, VocabChange
from lit_llama.prompts import encode_prompt
from lit_llama.tokenizer import Tokenizer
from lit_llama.training import TrainArgs, n_targets, next_token_targets
from lit_llama.vocab import add_special_tokens


@torch.no_grad()
def mean_loss(model, data) -> float:
    total, count = 0.0, 0
    for start in range(0, len(data), 8):
        input_ids, labels = collate([data[i] for i in range(start, min(start + 8, len(data)))])
        total += loss_sum(model, input_ids, next_token_targets(labels)).item()
        count += n_targets(labels)
    return total / count


def test_tiny_checkpoint_dir(tiny_checkpoint):
    assert {p.name for p in tiny_checkpoint.iterdir()} == {"lit_model.pth", "model_config.json", "tokenizer.model"}
    config = json.loads((tiny_checkpoint / "model_config.json").read_text())
    assert config["vocab_size"] == 1024 and config["padded_vocab_size"] == 1024


def test_prepare_lima_cli(tiny_checkpoint, tmp_path):
    out = subprocess.run([sys.executable, "scripts/prepare_lima.py", "--data_path", "data/lima_sample.jsonl",
                          "--checkpoint_dir", str(tiny_checkpoint), "--destination_path", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, check=True)
    assert "read 97, kept 97" in out.stdout
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.eot_id == 1024
    train, val = TokenDataset.load(tmp_path / "train.pt"), TokenDataset.load(tmp_path / "val.pt")
    assert len(train) + len(val) == 97 and len(val) == 10
    # every sample: bos first, ends with a trained EOT; user turns masked
    rows = [json.loads(line)["conversations"] for line in (REPO / "data" / "lima_sample.jsonl").open()]
    by_first_turn = {tokenizer.decode(tokenizer.encode(r[0])): r for r in rows}
    for i in range(len(train)):
        ids, mask = train[i]
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eot_id and mask[-1]
        first_eot = ids.tolist().index(tokenizer.eot_id)
        assert not mask[: first_eot + 1].any()
        # decoded back, the sample is its source text plus the special tokens
        turns = by_first_turn[tokenizer.decode(ids[1:first_eot].tolist())]
        assert tokenizer.decode(ids.tolist(), skip_special=False) == "<|eot|>".join(turns) + "<|eot|>"


def test_cli_user_errors_are_one_line(tiny_checkpoint, tmp_path):
    out = subprocess.run([sys.executable, "scripts/prepare_lima.py", "--data_path", str(tmp_path / "missing.jsonl"),
                          "--checkpoint_dir", str(tiny_checkpoint)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: --data_path {tmp_path / 'missing.jsonl'} not found"


def test_lora_finetune_then_generate(tiny_checkpoint, lima_data, tmp_path, capsys):
    out_dir = tmp_path / "lora"
    train = TrainArgs(learning_rate=3e-3, max_iters=24, warmup_iters=2, global_batch_size=8, micro_batch_size=4,
                      eval_interval=12, eval_iters=2)
    load_script("finetune/lora.py").setup(data=DataArgs(lima_data, checkpoint_dir=tiny_checkpoint), layout=RunLayout(out_dir),
                                          train=train)

    with open(out_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == [str(i) for i in range(1, 25)]
    assert [r["step"] for r in rows if r["val_loss"]] == ["12", "24"]

    # the model rebuilt from the out dir fits the training data better than the base did
    tokenizer, train_data, _ = load_prepared(lima_data, tiny_checkpoint)
    base = load_model(tiny_checkpoint)
    add_special_tokens(base, tokenizer)
    tuned, _ = load_finetuned(out_dir)
    assert mean_loss(tuned, train_data) < mean_loss(base, train_data) - 0.05

    assert {p.name for p in out_dir.iterdir()} >= {"lit_model_lora.pth", "hyperparameters.json", "model_config.json",
                                                   "tokenizer.model", "special_tokens.json", "metrics.csv", "training_state.pth"}
    hparams = json.loads((out_dir / "hyperparameters.json").read_text())
    assert hparams["checkpoint_dir"] == str(tiny_checkpoint.resolve()) and hparams["lora"] == vars(LoRAConfig())
    assert json.loads((out_dir / "model_config.json").read_text())["vocab_size"] == 1025
    # only LoRA matrices and the EOT rows are saved: small
    trained = torch.load(out_dir / "lit_model_lora.pth", weights_only=True)
    assert {k for k in trained if not k.endswith(("lora_A", "lora_B"))} == {"token_rows.ids", "token_rows.wte", "token_rows.lm_head"}
    assert trained["token_rows.ids"].tolist() == [1024] and trained["token_rows.wte"].shape == (1, 128)

    capsys.readouterr()
    load_script("generate/lora.py").main(replies=Replies(prompt="How often should I water a cactus?"), lora_path=out_dir,
                                         stopping=Stopping(max_new_tokens=20), sampling=Sampling(temperature=0))
    captured = capsys.readouterr()
    assert captured.err.startswith("stop reason: ") and "tokens/s" in captured.err
    assert "<|eot|>" not in captured.out


def test_repurposed_piece_found_in_the_data_is_refused_unless_allowed(tiny_checkpoint, tmp_path, capsys):
    prepare = load_script("scripts/prepare_lima.py").prepare
    data_path = REPO / "data" / "lima_sample.jsonl"
    with pytest.raises(ValueError, match="the repurposed piece 'ñ' occurs 3 times in the data"):
        prepare(data_path=data_path, dirs=PrepareDirs(tiny_checkpoint, tmp_path), vocab=VocabChange(repurpose_eot="ñ"))
    prepare(data_path=data_path, dirs=PrepareDirs(tiny_checkpoint, tmp_path),
            vocab=VocabChange(repurpose_eot="ñ", allow_repurposed_in_data=True))
    assert "occurs 3 times in the data (encoded with other pieces)" in capsys.readouterr().out
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.eot_id == 1023 and tokenizer.vocab_size == 1024
    # "jalapeño" survives, spelled with other pieces, and id 1023 appears only as the EOT of each turn
    samples = [d[i][0] for d in (TokenDataset.load(tmp_path / f"{n}.pt") for n in ("train", "val")) for i in range(len(d))]
    assert sum(tokenizer.decode(ids.tolist()).count("ñ") for ids in samples) == 3
    rows = [json.loads(line)["conversations"] for line in data_path.open()]
    assert sum(int((ids == 1023).sum()) for ids in samples) == sum(len(turns) for turns in rows)


@pytest.mark.parametrize("repurpose_eot", [None, "▁twenty"], ids=["append", "repurpose"])
def test_both_modes_learn_to_halt_on_eot(tiny_checkpoint, tmp_path, repurpose_eot):
    rows = [json.loads(line) for line in (REPO / "data" / "lima_sample.jsonl").open()]
    short = [r for r in rows if len(r["conversations"]) == 2 and len(r["conversations"][1].split()) < 25][:8]
    (tmp_path / "short.jsonl").write_text("\n".join(json.dumps(r) for r in short))
    load_script("scripts/prepare_lima.py").prepare(data_path=tmp_path / "short.jsonl",
                                                   dirs=PrepareDirs(tiny_checkpoint, tmp_path / "data"),
                                                   vocab=VocabChange(repurpose_eot=repurpose_eot))
    train = TrainArgs(learning_rate=3e-3, max_iters=200, warmup_iters=10, global_batch_size=4, micro_batch_size=4,
                      eval_interval=200, eval_iters=1)
    load_script("finetune/lora.py").setup(data=DataArgs(tmp_path / "data", checkpoint_dir=tiny_checkpoint),
                                          layout=RunLayout(tmp_path / "out"),
                                          lora=LoRAConfig(mlp=True, projection=True), train=train)
    model, tokenizer = load_finetuned(tmp_path / "out")
    assert tokenizer.eot_id == (1024 if repurpose_eot is None else 823)
    results = [generate(model.eval(), encode_prompt(tokenizer, [r["conversations"][0]]), 100, stop_ids=tuple(tokenizer.stop_ids))
               for r in short]
    halted = [r for r in results if stop_reason(r, tokenizer) == "eot" and len(r.tokens) >= 3]
    assert len(halted) >= 7, [(stop_reason(r, tokenizer), len(r.tokens)) for r in results]


def test_a_second_round_reuses_the_eot_and_its_trained_rows(tiny_checkpoint, tmp_path, capsys):
    """Round 1 (LoRA) -> merge -> prepare other data for the merged checkpoint -> round 2 (LoRA) on it:
    the same EOT id, no new token, rows kept (even with --token_init normal, which applies only to new
    tokens), and the replies still end on EOT."""
    rows = [json.loads(line) for line in (REPO / "data" / "lima_sample.jsonl").open()]
    short = [r for r in rows if len(r["conversations"]) == 2 and len(r["conversations"][1].split()) < 25]
    prepare = load_script("scripts/prepare_lima.py").prepare
    train = TrainArgs(learning_rate=3e-3, max_iters=200, warmup_iters=10, global_batch_size=4, micro_batch_size=4,
                      eval_interval=200, eval_iters=1)
    lora = LoRAConfig(mlp=True, projection=True)
    for round_, part, base in ((1, short[:8], tiny_checkpoint), (2, short[8:16], tmp_path / "merged")):
        (tmp_path / f"round{round_}.jsonl").write_text("\n".join(json.dumps(r) for r in part))
        prepare(data_path=tmp_path / f"round{round_}.jsonl", dirs=PrepareDirs(base, tmp_path / f"data{round_}"))
        load_script("finetune/lora.py").setup(data=DataArgs(tmp_path / f"data{round_}", checkpoint_dir=base, token_init="normal"),
                                              layout=RunLayout(tmp_path / f"out{round_}"), lora=lora,
                                              train=replace(train, max_iters=200 if round_ == 1 else 60))
        if round_ == 1:
            load_script("scripts/merge_lora.py").main(lora_path=tmp_path / "out1", out_dir=tmp_path / "merged")
    assert "EOT '<|eot|>' = id 1024 (the checkpoint's own, from an earlier round)" in capsys.readouterr().out
    assert Tokenizer.from_dir(tmp_path / "data2").special == Tokenizer.from_dir(tmp_path / "merged").special
    merged_rows = load_model(tmp_path / "merged").lm_head.weight[1024]
    trained = torch.load(tmp_path / "out2" / "lit_model_lora.pth", weights_only=True)
    # trained further from the merged row: a normal draw would sit about 1 away in every dimension
    assert 0 < (trained["token_rows.lm_head"][0] - merged_rows).abs().max() < 0.2

    model, tokenizer = load_finetuned(tmp_path / "out2")
    results = [generate(model.eval(), encode_prompt(tokenizer, [r["conversations"][0]]), 100,
                        stop_ids=tuple(tokenizer.stop_ids)) for r in short[8:16]]
    assert sum(stop_reason(r, tokenizer) == "eot" for r in results) >= 7, [stop_reason(r, tokenizer) for r in results]


def test_merging_an_adapter_is_refused_in_one_line(tiny_checkpoint, lima_data, tmp_path):
    load_script("finetune/adapter.py").setup(data=DataArgs(lima_data, checkpoint_dir=tiny_checkpoint), layout=RunLayout(tmp_path / "a"),
                                             train=TrainArgs(max_iters=1, global_batch_size=2, micro_batch_size=2, eval_iters=1))
    with pytest.raises(ValueError, match=r"is an adapter out dir: .* Generate with generate/adapter.py --adapter_path"):
        load_script("scripts/merge_lora.py").main(lora_path=tmp_path / "a", out_dir=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
