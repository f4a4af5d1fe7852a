"""The dtype each tensor trains in, and the plugin that tells Fabric.

Whatever the precision, what trains (LoRA, adapter, the special-token rows, or every weight under
full fine-tuning) is stored in fp32, and so are its gradients and AdamW's state. An AdamW step is
about the learning rate, 1e-5 for full fine-tuning, while half a bf16 step of a weight of 0.02 is
6e-5: in bf16 such updates would round away, in fp32 they add up. Only the frozen base is stored in
half precision. A trained parameter costs 16 bytes (weight, gradient, AdamW's two moments); a
frozen one 2 in bf16.

    --precision  frozen base   trained   compute               loss scaling
    bf16-true    bf16          fp32      bf16 (autocast)       -
    bf16-mixed   fp32          fp32      bf16 (autocast)       -
    16-mixed     fp32          fp32      fp16 (autocast)       GradScaler: overflowing steps skipped
    32-true      fp32          fp32      fp32                  -
"""

from typing import TYPE_CHECKING, Literal, Optional

import torch

if TYPE_CHECKING:  # imported where a plugin is built: loading a fine-tune for inference needs no Lightning
    from lightning.fabric.plugins.precision import Precision

TrainPrecision = Literal["bf16-true", "bf16-mixed", "16-mixed", "32-true"]


def gpu_computes_bf16() -> bool:
    """Whether there is a GPU that computes bf16 natively (Ampere and later). torch's check counts by
    default the GPUs that only emulate it (V100, T4), where bf16 runs far slower than fp16 or fp32."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def default_precision() -> TrainPrecision:
    """bf16 weights on a GPU that computes bf16 natively, fp32 elsewhere."""
    return "bf16-true" if gpu_computes_bf16() else "32-true"


def frozen_dtype(precision: TrainPrecision) -> torch.dtype:
    """The dtype of what does not train: bf16 under bf16-true, fp32 otherwise."""
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


def set_training_dtypes(model: torch.nn.Module, precision: TrainPrecision) -> None:
    """Store what trains (`requires_grad`) in fp32, and the frozen rest in `frozen_dtype(precision)`.
    Call it once the method has marked what trains, before Fabric sets the model up."""
    frozen = frozen_dtype(precision)
    for param in model.parameters():
        param.data = param.data.to(torch.float32 if param.requires_grad else frozen)


def precision_plugin(precision: TrainPrecision, device_type: str) -> "Precision":
    """Fabric's plugin for `precision` on `device_type` ("cpu", "cuda"): autocast for all but 32-true.
    bf16-true and bf16-mixed compute alike, and differ only in how the frozen base is stored. The
    plugin is built here, not from the string, so that fp16 on CPU is fp16 (Fabric's string turns it
    into bf16 there) and fsdp takes the same plugins as ddp."""
    from lightning.fabric.plugins.precision import MixedPrecision, Precision

    if precision in ("bf16-true", "bf16-mixed"):
        return MixedPrecision("bf16-mixed", device_type)
    if precision == "16-mixed":
        return MixedPrecision("16-mixed", device_type)
    return Precision()


def compute_dtype(precision: TrainPrecision) -> Optional[torch.dtype]:
    """The dtype autocast runs the matmuls in; None under 32-true."""
    return {"bf16-true": torch.bfloat16, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def grad_scaler(plugin: "Precision") -> Optional[torch.amp.GradScaler]:
    """The loss scaler of a 16-mixed run, None otherwise."""
    return getattr(plugin, "scaler", None)
