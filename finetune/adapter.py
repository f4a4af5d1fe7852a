"""Fine-tune with LLaMA-Adapter: a learned prompt that the upper layers attend to through zero-initialised
gates, plus the rows of the special tokens; every other weight stays frozen.

    python finetune/adapter.py --data_dir data/lima --checkpoint_dir checkpoints/tiny --out_dir out/adapter
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.adapter import AdapterConfig
from lit_llama.metrics import LoggerName
from lit_llama.precision import TrainPrecision
from lit_llama.quantize import Quantize
from lit_llama.training import TrainArgs, finetune


def setup(
    data_dir: Path,
    mix_dir: Optional[Path] = None,
    mix_ratio: float = 1.0,
    checkpoint_dir: Path = Path("checkpoints/tiny"),
    out_dir: Path = Path("out/adapter"),
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    precision: Optional[TrainPrecision] = None,
    strategy: str = "auto",
    activation_checkpointing: bool = False,
    token_init: str = "mean",
    resume: bool = False,
    logger_name: LoggerName = "csv",
    adapter: AdapterConfig = AdapterConfig(),
    quantize: Optional[Quantize] = None,
    train: TrainArgs = TrainArgs(learning_rate=3e-3),
) -> None:
    """Fine-tune a base checkpoint with LLaMA-Adapter on data prepared by a scripts/prepare_*.py script.

    Args:
        data_dir: prepared data: train.pt, val.pt and the tokenizer with the end-of-turn token
        mix_dir: a second prepared data dir (such as scripts/self_sample.py's cache, prepared), prepared with
            the same tokenizer, whose train split is mixed into training; validation stays on data_dir's
        mix_ratio: samples of mix_dir per task sample in each epoch (DELIA mixed in 100 to 260)
        checkpoint_dir: the base model: lit_model.pth, model_config.json, tokenizer.model
        out_dir: where the trained weights and everything needed to load them are written
        accelerator: cpu, cuda, ... or auto
        devices: devices per node
        num_nodes: machines taking part
        precision: bf16-true, bf16-mixed, 16-mixed or 32-true (default: bf16-true on a GPU that computes bf16
            natively, else 32-true); what trains is kept in fp32 under all of them (howto/finetune_lora.md, "Precision")
        strategy: auto, ddp, or fsdp (FSDP2: weights, gradients and optimizer state sharded per transformer block)
        activation_checkpointing: recompute each block's activations in the backward pass instead of
            keeping them: less memory, about a third more compute
        token_init: how the special tokens' embedding and head rows start: mean, mean_noise, normal,
            copy:<piece> or describe:<text> (see howto/special_tokens.md)
        resume: continue from the training state saved in out_dir
        logger_name: csv (out_dir/metrics.csv, always written), or also tensorboard or wandb (files under out_dir)
        adapter: prompt length and the first adapted layer
        quantize: nf4 stores the frozen base's block weights in 4 bits (QLoRA; needs torchao, see
            howto/finetune_lora.md, "QLoRA"); what trains stays in full precision
        train: optimisation settings (the learning rate, 3e-3, is already what the special tokens' rows need)
    """
    finetune("adapter", adapter, data_dir, checkpoint_dir, out_dir, accelerator, devices, num_nodes, precision, strategy,
             activation_checkpointing, token_init, resume, logger_name, train, quantize,
             mix_dir, mix_ratio)


if __name__ == "__main__":
    run(setup)
