"""The three finetune scripts on the tiny model: training, what they save, resuming, accumulation
(several processes: tests/test_distributed.py)."""

import csv
import itertools
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, load_script
from lit_llama.adapter import AdapterConfig
from lit_llama.batches import Mixture, collate, shuffled_indices
from lit_llama.checkpoint import load_finetuned, load_model, load_state_dict
from lit_llama.cli import build_parser, run
from lit_llama.dataset import TokenDataset, load_mix, load_prepared
from lit_llama.finetune import DataArgs, RunLayout
from lit_llama.generate import Sampling, Stopping
from lit_llama.inference import Replies
from lit_llama.lora import LoRAConfig
from lit_llama.loss import loss_sum
from lit_llama.prepare import PrepareDirs, VocabChange
from lit_llama.tokenizer import Tokenizer
from lit_llama.training import TrainArgs, lr_at_step, micro_batches_of_rank, n_targets, next_token_targets
from lit_llama.vocab import add_special_tokens

SHORT = dict(warmup_iters=2, global_batch_size=4, micro_batch_size=2, eval_interval=100, eval_iters=1, save_interval=0)


@torch.no_grad()
def train_loss(model, data) -> float:
    total, count = 0.0, 0
    for start in range(0, len(data), 8):
        input_ids, labels = collate([data[i] for i in range(start, min(start + 8, len(data)))])
        total += loss_sum(model, input_ids, next_token_targets(labels)).item()
        count += n_targets(labels)
    return total / count


@pytest.fixture(scope="module")
def base_train_loss(tiny_checkpoint, lima_data) -> float:
    tokenizer, train_data, _ = load_prepared(lima_data, tiny_checkpoint)
    base = load_model(tiny_checkpoint)
    add_special_tokens(base, tokenizer)
    return train_loss(base, train_data)


def test_adapter_trains_saves_only_its_parameters_and_generates(tiny_checkpoint, lima_data, base_train_loss, tmp_path, capsys):
    out_dir = tmp_path / "adapter"
    load_script("finetune/adapter.py").setup(data=DataArgs(lima_data, checkpoint_dir=tiny_checkpoint), layout=RunLayout(out_dir),
                                             adapter=AdapterConfig(prompt_length=4, start_layer=2),
                                             train=TrainArgs(learning_rate=1e-2, max_iters=16, **SHORT))
    saved = load_state_dict(out_dir / "lit_model_adapter.pth")
    assert set(saved) == {f"transformer.h.{i}.attn.{name}" for i in (2, 3) for name in ("adapter_wte.weight", "gating_factor")} \
        | {"token_rows.ids", "token_rows.wte", "token_rows.lm_head"}
    assert saved["transformer.h.2.attn.adapter_wte.weight"].shape == (4, 128)
    assert saved["transformer.h.2.attn.gating_factor"].abs().sum() > 0  # the gates opened

    model, _ = load_finetuned(out_dir)
    _, train_data, _ = load_prepared(lima_data, tiny_checkpoint)
    assert train_loss(model, train_data) < base_train_loss - 0.02

    capsys.readouterr()
    load_script("generate/adapter.py").main(replies=Replies(prompt="What is rain?"), adapter_path=out_dir,
                                            stopping=Stopping(max_new_tokens=8), sampling=Sampling(temperature=0))
    assert capsys.readouterr().err.startswith("stop reason: ")


def test_adapter_starts_as_the_base_model(tiny_checkpoint):
    from lit_llama.adapter import inject_adapter

    model = load_model(tiny_checkpoint)
    idx = torch.randint(0, 1024, (2, 12))
    before = model(idx)
    inject_adapter(model, AdapterConfig())
    torch.testing.assert_close(model(idx), before)  # zero gates


def test_full_finetune_writes_a_checkpoint_dir(tiny_checkpoint, lima_data, base_train_loss, tmp_path, capsys):
    out_dir = tmp_path / "full"
    load_script("finetune/full.py").setup(data=DataArgs(lima_data, checkpoint_dir=tiny_checkpoint), layout=RunLayout(out_dir),
                                          train=TrainArgs(learning_rate=1e-3, max_iters=8, **SHORT))
    model = load_model(out_dir)  # a plain checkpoint dir, with the EOT
    assert model.config.vocab_size == 1025 and Tokenizer.from_dir(out_dir).eot_id == 1024
    _, train_data, _ = load_prepared(lima_data, tiny_checkpoint)
    assert train_loss(model, train_data) < base_train_loss - 0.1
    capsys.readouterr()
    load_script("generate/full.py").main(replies=Replies(prompt="What is rain?"), checkpoint_dir=out_dir,
                                         stopping=Stopping(max_new_tokens=8), sampling=Sampling(temperature=0))
    assert capsys.readouterr().err.startswith("stop reason: ")


def test_merge_lora_gives_a_checkpoint_dir_with_the_same_outputs(tiny_checkpoint, lima_data, tmp_path):
    out_dir = tmp_path / "lora"
    load_script("finetune/lora.py").setup(data=DataArgs(lima_data, checkpoint_dir=tiny_checkpoint), layout=RunLayout(out_dir),
                                          lora=LoRAConfig(mlp=True, head=True), train=TrainArgs(learning_rate=1e-2, max_iters=4, **SHORT))
    load_script("scripts/merge_lora.py").main(lora_path=out_dir, out_dir=tmp_path / "merged")
    merged = load_model(tmp_path / "merged")
    assert set(merged.state_dict()) == set(load_model(tiny_checkpoint).state_dict())
    tuned, _ = load_finetuned(out_dir)
    idx = torch.tensor([[1, 50, 1024, 60, 7]])
    torch.testing.assert_close(merged(idx), tuned(idx))
    assert Tokenizer.from_dir(tmp_path / "merged").eot_id == 1024


def test_accumulation_matches_one_big_batch(tiny_checkpoint, lima_data, tmp_path):
    """Loss per supervised token of the whole step: two micro-batches of 2 update exactly like one of 4."""
    common = dict(learning_rate=1e-2, max_iters=3, warmup_iters=1, global_batch_size=4, eval_interval=100, eval_iters=1, save_interval=0)
    for micro in (2, 4):
        load_script("finetune/lora.py").setup(data=DataArgs(lima_data, checkpoint_dir=tiny_checkpoint),
                                              layout=RunLayout(tmp_path / str(micro)),
                                              lora=LoRAConfig(dropout=0.0), train=TrainArgs(micro_batch_size=micro, **common))
    a, b = load_state_dict(tmp_path / "2" / "lit_model_lora.pth"), load_state_dict(tmp_path / "4" / "lit_model_lora.pth")
    assert a["token_rows.lm_head"].abs().sum() > 0
    for name in a:  # micro-batches of other shapes round differently; a per-micro-batch mean moves weights by ~lr = 1e-2
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3)


def run_script(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_killed_run_resumes_to_the_same_weights(tiny_checkpoint, lima_data, tmp_path):
    """With LoRA dropout on: the random state (CPU, and every CUDA device where there are some) is saved
    with each checkpoint, so the resumed run draws the same dropout masks."""
    flags = ["--data_dir", str(lima_data), "--checkpoint_dir", str(tiny_checkpoint), "--lora.dropout", "0.1",
             "--train.learning_rate", "1e-2",
             "--train.max_iters", "10", "--train.warmup_iters", "2", "--train.global_batch_size", "4",
             "--train.micro_batch_size", "2", "--train.save_interval", "2", "--train.eval_interval", "5", "--train.eval_iters", "1"]
    uninterrupted = tmp_path / "whole"
    assert run_script("finetune/lora.py", *flags, "--out_dir", str(uninterrupted)).wait() == 0

    killed = tmp_path / "killed"
    proc = run_script("finetune/lora.py", *flags, "--out_dir", str(killed))
    deadline = time.time() + 120
    while not (killed / "training_state.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(killed / "training_state.pth", weights_only=True)
    saved_step = state["step"]
    assert saved_step < 10  # killed mid-way
    assert len(state["rng"]) == 1 and state["rng"][0].keys() == ({"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"})
    resumed = run_script("finetune/lora.py", *flags, "--out_dir", str(killed), "--resume", "true")
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    assert f"resuming from step {saved_step}" in output

    a, b = load_state_dict(uninterrupted / "lit_model_lora.pth"), load_state_dict(killed / "lit_model_lora.pth")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    steps = [line.split(",")[0] for line in (killed / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [str(i) for i in range(1, 11)]  # each step once


@pytest.mark.parametrize("method", ["lora", "adapter", "full"])
def test_token_rows_learn_at_the_scaled_rate(tiny_checkpoint, lima_data, tmp_path, method):
    """AdamW's first step moves every weight with a gradient by its learning rate: the special tokens' rows
    by learning_rate x token_lr_scale, the method's own weights (under full: every other weight) by
    learning_rate."""
    tokenizer, _, _ = load_prepared(lima_data, tiny_checkpoint)
    base = load_model(tiny_checkpoint)
    add_special_tokens(base, tokenizer)  # the rows as training starts them
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    config = {"lora": {"lora": LoRAConfig(dropout=0.0)}, "adapter": {"adapter": AdapterConfig()}, "full": {}}[method]
    lr = 1e-3
    for scale in (0.0, 1.0, 10.0):
        out_dir = tmp_path / f"{method}{scale}"
        load_script(f"finetune/{method}.py").setup(
            data=DataArgs(lima_data, checkpoint_dir=tiny_checkpoint), layout=RunLayout(out_dir), **config,
            train=TrainArgs(learning_rate=lr, max_iters=1, warmup_iters=1, global_batch_size=2, micro_batch_size=2,
                            eval_iters=1, token_lr_scale=scale))
        if method == "full":  # a plain checkpoint dir: the rows are folded into wte and lm_head
            trained = load_model(out_dir).state_dict()
            rows = {name: trained[f"{prefix}.weight"][1024:1025] for name, prefix in (("wte", "transformer.wte"),
                                                                                      ("lm_head", "lm_head"))}
            others = {name: trained[name] - before[name] for name in ("transformer.h.0.attn.c_attn.weight",
                                                                      "transformer.h.3.mlp.c_proj.weight")}
            others["lm_head.weight"] = (trained["lm_head.weight"] - before["lm_head.weight"])[:1024]
        else:
            trained = load_state_dict(out_dir / f"lit_model_{method}.pth")
            rows = {name: trained[f"token_rows.{name}"] for name in ("wte", "lm_head")}
            # these start at zero: what they hold is their step
            others = {name: tensor for name, tensor in trained.items() if name.endswith(("lora_B", "gating_factor"))}
        for name in ("wte", "lm_head"):
            step = (rows[name] - before[f"{'transformer.wte' if name == 'wte' else 'lm_head'}.weight"][1024:1025]).abs()
            assert step.max().item() == pytest.approx(lr * scale, rel=1e-3, abs=1e-9), (scale, name)
        assert others and all(step.abs().max().item() == pytest.approx(lr, rel=1e-3) for step in others.values())


def test_a_negative_token_lr_scale_is_refused(tiny_checkpoint, lima_data, tmp_path):
    with pytest.raises(ValueError, match="--train.token_lr_scale must be >= 0, got -1"):
        load_script("finetune/lora.py").setup(data=DataArgs(lima_data, checkpoint_dir=tiny_checkpoint),
                                              layout=RunLayout(tmp_path / "lora"), train=TrainArgs(token_lr_scale=-1))
    assert not (tmp_path / "lora").exists()


def test_learning_rate_warms_up_then_decays_by_cosine_or_linearly():
    cosine = TrainArgs(learning_rate=1e-3, min_learning_rate=1e-4, warmup_iters=2)
    assert [lr_at_step(step, cosine, 12) for step in (0, 1, 2)] == [5e-4, 1e-3, 1e-3]
    assert lr_at_step(7, cosine, 12) == pytest.approx(5.5e-4)  # halfway through the decay: the midpoint
    assert lr_at_step(12, cosine, 12) == pytest.approx(1e-4)
    lima = TrainArgs(learning_rate=1e-5, min_learning_rate=1e-6, warmup_iters=0, lr_schedule="linear")
    lrs = [lr_at_step(step, lima, 10) for step in range(11)]
    assert lrs[0] == 1e-5 and lrs[-1] == pytest.approx(1e-6)  # no warmup: the first step is at the peak
    assert [a - b for a, b in zip(lrs, lrs[1:])] == pytest.approx([9e-7] * 10)  # equal steps down


def test_micro_batches_split_each_step_across_ranks_and_resume_where_they_left_off():
    lengths = torch.randint(1, 60, (40,), generator=torch.Generator().manual_seed(0))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    n = int(offsets[-1])
    data = Mixture(TokenDataset(torch.zeros(n, dtype=torch.int32), torch.ones(n, dtype=torch.bool), offsets))
    for grouped in (False, True):
        args = TrainArgs(global_batch_size=8, micro_batch_size=2, group_by_length=grouped, seed=5)
        alone = list(itertools.islice(micro_batches_of_rank(data, args, 1, 0), 12))  # 3 steps of 4 micro-batches
        ranks = [list(itertools.islice(micro_batches_of_rank(data, args, 2, r), 6)) for r in (0, 1)]
        for step in range(3):  # two ranks train on the same samples per step as one process
            both = ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2]
            assert sorted(sum(alone[4 * step : 4 * step + 4], [])) == sorted(sum(both, []))
        assert list(itertools.islice(micro_batches_of_rank(data, args, 1, 0, start_step=2), 4)) == alone[8:12]
        if not grouped:  # one process: consecutive samples of the shuffled order, as before grouping existed
            assert sum(alone, []) == list(itertools.islice(shuffled_indices(len(data), 5), 24))

    def one_epoch(grouped: bool) -> list[list[int]]:
        args = TrainArgs(global_batch_size=2, micro_batch_size=2, group_by_length=grouped, seed=5)
        return list(itertools.islice(micro_batches_of_rank(data, args, 1, 0), 20))

    def spread(batches: list[list[int]]) -> int:  # the padding a batch needs, summed
        return sum(int(lengths[b].max() - lengths[b].min()) for b in batches)

    assert sorted(sum(one_epoch(True), [])) == list(range(40))  # every sample once per epoch
    assert spread(one_epoch(True)) < spread(one_epoch(False)) / 2


@pytest.fixture(scope="module")
def alpaca_mix(tiny_checkpoint, tmp_path_factory) -> Path:
    """The shipped Alpaca sample prepared for the tiny checkpoint: a second data dir to mix in."""
    destination = tmp_path_factory.mktemp("data") / "alpaca"
    load_script("scripts/prepare_alpaca.py").prepare(data_path=REPO / "data" / "alpaca_sample.json",
                                                     dirs=PrepareDirs(tiny_checkpoint, destination))
    return destination


def test_a_mixed_in_data_dir_trains_beside_the_task_and_every_loss_is_reported_apart(
        tiny_checkpoint, lima_data, alpaca_mix, tmp_path):
    """--mix_dir: step 1's task and mix losses are the untouched base model's on the samples the order
    gives each; validation reports its loss at end-of-turn targets apart; resuming needs the same mix."""
    out_dir = tmp_path / "mixed"
    args = TrainArgs(learning_rate=1e-2, max_iters=4, warmup_iters=1, global_batch_size=4, micro_batch_size=2,
                     eval_interval=2, eval_iters=1, save_interval=0, token_lr_scale=10.0)
    setup = load_script("finetune/lora.py").setup
    setup(data=DataArgs(lima_data, mix_dir=alpaca_mix, mix_ratio=2.0, checkpoint_dir=tiny_checkpoint), layout=RunLayout(out_dir),
          lora=LoRAConfig(dropout=0.0), train=args)
    with open(out_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"] and (out_dir / "loss.png").is_file()

    tokenizer, task, val = load_prepared(lima_data, tiny_checkpoint)
    data = Mixture(task, load_mix(alpaca_mix, lima_data, tokenizer), 2.0)
    base = load_model(tiny_checkpoint)
    add_special_tokens(base, tokenizer)  # the rows training starts from; LoRA starts as a no-op
    step_one = sum(itertools.islice(micro_batches_of_rank(data, args, 1, 0), 2), [])
    for column, mixed in (("train_task_loss", False), ("train_mix_loss", True)):
        chosen = [data[i] for i in step_one if (i >= len(task)) == mixed]
        assert chosen, "step 1 holds samples of both"
        assert float(rows[0][column]) == pytest.approx(train_loss(base, chosen), abs=2e-4)
    assert all(r["train_task_loss"] or r["train_mix_loss"] for r in rows)

    # the last validation, recomputed from what the run saved: its first micro-batch (eval_iters 1)
    model, _ = load_finetuned(out_dir)
    input_ids, labels = collate([val[0], val[1]], pad_id=tokenizer.eos_id)
    targets = next_token_targets(labels)
    with torch.no_grad():
        logits = model(input_ids)
    per_position = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    at_eot = targets.flatten() == tokenizer.eot_id
    assert at_eot.sum() >= 2
    assert float(rows[-1]["val_eot_loss"]) == pytest.approx(per_position[at_eot].mean().item(), abs=2e-4)
    assert float(rows[-1]["val_loss"]) == pytest.approx(per_position.sum().item() / n_targets(labels), abs=2e-4)
    assert [bool(r["val_eot_loss"]) for r in rows] == [False, True, False, True]

    with pytest.raises(ValueError, match="was trained with --mix_ratio 2.0: resume with the same flag"):
        setup(data=DataArgs(lima_data, mix_dir=alpaca_mix, mix_ratio=3.0, checkpoint_dir=tiny_checkpoint),
              layout=RunLayout(out_dir, resume=True), train=args)


def test_a_mix_dir_prepared_with_another_tokenizer_is_refused(tiny_checkpoint, lima_data, tmp_path):
    other = tmp_path / "other"
    load_script("scripts/prepare_alpaca.py").prepare(data_path=REPO / "data" / "alpaca_sample.json",
                                                     dirs=PrepareDirs(tiny_checkpoint, other),
                                                     vocab=VocabChange(eot_token="<|end|>"))
    with pytest.raises(ValueError, match=f"--mix_dir {other} was prepared with another tokenizer than --data_dir"):
        load_script("finetune/lora.py").setup(data=DataArgs(lima_data, mix_dir=other, checkpoint_dir=tiny_checkpoint),
                                              layout=RunLayout(tmp_path / "out"))


@pytest.mark.parametrize("config, script", [("lima.yaml", "finetune/full.py"), ("lima-65b.yaml", "finetune/full.py"),
                                            ("lima-lora.yaml", "finetune/lora.py")])
def test_the_lima_configs_set_the_papers_recipe(config, script):
    parser = build_parser(load_script(script).setup)
    train = parser.instantiate(parser.parse_args(["--config", str(REPO / "configs" / config), "--data_dir", "d"])).train
    big = config == "lima-65b.yaml"
    assert (train.epochs, train.lr_schedule, train.warmup_iters, train.weight_decay) == (15, "linear", 0, 0.1)
    assert train.min_learning_rate == pytest.approx(train.learning_rate / 10)
    assert train.learning_rate == (2e-4 if "lora" in config else 1e-5)
    assert (train.global_batch_size, train.residual_dropout) == ((32, 0.3) if big else (64, 0.2))
    assert train.token_lr_scale == (10.0 if "lora" in config else 1.0)


def test_the_lima_lora_config_trains_with_its_schedule(tiny_checkpoint, lima_data, tmp_path):
    """The config as a user runs it, on the tiny model with a smaller step: the learning rate starts at
    the peak and falls in equal steps, and the run records LIMA's settings."""
    out_dir = tmp_path / "lima"
    run(load_script("finetune/lora.py").setup,
        ["--config", str(REPO / "configs" / "lima-lora.yaml"), "--data_dir", str(lima_data), "--checkpoint_dir",
         str(tiny_checkpoint), "--out_dir", str(out_dir), "--train.epochs", "0.5", "--train.global_batch_size", "8",
         "--train.micro_batch_size", "8", "--train.eval_interval", "2"])
    with open(out_dir / "metrics.csv", newline="") as f:
        lrs = [float(row["learning_rate"]) for row in csv.DictReader(f)]
    n = len(lrs)
    assert n == math.ceil(0.5 * len(TokenDataset.load(lima_data / "train.pt")) / 8)  # half an epoch, batches of 8
    assert lrs == pytest.approx([2e-4 - (2e-4 - 2e-5) * step / n for step in range(n)], rel=1e-2)
    recorded = json.loads((out_dir / "hyperparameters.json").read_text())["train"]
    assert (recorded["residual_dropout"], recorded["weight_decay"], recorded["token_lr_scale"]) == (0.2, 0.1, 10.0)


def test_a_mixed_run_stopped_after_a_checkpoint_resumes_to_the_same_weights_and_rows(
        tiny_checkpoint, lima_data, alpaca_mix, tmp_path, monkeypatch):
    """The mixed order is a function of the seed: a run stopped after step 2 and resumed draws the
    samples the uninterrupted run drew, to the same weights and the same metrics rows."""
    from lit_llama import outdir

    args = TrainArgs(learning_rate=1e-2, max_iters=4, warmup_iters=1, global_batch_size=4, micro_batch_size=2,
                     eval_interval=100, eval_iters=1, save_interval=2)
    setup = load_script("finetune/lora.py").setup

    def train(out_dir: Path, resume: bool = False) -> None:
        setup(data=DataArgs(lima_data, mix_dir=alpaca_mix, mix_ratio=3.0, checkpoint_dir=tiny_checkpoint),
              layout=RunLayout(out_dir, resume=resume), lora=LoRAConfig(dropout=0.0), train=args)

    train(tmp_path / "whole")
    save = outdir.OutDir.save

    def save_then_stop(self, *a, **kw):  # a kill right after the step-2 checkpoint
        save(self, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(outdir.OutDir, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "stopped")
    monkeypatch.setattr(outdir.OutDir, "save", save)
    train(tmp_path / "stopped", resume=True)

    a, b = (load_state_dict(tmp_path / name / "lit_model_lora.pth") for name in ("whole", "stopped"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)

    def losses(name: str) -> list[tuple[str, str, str]]:
        with open(tmp_path / name / "metrics.csv", newline="") as f:
            return [(r["step"], r["train_task_loss"], r["train_mix_loss"]) for r in csv.DictReader(f)]

    assert losses("stopped") == losses("whole") and len(losses("whole")) == 4
