"""Full fine-tuning: every weight trains, the special tokens' rows included. The out dir is a plain
checkpoint dir that every script loads like a base checkpoint.

    python finetune/full.py --data_dir data/lima --checkpoint_dir checkpoints/tiny --out_dir out/full
"""

import sys
from pathlib import Path

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.finetune import DataArgs, FineTuneRun, RunLayout, finetune
from lit_llama.training import TrainArgs


def setup(
    data: DataArgs,
    layout: RunLayout = RunLayout(out_dir=Path("out/full")),
    train: TrainArgs = TrainArgs(learning_rate=1e-5, weight_decay=0.1),
) -> None:
    """Fine-tune every weight of a base checkpoint on data prepared by a scripts/prepare_*.py script.

    Args:
        train: optimisation settings (defaults as in LIMA: learning rate 1e-5, weight decay 0.1)
    """
    finetune(FineTuneRun(method="full", data=data, layout=layout, train=train))


if __name__ == "__main__":
    run(setup)
