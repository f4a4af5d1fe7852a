"""What fsdp reads and writes shard by shard, so that no process ever holds the whole model: the base
loaded straight into each rank's shards, and the resume state written by every rank at once.

Loading. Every rank builds the model as one process does, except that the transformer blocks' base
weights stay on the meta device (shapes, no data). The rest is small and built for real: the
embedding and head (grown for the special tokens, their rows initialised), the final norm, and what
the method adds (LoRA, adapter, token rows), drawn from the same random stream as in one process.
`fully_shard` then cuts the root's real tensors into shards at once, and block by block each rank
makes room for its shards and copies its own rows into them, from a memory mapping of the checkpoint
opened for that block alone. A rank reads only the pages of its rows, and the mapping is closed
before the next block, so mapped pages never pile up. Every rank reads its own rows, rather than rank
0 reading and scattering them: no process holds a whole block, nothing crosses the network, and on
one machine the page cache is shared, so the file is read from disk once.

A full fine-tune's weights. Under fsdp they are written a block at a time into safetensors files and
an index (`save_by_block`), which `checkpoint.read_weights` reads: no process gathers the whole model.

The resume state. Under fsdp it is a directory of torch.distributed.checkpoint (DCP): every rank
writes its shards of what trains and of AdamW's state, in parallel, a file per rank, and a load
reshards them to whatever layout resumes (saved by 2 processes, resumed by 1 or 4). The rest (the
step, every rank's random state, the loss scaler) is small, and rank 0 writes it beside them.

    training_state/step-000004/   one checkpoint: DCP's files and .metadata, rest.pth
    training_state/latest         the name of the newest complete one, replaced atomically

A checkpoint is written under a new name and becomes the latest once complete, so a kill at any
point leaves `latest` naming a complete one, and `--resume` never reads a partial one.
"""

import shutil
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm import tqdm

from lit_llama.checkpoint import MODEL_FILE, WEIGHTS_INDEX, read_weights
from lit_llama.files import atomic_save, write_atomic, write_json, write_with
from lit_llama.model import LLaMA
from lit_llama.parallel import full_state_dict, shard_per_block
from lit_llama.quantize import Quantize, quantize_block

BLOCKS = "transformer.h."


@torch.no_grad()
def own_rows(full: torch.Tensor, shard: DTensor) -> torch.Tensor:
    """The rows of `full` that this rank's `shard` holds: a view, nothing copied."""
    return distribute_tensor(full, shard.device_mesh, shard.placements, src_data_rank=None).to_local()


@torch.no_grad()
def shard_and_load(model: LLaMA, device_mesh: DeviceMesh, checkpoint_dir: Path, device: torch.device,
                   compute_dtype: Optional[torch.dtype], quantize: Optional[Quantize] = None) -> LLaMA:
    """Shard `model`, whose blocks' base weights are on the meta device, per block (`shard_per_block`),
    and fill this rank's shards of the blocks: the base weights from `checkpoint_dir`, converted to each
    parameter's dtype as they are copied, and what the method added from the values it was made with.
    With `quantize`, each block is loaded whole and quantized before it is sharded: NF4 codes are made
    from whole weights, as in one process, and FSDP2 cuts the codes into shards."""
    # what the method added to the blocks (LoRA, adapter), made for real; then every block parameter alike
    made = {name: param.detach().clone() for name, param in model.transformer.h.named_parameters()
            if not param.is_meta}
    model.transformer.h.to("meta")

    def block_weights(i: int, block: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Block i's whole weights: the base's from a memory mapping for this block alone, and what was made."""
        names = [f"{i}.{name}" for name, _ in block.named_parameters()]
        base = read_weights(checkpoint_dir, [BLOCKS + name for name in names if name not in made])
        return {name.split(".", 1)[1]: made.pop(name) if name in made else base[BLOCKS + name] for name in names}

    bar = tqdm(total=len(model.transformer.h), desc="loading shards", unit="block", leave=False,
               disable=torch.distributed.get_rank() != 0)
    if quantize is not None:
        def load_and_quantize(i: int, block: torch.nn.Module) -> None:
            dtypes = {name: param.dtype for name, param in block.named_parameters()}
            weights = {name: t.to(device=device, dtype=dtypes[name]) for name, t in block_weights(i, block).items()}
            block.load_state_dict(weights, strict=False, assign=True)
            quantize_block(block, f"{BLOCKS}{i}", device, shards=device_mesh.size())
            bar.update()

        shard_per_block(model, device_mesh, compute_dtype, before=load_and_quantize)
    else:
        shard_per_block(model, device_mesh, compute_dtype)
        for i, block in enumerate(model.transformer.h):
            block.to_empty(device=device)  # room for this rank's shards
            for name, full in block_weights(i, block).items():
                param = block.get_parameter(name)
                param.to_local().copy_(own_rows(full, param))
            bar.update()
    bar.close()
    return model


LATEST = "latest"
REST = "rest.pth"


def latest_state(directory: Path) -> Optional[Path]:
    """The newest complete sharded checkpoint under `directory`, if there is one."""
    pointer = Path(directory) / LATEST
    return Path(directory) / pointer.read_text().strip() if pointer.is_file() else None


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer, keep: Callable[[str], bool]) -> dict:
    """This rank's view of what a checkpoint holds: the model's entries that `keep` accepts and the whole
    optimizer state, as DTensor shards under fsdp and whole tensors elsewhere."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": {name: t for name, t in model_state.items() if keep(name)}, "optimizer": optimizer_state}


def save_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path, step: int,
               keep: Callable[[str], bool], rest: dict) -> Path:
    """Every rank writes its shards of `model`'s entries that `keep` accepts and of `optimizer`'s state
    into `directory`/step-<step>, and rank 0 `rest` (tensors on the CPU). Every rank must call it.
    Returns the new checkpoint, which `publish_state` then makes the latest."""
    target = Path(directory) / f"step-{step:06d}"
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0 and target.exists():  # a partial write of this step, from a run killed while it wrote
        shutil.rmtree(target)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank writes into the directory before it is cleared
    dcp.save(_state_dicts(model, optimizer, keep), checkpoint_id=target)  # ends with a barrier, .metadata written
    if rank == 0:
        atomic_save(rest, target / REST)
    return target


def publish_state(directory: Path, target: Path, world_size: int) -> None:
    """Make the complete checkpoint `target` the latest (on rank 0), then drop the older ones. Warn when
    other ranks' files are not there: each machine wrote to a disk of its own."""
    if len(list(target.glob("*.distcp"))) < world_size:
        print(f"warning: {target} lacks the shards of ranks on other machines: --out_dir is not on a filesystem they "
              "share, so --resume can't read this training state; put --out_dir on a shared filesystem", flush=True)
    write_atomic(Path(directory) / LATEST, target.name + "\n")
    for old in Path(directory).glob("step-*"):
        if old != target:
            shutil.rmtree(old)


def load_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, target: Path,
               keep: Callable[[str], bool]) -> dict:
    """Load the sharded checkpoint `target` into `model` and `optimizer`, resharded to this run's layout;
    returns its `rest`. Every rank must call it."""
    state = _state_dicts(model, optimizer, keep)
    dcp.load(state, checkpoint_id=target)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))
    return torch.load(target / REST, weights_only=True)


def save_by_block(fabric: L.Fabric, model: torch.nn.Module, directory: Path, step: int,
                  as_checkpoint: Callable[[dict], dict]) -> None:
    """Write the whole `model` (set up by Fabric under fsdp) into `directory` as a checkpoint dir's weights,
    one FSDP unit at a time: the root (embedding, head, final norm, token rows), then each block. Every
    rank gathers the unit, and rank 0 writes it, made what a checkpoint holds by `as_checkpoint`, to a
    safetensors file of its own. The index that names the files is written last, so it names complete
    files only, and the files of the previous save go after it. No process ever holds more than one unit
    whole. Every rank must call it."""
    names = list(model.module.state_dict())
    units = [[name for name in names if not name.startswith(BLOCKS)]]
    units += [[name for name in names if name.startswith(f"{BLOCKS}{i}.")] for i in range(len(model.module.transformer.h))]
    weight_map = {}
    for i, unit in enumerate(units):
        tensors = full_state_dict(fabric, model, keep=set(unit).__contains__)
        if fabric.is_global_zero:
            file = f"lit_model-{step:06d}-{i + 1:05d}-of-{len(units):05d}.safetensors"
            tensors = as_checkpoint(tensors)
            write_with(Path(directory) / file, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(tensors, file))
    if fabric.is_global_zero:
        write_json({"metadata": {"step": step}, "weight_map": weight_map}, Path(directory) / WEIGHTS_INDEX)
        for old in Path(directory).glob("lit_model-*.safetensors"):
            if old.name not in weight_map.values():
                old.unlink()
        (Path(directory) / MODEL_FILE).unlink(missing_ok=True)  # an earlier save's, without fsdp
