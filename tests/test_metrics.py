"""What a run records: metrics.csv always, TensorBoard or W&B through Lightning's loggers on request,
and the loss plot."""

import sys

import pytest

from conftest import load_script
from lit_llama.errors import MissingPackage
from lit_llama.finetune import DataArgs, RunLayout
from lit_llama.training import TrainArgs

SHORT = dict(warmup_iters=1, global_batch_size=2, micro_batch_size=2, eval_interval=2, eval_iters=1, save_interval=0)


def test_tensorboard_logs_beside_metrics_csv_and_the_plot(tiny_checkpoint, lima_data, tmp_path):
    out_dir = tmp_path / "out"
    load_script("finetune/lora.py").setup(data=DataArgs(lima_data, checkpoint_dir=tiny_checkpoint),
                                          layout=RunLayout(out_dir, logger_name="tensorboard"), train=TrainArgs(max_iters=3, **SHORT))
    events = list((out_dir / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(events[0].parent)).Reload()
    assert [event.step for event in logged.Scalars("train_loss")] == [1, 2, 3]
    assert [event.step for event in logged.Scalars("val_loss")] == [2, 3]
    assert [event.step for event in logged.Scalars("val_eot_loss")] == [2, 3]
    rows = (out_dir / "metrics.csv").read_text().splitlines()
    assert rows[0] == ("step,train_loss,val_loss,val_eot_loss,train_task_loss,train_mix_loss,learning_rate,"
                       "tokens_per_sec,skipped_steps,elapsed_sec")
    assert len(rows) == 4
    assert (out_dir / "loss.png").stat().st_size > 0


def test_a_logger_whose_package_is_missing_fails_in_one_line_before_training(tiny_checkpoint, lima_data, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(MissingPackage, match=r"^--logger_name wandb: the wandb package is not installed \(pip install wandb\)$"):
        load_script("finetune/lora.py").setup(data=DataArgs(lima_data, checkpoint_dir=tiny_checkpoint),
                                              layout=RunLayout(tmp_path / "o", logger_name="wandb"), train=TrainArgs(max_iters=1, **SHORT))
    assert not (tmp_path / "o" / "metrics.csv").exists()
