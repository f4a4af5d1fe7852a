"""Precision on CPU through the GPU's code path: bf16 keeps every update (trained weights and AdamW's
state stay fp32), and fp16's loss scaler skips the steps whose gradients overflow."""

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.precision import MixedPrecision

import lit_llama.training as training
from conftest import load_script
from lit_llama.checkpoint import load_state_dict
from lit_llama.device_check import DeviceCheck
from lit_llama.errors import BadValue
from lit_llama.finetune import DataArgs, RunLayout
from lit_llama.lora import LoRAConfig
from lit_llama.training import TrainArgs, optimizer_step

STATE = Path("out/training_state.pth")  # named in the error, never written
SHORT = dict(warmup_iters=1, global_batch_size=4, micro_batch_size=2, eval_interval=100, eval_iters=1, save_interval=0)


def bf16_step(w: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at each weight of w (8 significant bits)."""
    _, exponent = torch.frexp(w.bfloat16().float())
    return torch.ldexp(torch.ones_like(w), exponent - 8)


def test_bf16_full_finetune_keeps_the_updates_fp32_makes(tiny_checkpoint, lima_data, tmp_path):
    """20 steps at lr 1e-5: of the weights fp32 moves by a bf16 step or more, the bf16-true run ends on
    the same bf16 number for >= 90% (without fp32 master weights, about 4% did)."""
    runs = {}
    for precision in ("32-true", "bf16-true"):
        load_script("finetune/full.py").setup(data=DataArgs(lima_data, checkpoint_dir=tiny_checkpoint),
                                              layout=RunLayout(tmp_path / precision, precision=precision),
                                              train=TrainArgs(learning_rate=1e-5, max_iters=20, **SHORT))
        runs[precision] = load_state_dict(tmp_path / precision / "lit_model.pth")
    base = load_state_dict(tiny_checkpoint / "lit_model.pth")
    moved = same = 0
    for name, w0 in base.items():
        rows = w0.shape[0]  # wte and lm_head grew by the special rows: compare the base's
        w32, w16 = runs["32-true"][name][:rows], runs["bf16-true"][name][:rows]
        big = (w32 - w0).abs() >= bf16_step(w0)
        moved += int(big.sum())
        same += int((w32.bfloat16() == w16.bfloat16())[big].sum())
    assert moved > 10_000
    assert same / moved >= 0.9, same / moved


def test_bf16_lora_trains_in_fp32_beside_a_bf16_base(tiny_checkpoint, lima_data, tmp_path):
    load_script("finetune/lora.py").setup(data=DataArgs(lima_data, checkpoint_dir=tiny_checkpoint),
                                          layout=RunLayout(tmp_path / "lora", precision="bf16-true"), lora=LoRAConfig(dropout=0.0),
                                          train=TrainArgs(max_iters=3, **SHORT))
    saved = load_state_dict(tmp_path / "lora" / "lit_model_lora.pth")
    assert {t.dtype for name, t in saved.items() if name != "token_rows.ids"} == {torch.float32}
    state = torch.load(tmp_path / "lora" / "training_state.pth", weights_only=True)
    moments = [s[key] for s in state["optimizer"]["state"].values() for key in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {torch.float32}


def test_an_overflowing_fp16_step_is_skipped_and_the_scale_lowered():
    """The step Fabric takes on a GPU, with a real GradScaler, on CPU: the inf gradient skips the update."""
    torch.manual_seed(0)
    fabric = L.Fabric(accelerator="cpu", devices=1,
                      plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=16.0))])
    model = fabric.setup_module(torch.nn.Linear(4, 4))
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=0.1))
    scaler = fabric.strategy.precision.scaler
    before = model.weight.detach().clone()

    fabric.backward(model(torch.randn(2, 4)).sum())
    model.weight.grad[0, 0] = float("inf")
    norm, skipped = optimizer_step(fabric, model, optimizer, grad_clip=1.0, step=0, state=STATE)
    assert skipped and norm == float("inf")
    assert scaler.get_scale() == 8.0  # halved
    assert torch.equal(model.weight.detach(), before)

    fabric.backward(model(torch.randn(2, 4)).sum())
    norm, skipped = optimizer_step(fabric, model, optimizer, grad_clip=1.0, step=1, state=STATE)
    assert not skipped and 0 < norm < float("inf")
    assert not torch.equal(model.weight.detach(), before)


def test_without_a_scaler_a_non_finite_gradient_is_an_error():
    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = fabric.setup_module(torch.nn.Linear(4, 4))
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters()))
    fabric.backward(model(torch.randn(2, 4)).sum())
    model.weight.grad[0, 0] = float("nan")
    with pytest.raises(BadValue, match="the gradient norm is nan at step 1; stopped before updating the weights"):
        optimizer_step(fabric, model, optimizer, grad_clip=0.0, step=0, state=STATE)


def fp16_from(init_scale: float):
    """Fabric's 16-mixed plugin, as a GPU run gets it, with a scale large enough to overflow fp16."""
    return lambda precision, device_type: MixedPrecision(
        "16-mixed", device_type, scaler=torch.amp.GradScaler(device_type, init_scale=init_scale))


def test_fp16_finetune_skips_overflowing_steps_counts_them_and_trains_on(tiny_checkpoint, lima_data, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr("lit_llama.finetune.precision_plugin", fp16_from(2.0 ** 24))
    out_dir = tmp_path / "fp16"
    with DeviceCheck():  # the scaler's state and its overflow check where a GPU run keeps them
        load_script("finetune/lora.py").setup(
            data=DataArgs(lima_data, checkpoint_dir=tiny_checkpoint), layout=RunLayout(out_dir, precision="16-mixed"),
            lora=LoRAConfig(dropout=0.0), train=TrainArgs(max_iters=12, learning_rate=1e-2, **SHORT))
    with open(out_dir / "metrics.csv", newline="") as f:
        skipped = [int(row["skipped_steps"]) for row in csv.DictReader(f)]
    assert skipped[0] == 1 and 1 < skipped[-1] < 12  # overflowed at first, then the lowered scale fits
    assert skipped == sorted(skipped)
    state = torch.load(out_dir / "training_state.pth", weights_only=True)
    assert state["skipped_steps"] == skipped[-1] and state["scaler"]["scale"] < 2.0 ** 24
    assert load_state_dict(out_dir / "lit_model_lora.pth")["transformer.h.0.attn.c_attn.lora_B"].abs().sum() > 0


def test_fp16_gives_up_after_too_many_skipped_steps_in_a_row(tiny_checkpoint, lima_data, tmp_path, monkeypatch):
    monkeypatch.setattr("lit_llama.finetune.precision_plugin", fp16_from(2.0 ** 100))  # overflows for ~75 halvings
    monkeypatch.setattr(training, "MAX_SKIPPED_STEPS", 3)
    with pytest.raises(ValueError, match="overflowed fp16 in 3 steps in a row, up to step 3: train with "
                                                 "--precision bf16-mixed or 32-true"):
        load_script("finetune/lora.py").setup(data=DataArgs(lima_data, checkpoint_dir=tiny_checkpoint),
                                              layout=RunLayout(tmp_path / "fp16", precision="16-mixed"),
                                              train=TrainArgs(max_iters=10, **SHORT))
