"""Two CPU processes over gloo, the path multi-GPU runs take, each on the simulated accelerator of
lit_llama/device_check.py: ddp and fsdp (FSDP2, per block) train to the weights one process reaches,
validate a share each, save whole tensors that every generate script loads, and an fsdp run killed
mid-way resumes to the uninterrupted run's weights. Two launches of one command, node ranks 0 and 1,
train as two machines of one process each."""

import csv
import json
import os
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
from lit_llama.checkpoint import MODEL_FILE, load_state_dict
from lit_llama.generate import Sampling, Stopping
from lit_llama.inference import Replies
from lit_llama.methods import METHODS

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
    one = load_state_dict(one_dir / weights_file(method))
    two = load_state_dict(out_dir / weights_file(method))
    assert one.keys() == two.keys()
    for name in one:  # whole tensors, not shards
        assert two[name].shape == one[name].shape, name
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0)
    moved = load_state_dict(one_dir / weights_file(method))["token_rows.lm_head" if method == "lora" else "lm_head.weight"]
    assert moved.abs().sum() > 0
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


def test_a_killed_fsdp_run_resumes_to_the_uninterrupted_weights(runs, tiny_checkpoint, lima_data, tmp_path):
    whole_dir, _ = runs["full", "fsdp"]
    out_dir = tmp_path / "killed"
    cmd = command("full", lima_data, tiny_checkpoint, out_dir, *LAYOUTS["fsdp"], "--activation_checkpointing", "true")
    # its own process group: the kill takes both ranks at once, as a node failure would
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=ENV)
    deadline = time.time() + 300
    while not (out_dir / "training_state.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(out_dir / "training_state.pth", weights_only=True)
    saved_step = state["step"]
    assert saved_step < 6
    assert len(state["rng"]) == 2  # each rank's random state

    output = run(cmd + ["--resume", "true"])
    assert f"resuming from step {saved_step}" in output
    whole, resumed = load_state_dict(whole_dir / "lit_model.pth"), load_state_dict(out_dir / "lit_model.pth")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], atol=1e-6, rtol=0)
    with open(out_dir / "metrics.csv", newline="") as f:
        assert [row["step"] for row in csv.DictReader(f)] == [str(i) for i in range(1, 7)]


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
    one, two = load_state_dict(one_dir / MODEL_FILE), load_state_dict(tmp_path / "out0" / MODEL_FILE)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0)
    assert val_losses(tmp_path / "out0") == pytest.approx(val_losses(one_dir), abs=1e-4)  # each node scored half
    assert not (tmp_path / "out1").exists()  # the global rank 0 writes the out dir, on the first node's disk


def weights_file(method: str) -> str:
    return METHODS[method].weights_file or MODEL_FILE


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
