"""Training on several processes: the strategies, and the few things that must see the whole run
(full tensors to save and compare, each rank's random state).

    auto   one device
    ddp    a replica per process; gradients are averaged
    fsdp   FSDP2 (`fully_shard`) per transformer block, through Lightning's ModelParallelStrategy:
           each process keeps 1/N of the weights, gradients and optimizer state

Both run on CPU over gloo, so the multi-GPU path is the one the tests take.
"""

from functools import partial
from typing import Any, Callable, Optional, Union

import lightning as L
import torch
from lightning.fabric.strategies import ModelParallelStrategy, Strategy
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from lit_llama.errors import BadValue
from lit_llama.model import LLaMA


def device_type(accelerator: str) -> str:
    """The torch device type `--accelerator` stands for ("auto": cuda when there is one)."""
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if accelerator == "gpu" else accelerator


def check_devices(accelerator: str, devices: int) -> None:
    """A device count the machine doesn't have fails here, in one line, instead of deep in the launch.
    On CPU each device is a process, so any count runs."""
    if devices < 1:
        raise BadValue(f"--devices {devices}: give the number of devices per node, at least 1")
    if device_type(accelerator) == "cuda":
        available = torch.cuda.device_count()
        if available == 0:
            raise BadValue(f"--accelerator {accelerator}: no CUDA device is visible; check the driver and "
                           "CUDA_VISIBLE_DEVICES, or train with --accelerator cpu")
        if devices > available:
            raise BadValue(f"--devices {devices}: this machine has {available} CUDA device(s) visible; use "
                           f"--devices {available} or fewer (across machines: --num_nodes)")


def shard_per_block(model: LLaMA, device_mesh: Any, compute_dtype: Optional[torch.dtype] = None,
                    before: Callable[[int, torch.nn.Module], None] = lambda i, block: None) -> LLaMA:
    """FSDP2: each transformer block is its own unit (gathered just before it runs, freed after), and
    the root holds the rest (embeddings, head, final norm, the special-token rows). With a half
    `compute_dtype`, weights are gathered in it, so the fp32 trained weights never exist whole in fp32
    on one device, and gradients are reduced in fp32. `before(i, block)` runs just before block i is
    sharded. A model sharded already (loaded into its shards, `sharded.shard_and_load`) is returned as
    it is."""
    if isinstance(model, FSDPModule):
        return model
    mesh = device_mesh["data_parallel"]
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
    for i, block in enumerate(model.transformer.h):
        before(i, block)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "hidden")  # the loss and the decoder call it: gathered as for forward
    return model


def make_strategy(strategy: str, devices: int, num_nodes: int, compute_dtype: Optional[torch.dtype]) -> Union[str, Strategy]:
    if strategy == "fsdp":
        # every process shards (no tensor parallelism); saves gather full tensors into one file
        return ModelParallelStrategy(partial(shard_per_block, compute_dtype=compute_dtype),
                                     data_parallel_size=devices * num_nodes, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    if strategy not in ("auto", "ddp"):
        raise BadValue(f"--strategy {strategy!r} is not one of auto, ddp, fsdp")
    return strategy


def is_sharded(fabric: L.Fabric) -> bool:
    return isinstance(fabric.strategy, ModelParallelStrategy)


@torch.no_grad()
def full_state_dict(fabric: L.Fabric, model: torch.nn.Module,
                    keep: Callable[[str], bool] = lambda name: True) -> dict[str, torch.Tensor]:
    """The entries of the model's state dict that `keep` accepts, as whole tensors on the CPU of rank 0
    (other ranks: {} under fsdp). Every rank must call it: under fsdp it gathers, one entry at a time
    and only those kept, so no process ever holds more of the model than it saves. Tensors leave the
    device one at a time, so a save never holds a second copy of the model there, and the file loads
    on any machine."""
    if not is_sharded(fabric):
        state = fabric.strategy.get_module_state_dict(model)
        return {name: tensor.detach().cpu() for name, tensor in state.items() if keep(name)}
    whole = {}
    for name, tensor in model.module.state_dict().items():  # shards under fsdp: nothing gathered yet
        if keep(name):
            tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # every rank takes part
            if fabric.is_global_zero:
                whole[name] = tensor.detach().cpu()
    return whole


@torch.no_grad()
def trained_checksum(model: torch.nn.Module) -> torch.Tensor:
    """The sum of every trained weight, taken over whole tensors (gathered one at a time under fsdp),
    in fp64: ranks that hold the same weights get the same number."""
    total = torch.zeros((), dtype=torch.float64)
    for param in model.parameters():
        if param.requires_grad:
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            total += whole.double().sum().cpu()
    return total


def gather_objects(fabric: L.Fabric, obj: Any) -> list:
    """`obj` from every rank, in rank order."""
    if fabric.world_size == 1:
        return [obj]
    objects = [None] * fabric.world_size
    torch.distributed.all_gather_object(objects, obj)
    return objects


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random state: the CPU's, and its own GPU's when it runs on one (dropout draws
    from the device's). Other GPUs are other ranks': a resume with fewer of them must not need theirs."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # a state that holds every visible GPU's: this rank's device is at its index
        cuda = cuda[device.index] if device.type == "cuda" and device.index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
