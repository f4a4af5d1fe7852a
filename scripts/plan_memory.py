"""How much memory a fine-tune needs on each device, and on the host to load and save, before running
it: the parts (weights, gradients, AdamW's state, activations, the loss, fsdp's gathered blocks) worked
out from the model's config, nothing loaded. The layout and training flags are the finetune scripts'.

    python scripts/plan_memory.py --model_name Llama-2-70b --method full --precision bf16-true \
        --strategy fsdp --devices 8 --num_nodes 2 --train.micro_batch_size 1 --max_seq_length 2048 \
        --activation_checkpointing true
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.adapter import AdapterConfig
from lit_llama.checkpoint import CONFIG_FILE, read_config
from lit_llama.cli import run
from lit_llama.finetune import RunLayout
from lit_llama.lora import LoRAConfig
from lit_llama.memory import GiB, PlanMethod, Setup, plan, table
from lit_llama.model import LLaMAConfig
from lit_llama.training import TrainArgs


def main(
    model_name: str = "7B",
    checkpoint_dir: Optional[Path] = None,
    method: PlanMethod = "lora",
    max_seq_length: Optional[int] = None,
    layout: RunLayout = RunLayout(),
    train: TrainArgs = TrainArgs(),
    lora: LoRAConfig = LoRAConfig(),
    adapter: AdapterConfig = AdapterConfig(),
    device_memory_gib: Optional[float] = None,
) -> None:
    """Print the memory plan of a fine-tune.

    Args:
        model_name: a named config of lit_llama/model.py (7B, 13B, 65B, Llama-2-70b, TinyLlama-1.1B, ...)
        checkpoint_dir: read the model's config from this checkpoint dir instead of model_name
        method: lora, adapter, full, or qlora (lora on an nf4 base: finetune/lora.py --quantize nf4)
        max_seq_length: the longest sample in tokens (default: the model's block_size)
        layout: where it runs (only devices, num_nodes, precision, strategy and activation_checkpointing
            count here; precision defaults to bf16-true)
        train: training settings (only micro_batch_size counts here)
        lora: the LoRA settings (method lora or qlora)
        adapter: the adapter settings (method adapter)
        device_memory_gib: the memory of one device: also say whether the peak fits it
    """
    config = (read_config(Path(checkpoint_dir) / CONFIG_FILE, "is this a checkpoint dir?") if checkpoint_dir
              else LLaMAConfig.from_name(model_name))
    setup = Setup(config, method=method, precision=layout.precision or "bf16-true", strategy=layout.strategy,
                  processes=layout.devices * layout.num_nodes, micro_batch_size=train.micro_batch_size,
                  max_seq_length=max_seq_length or config.block_size,
                  activation_checkpointing=layout.activation_checkpointing, lora=lora, adapter=adapter)
    estimate = plan(setup)
    print(f"{method} on {checkpoint_dir or model_name}, {setup.precision}, {layout.strategy} over {setup.processes} "
          f"process(es), micro-batch {setup.micro_batch_size} x {setup.max_seq_length} tokens, activation "
          f"checkpointing {'on' if setup.activation_checkpointing else 'off'}")
    print(table(estimate))
    if device_memory_gib is not None:
        fits = estimate.peak <= 0.9 * device_memory_gib * GiB
        print(f"fits {device_memory_gib:g} GiB with 10% to spare: {'yes' if fits else 'no'}")


if __name__ == "__main__":
    run(main)
