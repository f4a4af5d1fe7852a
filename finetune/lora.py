"""Fine-tune with LoRA: low-rank updates on the attention weights (and optionally the MLP and head)
plus the rows of the special tokens; every other weight stays frozen.

    python finetune/lora.py --data_dir data/lima --checkpoint_dir checkpoints/tiny --out_dir out/lora
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.finetune import DataArgs, FineTuneRun, RunLayout, finetune
from lit_llama.lora import LoRAConfig
from lit_llama.quantize import Quantize
from lit_llama.training import TrainArgs


def setup(
    data: DataArgs,
    layout: RunLayout = RunLayout(out_dir=Path("out/lora")),
    lora: LoRAConfig = LoRAConfig(),
    quantize: Optional[Quantize] = None,
    train: TrainArgs = TrainArgs(token_lr_scale=10.0),
) -> None:
    """Fine-tune a base checkpoint with LoRA on data prepared by a scripts/prepare_*.py script.

    Args:
        lora: which layers get LoRA, and its rank
        quantize: nf4 stores the frozen base's block weights in 4 bits (QLoRA; needs torchao, see
            howto/finetune_lora.md, "QLoRA"); what trains stays in full precision
        train: optimisation settings (the special tokens' rows learn at 10x the learning rate)
    """
    finetune(FineTuneRun(method="lora", method_config=lora, data=data, layout=layout, train=train, quantize=quantize))


if __name__ == "__main__":
    run(setup)
