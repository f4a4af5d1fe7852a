"""Two CPU processes over gloo, the path multi-GPU runs take, each on the simulated accelerator of
lit_llama/device_check.py: ddp and fsdp (FSDP2, per block) train to the weights one process reaches,
validate a share each, save whole tensors that every generate script loads, and an fsdp run killed
mid-way resumes to the uninterrupted run's weights. Two launches of one command, node ranks 0 and 1,
train as two machines of one process each."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.environments.lightning import find_free_network_port

from conftest import REPO, load_script, val_losses
from lit_llama import device_check
from lit_llama.checkpoint import (CONFIG_FILE, MODEL_FILE, WEIGHTS_INDEX, load_state_dict, read_config, read_weights,
                                  save_checkpoint_dir)
from lit_llama.generate import Sampling, Stopping
from lit_llama.inference import Replies
from lit_llama.methods import METHODS
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.outdir import RESUME_DIR
from lit_llama.prepare import PrepareDirs
from lit_llama.sharded import REST, latest_state
from lit_llama.tokenizer import Tokenizer

FLAGS = ["--accelerator", "cpu", "--train.max_iters", "6", "--train.warmup_iters", "2", "--train.global_batch_size", "4",
         "--train.micro_batch_size", "2", "--train.eval_interval", "3", "--train.eval_iters", "0",
         "--train.save_interval", "2"]
LAYOUTS = {  # name -> flags; activation checkpointing rides along on one ddp and one fsdp run
    "one": [],
    "ddp": ["--devices", "2", "--strategy", "ddp"],
    "fsdp": ["--devices", "2", "--strategy", "fsdp"],
}
DDP_CONFIG = "devices: 2\nstrategy: ddp\nlora:\n  r: 4\ntrain:\n  max_iters: 6\n"  # LoRA under ddp reads its layout from a file


def command(method: str, data: Path, checkpoint: Path, out_dir: Path, *extra: str) -> list[str]:
    dropout = ["--lora.dropout", "0"] if method == "lora" else []
    return [sys.executable, f"finetune/{method}.py", "--data_dir", str(data), "--checkpoint_dir", str(checkpoint),
            "--out_dir", str(out_dir), *FLAGS, *dropout, *extra]


# one thread per process (two processes share this machine's cores), on the simulated accelerator: a
# tensor a rank leaves on the host where the GPU path needs it on the device fails the run
ENV = {**os.environ, "OMP_NUM_THREADS": "1", device_check.ENV: "1"}


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                          env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, lima_data, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, str]]:
    """(method, layout) -> (out dir, output) for LoRA and full fine-tuning on every layout."""
    root = tmp_path_factory.mktemp("layouts")
    done = {}
    for method in ("lora", "full"):
        for layout, flags in LAYOUTS.items():
            checkpointing = (method, layout) in (("lora", "ddp"), ("full", "fsdp"))
            out_dir = root / f"{method}_{layout}"
            extra = [*flags, "--activation_checkpointing", str(checkpointing).lower()]
            if method == "lora":
                extra += ["--lora.r", "4"]
                if layout == "ddp":
                    (root / "ddp.yaml").write_text(DDP_CONFIG)
                    extra = ["--config", str(root / "ddp.yaml"), "--activation_checkpointing", "true"]
            done[method, layout] = out_dir, run(command(method, lima_data, tiny_checkpoint, out_dir, *extra))
    return done


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_two_processes_end_on_the_one_process_weights(runs, method, layout):
    one_dir, _ = runs[method, "one"]
    out_dir, output = runs[method, layout]
    assert "trained weights agree across 2 ranks: True" in output
    assert "terminate called" not in output
    one, two = trained_weights(one_dir, method), trained_weights(out_dir, method)
    assert one.keys() == two.keys()
    for name in one:  # whole tensors, not shards
        assert two[name].shape == one[name].shape, name
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0)
    moved = one["token_rows.lm_head" if method == "lora" else "lm_head.weight"]
    assert moved.abs().sum() > 0
    if (method, layout) == ("full", "fsdp"):  # written a block at a time: the root's file, then one per block
        index = json.loads((out_dir / WEIGHTS_INDEX).read_text())
        n_layer = read_config(out_dir / CONFIG_FILE, "").n_layer
        assert len(set(index["weight_map"].values())) == 1 + n_layer and not (out_dir / MODEL_FILE).exists()
    if (method, layout) == ("lora", "ddp"):  # the config file's values, and the defaults where it is silent
        hparams = json.loads((out_dir / "hyperparameters.json").read_text())
        assert hparams["lora"]["r"] == 4 and hparams["train"]["max_iters"] == 6
        assert hparams["train"]["learning_rate"] == 3e-4
    # each rank scored half the validation split: the sums add up to the one-process loss
    assert val_losses(out_dir) == pytest.approx(val_losses(one_dir), abs=1e-4)
    assert len(val_losses(out_dir)) == 2


@pytest.mark.parametrize("method", ["lora", "full"])
def test_an_fsdp_out_dir_generates(runs, method, capsys):
    out_dir, _ = runs[method, "fsdp"]
    flag = {"lora": "lora_path", "full": "checkpoint_dir"}[method]
    load_script(f"generate/{method}.py").main(**{flag: out_dir}, replies=Replies(prompt="What is rain?"),
                                              sampling=Sampling(temperature=0), stopping=Stopping(max_new_tokens=8))
    assert capsys.readouterr().err.startswith("stop reason: ")


@pytest.fixture(scope="module")
def killed_fsdp_run(runs, tiny_checkpoint, lima_data, tmp_path_factory) -> tuple[Path, list[str], int]:
    """A 2-process fsdp full fine-tune killed (both ranks at once, as a node failure would) once its first
    sharded checkpoint is complete: (out dir, command, the step its checkpoint is at)."""
    out_dir = tmp_path_factory.mktemp("killed") / "out"
    cmd = command("full", lima_data, tiny_checkpoint, out_dir, *LAYOUTS["fsdp"], "--activation_checkpointing", "true")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=ENV)
    deadline = time.time() + 300
    while latest_state(out_dir / RESUME_DIR) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    checkpoint = latest_state(out_dir / RESUME_DIR)
    rest = torch.load(checkpoint / REST, weights_only=True)
    assert rest["step"] < 6
    assert len(rest["rng"]) == 2  # each rank's random state
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # a file per rank
    assert not (out_dir / "training_state.pth").exists()  # no rank wrote the whole state
    return out_dir, cmd, rest["step"]


@pytest.mark.parametrize("layout", [["--devices", "2", "--strategy", "fsdp"], ["--devices", "1", "--strategy", "auto"],
                                    ["--devices", "4", "--strategy", "fsdp", "--train.micro_batch_size", "1"]],
                         ids=["2 fsdp", "1 plain", "4 fsdp"])
def test_a_killed_fsdp_run_resumes_on_any_layout_to_the_uninterrupted_weights(runs, killed_fsdp_run, tmp_path, layout):
    """Saved by 2 processes, resumed by 2, by 1 without fsdp, and by 4 (one sample each): the shards are
    read into whatever layout resumes, and the steps draw the same samples."""
    whole_dir, _ = runs["full", "fsdp"]
    killed, cmd, saved_step = killed_fsdp_run
    out_dir = tmp_path / "out"
    shutil.copytree(killed, out_dir)
    output = run([str(out_dir) if arg == str(killed) else arg for arg in cmd] + [*layout, "--resume", "true"])
    assert f"resuming from step {saved_step}" in output
    # another process count: each process's random state has no heir, and the run says so
    assert ("saved by 2 processes and resumes on" in output) == (layout[1] != "2")
    whole, resumed = read_weights(whole_dir), read_weights(out_dir)
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], atol=1e-5, rtol=0)
    with open(out_dir / "metrics.csv", newline="") as f:
        assert [row["step"] for row in csv.DictReader(f)] == [str(i) for i in range(1, 7)]
    checkpoints = list((out_dir / RESUME_DIR).glob("step-*"))
    if "fsdp" in layout:  # the last checkpoint only, the one `latest` names
        assert checkpoints == [latest_state(out_dir / RESUME_DIR)] and checkpoints[0].name == "step-000006"
    else:  # without fsdp the state is one file again, and the sharded one is gone
        assert torch.load(out_dir / "training_state.pth", weights_only=True)["step"] == 6 and not checkpoints


def test_two_nodes_end_on_the_one_process_weights(runs, tiny_checkpoint, lima_data, tmp_path):
    """--num_nodes 2 --devices 1 as two machines start it: the same command launched twice, with node
    ranks 0 and 1 and one main address and port. Each node has an out dir of its own, as on two disks:
    the first node's holds the one-process weights, and the second node writes nothing."""
    one_dir, _ = runs["full", "one"]
    port = find_free_network_port()
    procs, logs = [], [tmp_path / f"node{node}.log" for node in range(2)]
    try:
        for node, log in enumerate(logs):
            cmd = command("full", lima_data, tiny_checkpoint, tmp_path / f"out{node}", "--num_nodes", "2",
                          "--devices", "1", "--strategy", "fsdp", "--activation_checkpointing", "false")
            env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node)}
            with open(log, "w") as f:  # a file, not a pipe: a node blocked on a full pipe would stall the other
                procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env))
        codes = [proc.wait(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    outputs = [log.read_text() for log in logs]
    for code, output in zip(codes, outputs):
        assert code == 0, output[-3000:]
    assert "trained weights agree across 2 ranks: True" in outputs[0]
    one, two = read_weights(one_dir), read_weights(tmp_path / "out0")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0)
    assert val_losses(tmp_path / "out0") == pytest.approx(val_losses(one_dir), abs=1e-4)  # each node scored half
    # the global rank 0 writes the out dir, on the first node's disk, and each rank its shards of the state:
    # the second node's are on its own disk, and the first says the state can't be resumed from there
    assert {p.name for p in (tmp_path / "out1").rglob("*") if p.is_file()} == {"__1_0.distcp"}
    assert "--out_dir is not on a filesystem they share" in outputs[0]


def trained_weights(out_dir: Path, method: str) -> dict[str, torch.Tensor]:
    """What a run wrote: a LoRA out dir's trained weights, or a full fine-tune's whole checkpoint."""
    weights_file = METHODS[method].weights_file
    return load_state_dict(out_dir / weights_file) if weights_file else read_weights(out_dir)


@pytest.fixture(scope="module")
def wide_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """Random weights with the tiny tokenizer, at a shape whose block weights each split into 2 row
    shards of whole NF4 blocks (64 x 256 weights; the tiny model's c_proj is one such block)."""
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", n_layer=2, n_embd=256, intermediate_size=512,
                                        vocab_size=tokenizer.vocab_size))
    directory = tmp_path_factory.mktemp("checkpoints") / "wide"
    save_checkpoint_dir(model, tokenizer, directory)
    return directory


def test_qlora_on_two_fsdp_processes_ends_on_the_one_process_weights(wide_checkpoint, tmp_path):
    """--quantize nf4 under fsdp: each block quantized whole, its NF4 codes sharded by FSDP2; LoRA trains
    beside them to the weights of one process, and the out dir holds only what trained."""
    pytest.importorskip("torchao", reason="pip install -e '.[quantize]'")
    data = tmp_path / "data"
    load_script("scripts/prepare_lima.py").prepare(data_path=REPO / "data" / "lima_sample.jsonl",
                                                   dirs=PrepareDirs(wide_checkpoint, data))
    flags = ["--quantize", "nf4", "--lora.r", "4"]
    one = run(command("lora", data, wide_checkpoint, tmp_path / "one", *flags))
    two = run(command("lora", data, wide_checkpoint, tmp_path / "two", *flags, *LAYOUTS["fsdp"]))
    assert "on an nf4 base" in one and "on an nf4 base" in two
    assert "trained weights agree across 2 ranks: True" in two
    one, two = (load_state_dict(tmp_path / run / "lit_model_lora.pth") for run in ("one", "two"))
    assert one.keys() == two.keys() and all("lora_" in name or name.startswith("token_rows.") for name in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0)
    assert val_losses(tmp_path / "two") == pytest.approx(val_losses(tmp_path / "one"), abs=1e-4)


class RankStub:
    """What `validate` asks of Fabric, as rank `rank` of `world_size` sees it (all_reduce: this rank's part)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.global_rank, self.world_size, self.device = rank, world_size, torch.device("cpu")

    def to_device(self, batch):
        return batch

    def all_reduce(self, tensor, reduce_op):
        return tensor


def test_each_rank_validates_its_own_share(lima_data, tiny_checkpoint, monkeypatch):
    """5 micro-batches over 2 ranks: rank 0 scores 0, 2, 4 and rank 1 scores 1, 3, then runs one more
    forward pass, uncounted, so that both run as many (under ddp and fsdp every forward is collective)."""
    from lit_llama.batches import collate
    from lit_llama.dataset import load_prepared
    from lit_llama.training import TrainArgs, n_targets, next_token_targets, validate

    tokenizer, _, val_data = load_prepared(lima_data, tiny_checkpoint)
    eot = tokenizer.eot_id
    assert len(val_data) == 10

    class Recorder(torch.nn.Module):
        """Stands in for the model, and for `summed_losses` of it."""

        def __init__(self):
            super().__init__()
            self.sums = []

        def losses(self, input_ids, targets, groups, n_groups):
            self.sums.append(int(input_ids.sum()))  # tells the batches apart
            assert n_groups == 2 and torch.equal(groups, (targets == eot).long())
            return torch.tensor([0.75, 0.25])  # the loss elsewhere, at end-of-turn targets

    monkeypatch.setattr("lit_llama.training.summed_losses", lambda fabric, model, *args: model.losses(*args))
    args = TrainArgs(micro_batch_size=2, eval_iters=0)
    seen, losses = [], []
    for rank in range(2):
        model = Recorder()
        losses.append(validate(RankStub(rank, 2), model, val_data, args, pad_id=0, eot_id=eot))
        seen.append(model.sums)
    every = Recorder()
    validate(RankStub(0, 1), every, val_data, args, pad_id=0, eot_id=eot)
    assert len(set(every.sums)) == 5
    assert seen[0] == [every.sums[i] for i in (0, 2, 4)]
    assert seen[1] == [every.sums[i] for i in (1, 3, 0)]  # the last one uncounted
    # each batch "loses" 1.0, 0.25 of it at EOT: a rank's sums hold its own batches' targets only
    labels = [collate([val_data[j] for j in range(i, i + 2)])[1] for i in range(0, 10, 2)]
    tokens = [n_targets(y) for y in labels]
    eots = [int((next_token_targets(y) == eot).sum()) for y in labels]
    assert losses[0] == pytest.approx((3 / (tokens[0] + tokens[2] + tokens[4]), 0.75 / (eots[0] + eots[2] + eots[4])))
    assert losses[1] == pytest.approx((2 / (tokens[1] + tokens[3]), 0.5 / (eots[1] + eots[3])))
