"""Fine-tune with LLaMA-Adapter: a learned prompt that the upper layers attend to through zero-initialised
gates, plus the rows of the special tokens; every other weight stays frozen.

    python finetune/adapter.py --data_dir data/lima --checkpoint_dir checkpoints/tiny --out_dir out/adapter
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.adapter import AdapterConfig
from lit_llama.cli import run
from lit_llama.finetune import DataArgs, FineTuneRun, RunLayout, finetune
from lit_llama.quantize import Quantize
from lit_llama.training import TrainArgs


def setup(
    data: DataArgs,
    layout: RunLayout = RunLayout(out_dir=Path("out/adapter")),
    adapter: AdapterConfig = AdapterConfig(),
    quantize: Optional[Quantize] = None,
    train: TrainArgs = TrainArgs(learning_rate=3e-3),
) -> None:
    """Fine-tune a base checkpoint with LLaMA-Adapter on data prepared by a scripts/prepare_*.py script.

    Args:
        adapter: prompt length and the first adapted layer
        quantize: nf4 stores the frozen base's block weights in 4 bits (QLoRA; needs torchao, see
            howto/finetune_lora.md, "QLoRA"); what trains stays in full precision
        train: optimisation settings (the learning rate, 3e-3, is already what the special tokens' rows need)
    """
    finetune(FineTuneRun(method="adapter", method_config=adapter, data=data, layout=layout, train=train,
                         quantize=quantize))


if __name__ == "__main__":
    run(setup)
