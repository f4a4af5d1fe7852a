"""What a run records: one row of metrics per optimizer step, through Fabric's loggers.

`metrics.csv` in the out dir is always written (its own Fabric logger, which a resumed run appends
to); `--logger_name tensorboard` or `wandb` adds Lightning's logger of that name. The loss plot is
drawn from metrics.csv at the end.
"""

import csv
import io
from pathlib import Path
from typing import Any, Literal, Optional

from lightning.fabric.loggers import Logger, TensorBoardLogger
from lightning.fabric.utilities.rank_zero import rank_zero_only

from lit_llama.errors import BadValue, MissingPackage
from lit_llama.files import write_atomic

LoggerName = Literal["csv", "tensorboard", "wandb"]
# val_eot_loss: the validation loss at end-of-turn targets alone; train_task_loss and train_mix_loss:
# the step's loss on the task's samples and on the --mix_dir samples (empty when the step had none)
COLUMNS = ["step", "train_loss", "val_loss", "val_eot_loss", "train_task_loss", "train_mix_loss", "learning_rate",
           "tokens_per_sec", "skipped_steps", "elapsed_sec"]
FORMATS = {"train_loss": ".4f", "val_loss": ".4f", "val_eot_loss": ".4f", "train_task_loss": ".4f",
           "train_mix_loss": ".4f", "learning_rate": ".3g", "tokens_per_sec": ".0f", "skipped_steps": "d",
           "elapsed_sec": ".1f"}


class MetricsCSV(Logger):
    """Appends each step's row to `metrics.csv`, one fixed set of columns, written at once so that a
    kill loses at most the row being written (Lightning's CSVLogger buffers rows, and removes an
    existing file when its directory isn't empty, which a resumed run's always is)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> str:
        return ""

    @property
    def root_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        row = {"step": step, **{k: format(v, FORMATS[k]) for k, v in metrics.items() if k in FORMATS}}
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        pass  # hyperparameters.json holds them


def make_loggers(name: LoggerName, out_dir: Path) -> list[Logger]:
    """metrics.csv, plus the logger `name` picks (tensorboard: out_dir/logs/tensorboard; wandb: out_dir/wandb)."""
    loggers: list[Logger] = [MetricsCSV(Path(out_dir) / "metrics.csv")]
    if name == "tensorboard":
        try:
            import tensorboard  # noqa: F401  (Lightning's logger also takes tensorboardX; check for one clearly)
        except ImportError:
            raise MissingPackage("--logger_name tensorboard: the tensorboard package is not installed "
                                 "(pip install tensorboard)") from None
        loggers.append(TensorBoardLogger(root_dir=Path(out_dir) / "logs", name="tensorboard", version=""))
    elif name == "wandb":
        try:
            from lightning.pytorch.loggers import WandbLogger
            import wandb  # noqa: F401
        except ImportError:
            raise MissingPackage("--logger_name wandb: the wandb package is not installed (pip install wandb)") from None
        loggers.append(WandbLogger(project="lit-llama-lima", name=Path(out_dir).name, save_dir=str(out_dir),
                                   resume="allow"))
    elif name != "csv":
        raise BadValue(f"--logger_name {name!r} is not one of csv, tensorboard, wandb")
    return loggers


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows up to `step`: a resumed run writes the later ones again. A row cut short by a kill
    mid-append is dropped with them."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if None not in r.values() and r["step"].isdigit() and int(r["step"]) <= step]
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue())


def plot_losses(metrics: Path, out: Path) -> None:
    """loss.png from metrics.csv: training and validation loss by step, the validation loss at
    end-of-turn tokens, and with a mix, the training loss on the task's samples and on the mix's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([int(r["step"]) for r in rows], [float(r["train_loss"]) for r in rows], label="train")
    curves = (("train_task_loss", ".", "train, task samples"), ("train_mix_loss", ".", "train, mixed-in samples"),
              ("val_loss", "o-", "validation"), ("val_eot_loss", "s--", "validation, end-of-turn tokens"))
    for column, style, label in curves:
        logged = [r for r in rows if r.get(column)]  # a metrics.csv from before a column existed lacks it
        if logged:
            ax.plot([int(r["step"]) for r in logged], [float(r[column]) for r in logged], style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss per supervised token")
    ax.legend()
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
