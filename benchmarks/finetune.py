"""Fine-tuning step (forward + backward + AdamW step): ours against transformers + peft, on the same
weights and batches. LoRA on q and v (r=8, alpha=16, no dropout) with the EOT's embedding and head
rows trainable, or full fine-tuning.

The precision is the one training defaults to on the device (printed with the table): 32-true on
the CPU, where everything is fp32 and nothing is autocast; bf16-true on a GPU, where both sides start
from the same bf16 weights (as a 7B checkpoint comes) and run the forward pass, loss included, under
bf16 autocast (what Fabric's precision plugin wraps training's forward pass in), the backward pass
and AdamW step outside it. What each side stores there:

- ours, as `lit_llama/training.py` trains: what trains (LoRA and the EOT rows, or every weight under
  full fine-tuning) in fp32, with fp32 gradients and AdamW state; the frozen base in bf16.
- transformers + peft, as a user who loads the model in bf16 runs it: every weight in bf16, but
  peft's default `autocast_adapter_dtype=True` upcasts its adapters (LoRA and the trainable token
  rows) to fp32. Under full fine-tuning nothing is upcast: bf16 weights, gradients and AdamW state,
  8 bytes per weight against our 16, so the memory ratio there compares two ways of storing them.

    python benchmarks/finetune.py --method lora --size 30M
    python benchmarks/finetune.py --method full --size 120M
    python benchmarks/finetune.py --method lora --size 7B --device cuda --seq_len 2048   # on a GPU
    python benchmarks/finetune.py --method lora --impl ours --profile                      # where our time goes
"""

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from common import (EOT_ID, TrainStep, autocast, batch, build_hf, build_ours, environment, flags, gpu_peaks, median,
                    mib, model_config, peak_memory, ratio, report, reset_peak_memory, run_worker, setup, table, timed,
                    training_precision)
from lit_llama.cli import run
from lit_llama.lora import LoRAConfig
from lit_llama.loss import loss_sum
from lit_llama.model import LLaMAConfig
from lit_llama.precision import TrainPrecision, frozen_dtype, set_training_dtypes

LORA = LoRAConfig(r=8, alpha=16, dropout=0.0, query=True, value=True)


def ours_step(config: LLaMAConfig, method: str, device: torch.device, precision: TrainPrecision, fused: bool,
              checkpointing: bool):
    from lit_llama.methods import prepare_model
    from lit_llama.training import n_targets, next_token_targets

    model = build_ours(config, device, frozen_dtype(precision))  # as a checkpoint stores it: bf16 on a GPU
    model.activation_checkpointing = checkpointing
    special_ids = [EOT_ID]
    prepare_model(model, method, LORA if method == "lora" else None, special_ids)
    set_training_dtypes(model, precision)
    # under full fine-tuning, the padding rows of wte and lm_head (never scored) and the special tokens'
    # rows there (model.token_rows stands in for them) are parameters without a gradient; not counted
    unscored = config.padded_vocab_size - config.vocab_size + len(special_ids)
    padding = 2 * unscored * config.n_embd if method == "full" else 0

    def loss(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = next_token_targets(labels)  # (B, T): position t predicts t + 1
        if fused:  # what training runs: the head and the loss in chunks (HeadLoss), never the whole logits
            return loss_sum(model, ids, targets) / n_targets(labels)
        logits = model(ids)  # (B, T, V), then a plain cross-entropy
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum") / n_targets(labels)

    return model, loss, padding


def hf_step(config: LLaMAConfig, method: str, device: torch.device, precision: TrainPrecision, checkpointing: bool):
    model = build_hf(config, device, frozen_dtype(precision))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        # autocast_adapter_dtype (default True) upcasts the adapters of a bf16 model to fp32
        model = get_peft_model(model, LoraConfig(
            r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout, target_modules=["q_proj", "v_proj"],
            trainable_token_indices={"embed_tokens": [EOT_ID], "lm_head": [EOT_ID]}))

    def loss(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=labels).loss

    return model, loss, 0


def train_flops(config: LLaMAConfig, n_trained: int, method: str, batch_size: int, seq_len: int) -> float:
    """Matmul FLOPs of one step: 6 per weight and token for trained weights, 4 for frozen ones (no weight
    gradient), plus causal attention (forward and twice that backward)."""
    C, V = config.n_embd, config.padded_vocab_size
    per_block = (config.n_head + 2 * config.n_query_groups) * config.head_size * C + C * C + 3 * C * config.intermediate_size
    n_matmul = config.n_layer * per_block + V * C  # the embedding is a lookup
    tokens = batch_size * seq_len
    attention = 3 * 2 * batch_size * seq_len**2 * C * config.n_layer
    if method == "full":
        return 6 * n_matmul * tokens + attention
    return 4 * n_matmul * tokens + 6 * n_trained * tokens + attention


def stored_dtypes(model: torch.nn.Module) -> str:
    """The dtypes of the trained and of the frozen weights, as "float32 / bfloat16"."""
    def names(trains: bool) -> str:
        return ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                                 if p.requires_grad == trains})) or "-"
    return f"{names(True)} / {names(False)}"


def worker(*, impl: str, step: TrainStep, profile: bool, checkpointing: bool) -> dict:
    device = setup(step.threads, step.device)
    precision = training_precision(device)
    config = model_config(step.size)
    if impl == "hf":
        model, loss_fn, uncounted = hf_step(config, step.method, device, precision, checkpointing)
    else:
        model, loss_fn, uncounted = ours_step(config, step.method, device, precision, impl == "ours", checkpointing)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trained = sum(p.numel() for p in trainable) - uncounted
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    ids, labels = batch(step.batch_size, step.seq_len, device)
    losses = []

    def train_step() -> None:
        with autocast(precision, device):  # the forward pass and loss, as Fabric wraps them; backward outside
            loss = loss_fn(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    reset_peak_memory(device)
    if profile:
        with torch.profiler.profile() as prof:
            times = timed(train_step, device, step.warmup, step.runs)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    else:
        times = timed(train_step, device, step.warmup, step.runs)
    seconds = median(times)
    result = dict(impl=impl, precision=precision, stored=stored_dtypes(model), trainable=n_trained,
                  first_loss=losses[0], seconds=seconds, tokens_per_s=step.batch_size * step.seq_len / seconds,
                  peak_memory=peak_memory(device))
    peaks = gpu_peaks(device)
    if peaks:
        result["mfu"] = train_flops(config, n_trained, step.method, step.batch_size, step.seq_len) / seconds / peaks[0]
    return result


def main(step: TrainStep = TrainStep(), impl: Optional[Literal["ours", "ours-logits", "hf"]] = None,
         profile: bool = False, activation_checkpointing: bool = False) -> None:
    """Time fine-tuning steps of ours and of transformers + peft, each in its own process.

    Args:
        impl: run one implementation in this process and print its result as JSON: ours (the loss by
            `loss_sum(model, ids, targets)`, as training does), ours-logits (whole logits, then cross-entropy) or hf
        profile: with --impl, print torch.profiler's table of the timed steps
        activation_checkpointing: recompute each block in the backward pass (transformers: gradient checkpointing)
    """
    if impl is not None:
        report(worker(impl=impl, step=step, profile=profile, checkpointing=activation_checkpointing))
        return
    args = [*step.flags(), *flags(activation_checkpointing=activation_checkpointing)]
    ours, logits, hf = (run_worker("finetune.py", [*args, "--impl", name]) for name in ("ours", "ours-logits", "hf"))
    for other in (logits, hf):
        if other["trainable"] != ours["trainable"]:
            raise SystemExit(f"trainable parameters differ: {ours['trainable']:,} and {other['impl']} {other['trainable']:,}")
        if abs(other["first_loss"] - ours["first_loss"]) > 1e-3 * abs(ours["first_loss"]):
            raise SystemExit(f"the first losses differ: {ours['first_loss']} and {other['impl']} {other['first_loss']}")
    memory = "peak GPU memory" if step.device == "cuda" else "peak RSS"
    rows = [["tokens/s", *(f"{r['tokens_per_s']:,.0f}" for r in (ours, logits, hf)),
             ratio(ours["tokens_per_s"], hf["tokens_per_s"])],
            [memory, *(mib(r["peak_memory"]) for r in (ours, logits, hf)), ratio(ours["peak_memory"], hf["peak_memory"])]]
    if "mfu" in ours:
        rows.append(["MFU", *(f"{r['mfu']:.1%}" for r in (ours, logits, hf)), ratio(ours["mfu"], hf["mfu"])])
    rows.append(["weights: trained / frozen", *(r["stored"] for r in (ours, logits, hf)), ""])
    theirs = "transformers + peft" if step.method == "lora" else "transformers"
    table(f"{step.method} fine-tuning step, {step.size}, batch {step.batch_size} x {step.seq_len} tokens, "
          f"{step.device}, precision {ours['precision']}, {step.threads} threads, {ours['trainable']:,} trainable "
          f"parameters, first loss {ours['first_loss']:.4f} (all three); {environment()}",
          ["", "ours", "ours, whole logits + cross-entropy", theirs, "ours / theirs"], rows)


if __name__ == "__main__":
    run(main)
