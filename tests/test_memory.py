"""The memory plan against the memory a training step allocates, measured exactly on CPU at small shapes.

The measure: a TorchDispatchMode sees every tensor each op returns; a storage no input of the op holds
is new, and its bytes count until a weakref finalizer sees it freed. Views, in-place ops and parameters
made before the step add nothing; every allocation autograd, the loss and AdamW make is counted, with
no allocator rounding or caching in between. The weights are counted apart (their storages before the
step). Under fsdp each of two gloo processes measures its own: its shards, what FSDP2 gathers and
reduces, and the step on its shards (a DTensor counts as its local tensor).
"""

import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lit_llama.lora import LoRAConfig
from lit_llama.loss import loss_sum
from lit_llama.memory import GiB, Setup, activations_per_token, base_params, lora_params, plan, table, trained_params
from lit_llama.methods import prepare_model
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.parallel import shard_per_block
from lit_llama.precision import compute_dtype, set_training_dtypes
from lit_llama.quantize import quantize, quantize_block

B, T = 2, 256


def local(t: object) -> object:
    """A DTensor's local shard; anything else as it is."""
    return t._local_tensor if isinstance(t, DTensor) else t


class StorageTracker(TorchDispatchMode):
    """Bytes of the tensor storages made inside the mode that are alive, each at its size after every op
    (FSDP2 frees a gathered weight by resizing its storage to nothing, and resizes it back to gather it
    again), and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, weakref.ref] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {local(t).untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and not hasattr(local(t), "__tensor_flatten__")}
        for t in map(local, tree_leaves(out)):
            if not isinstance(t, torch.Tensor) or type(t) is not torch.Tensor:
                continue
            storage = t.untyped_storage()
            if storage._cdata not in self.live and storage._cdata not in inputs:
                self.live[storage._cdata] = weakref.ref(storage)
                weakref.finalize(storage, self.live.pop, storage._cdata)
        self.peak = max(self.peak, sum(s.nbytes() for s in (ref() for ref in self.live.values()) if s is not None))
        return out


def tensor_bytes(model: torch.nn.Module) -> int:
    """The bytes of the model's parameters and buffers (an NF4 weight: its inner tensors)."""
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        t = local(t)
        inner = [getattr(t, name) for name in t.__tensor_flatten__()[0]] if hasattr(t, "__tensor_flatten__") else [t]
        total += sum(x.untyped_storage().nbytes() for x in inner)
    return total


def trained_model(s: Setup) -> LLaMA:
    """The model as `s` trains it, on this process (fsdp: sharded over the process group)."""
    torch.manual_seed(0)
    model = LLaMA(s.config)
    method_config = {"lora": s.lora, "adapter": s.adapter}.get(s.base_method)
    prepare_model(model, s.base_method, method_config, [s.config.vocab_size - 1])
    set_training_dtypes(model, s.precision)
    if s.sharded:
        mesh = init_device_mesh("cpu", (s.processes,), mesh_dim_names=("data_parallel",))
        # as the sharded loader does: each block quantized whole, then cut into shards
        quantize_whole = lambda i, block: quantize_block(block, f"h.{i}", shards=s.processes)  # noqa: E731
        shard_per_block(model, mesh, compute_dtype(s.precision),
                        before=quantize_whole if s.method == "qlora" else lambda i, block: None)
    else:
        quantize(model, "nf4" if s.method == "qlora" else None)
    model.activation_checkpointing = s.activation_checkpointing
    return model.train()


def measured_peak(s: Setup) -> int:
    """Two training steps as training takes them (the second one holds AdamW's state): the model's
    bytes plus the peak of what the steps allocate."""
    model = trained_model(s)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
    idx, targets = (torch.randint(0, s.config.vocab_size, (s.micro_batch_size, s.max_seq_length)) for _ in range(2))
    dtype = compute_dtype(s.precision)
    weights = tensor_bytes(model)
    with StorageTracker() as tracker:
        for _ in range(2):
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = loss_sum(model, idx, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
    return weights + tracker.peak


def sharded_peak(rank: int, s: Setup, port: int, peaks: dict) -> None:
    """`measured_peak` on rank `rank` of `s.processes` gloo processes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=s.processes)
    try:
        peaks[rank] = measured_peak(s)
    finally:
        dist.destroy_process_group()


CASES = [(m, p, ck) for m in ("lora", "full") for p in ("32-true", "bf16-true") for ck in (False, True)]
CASES += [("lora", "bf16-mixed", False), ("adapter", "32-true", False), ("adapter", "bf16-true", True)]


@pytest.mark.parametrize("method, precision, checkpointing", CASES + [("qlora", "bf16-true", False),
                                                                     ("qlora", "bf16-true", True)])
def test_the_plan_is_within_15_percent_of_the_measured_peak(method, precision, checkpointing):
    if method == "qlora":
        pytest.importorskip("torchao")
    s = Setup(LLaMAConfig.from_name("tiny"), method=method, precision=precision, micro_batch_size=B,
              max_seq_length=T, activation_checkpointing=checkpointing, device_type="cpu")
    estimate, measured = plan(s), measured_peak(s)
    print(f"\n{method} {precision} checkpointing={checkpointing}: estimated {estimate.peak / 2**20:.2f} MiB, "
          f"measured {measured / 2**20:.2f} MiB\n{table(estimate)}")
    assert abs(estimate.peak - measured) <= 0.15 * measured


# two shards of whole NF4 blocks (64 x 256 weights) in every linear: tiny is too narrow
WIDE = dict(LLaMAConfig.from_name("tiny").__dict__, n_embd=256, intermediate_size=768, padded_vocab_size=None)


@pytest.mark.parametrize("method, precision", [("lora", "bf16-true"), ("full", "bf16-true"), ("full", "32-true"),
                                               ("qlora", "bf16-true")])
def test_the_plan_is_within_15_percent_of_each_fsdp_process_peak(method, precision):
    if method == "qlora":
        pytest.importorskip("torchao")
    s = Setup(LLaMAConfig(**WIDE), method=method, precision=precision, strategy="fsdp", processes=2,
              micro_batch_size=1, max_seq_length=32, device_type="cpu")
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.start_processes(sharded_peak, args=(s, find_free_network_port(), shared), nprocs=2, start_method="spawn")
        peaks = dict(shared)
    measured = max(peaks.values())
    estimate = plan(s)
    print(f"\nfsdp x 2 {method} {precision}: estimated {estimate.peak / 2**20:.2f} MiB, measured "
          f"{[round(v / 2**20, 2) for v in peaks.values()]} MiB\n{table(estimate)}")
    assert abs(estimate.peak - measured) <= 0.15 * measured


def test_parameter_counts_are_the_models():
    for name in ("tiny", "TinyLlama-1.1B"):
        config = LLaMAConfig.from_name(name)
        with torch.device("meta"):
            model = LLaMA(config)
        assert sum(base_params(config).values()) == sum(p.numel() for p in model.parameters())
        lora = LoRAConfig(key=True, projection=True, mlp=True, head=True)
        prepare_model(model, "lora", lora, [0, 1])
        lora_numel = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        assert lora_params(config, lora) == lora_numel
        s = Setup(config, method="lora", lora=lora, special_tokens=2)
        assert trained_params(s) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_sharding_divides_what_is_sharded():
    config = LLaMAConfig.from_name("Llama-2-70b")
    one = plan(Setup(config, method="full", strategy="fsdp", processes=1, activation_checkpointing=True))
    sixteen = plan(Setup(config, method="full", strategy="fsdp", processes=16, activation_checkpointing=True))
    assert sixteen.parts["AdamW state (2 x fp32)"] * 16 == pytest.approx(one.parts["AdamW state (2 x fp32)"], rel=1e-6)
    assert "fsdp gathered root" in sixteen.parts and sixteen.peak < one.peak / 8
    assert activations_per_token(Setup(config)) > 0 and one.host_load > 0 and sixteen.peak > GiB
    # under fsdp a process never holds the whole model on the host: loading and saving stay at the size
    # of the embedding and head, or of one block, whatever the number of processes
    whole = sum(base_params(config).values()) * 2
    assert sixteen.host_load <= one.host_load < whole / 20 and sixteen.host_save < whole / 20
    ddp = plan(Setup(config, method="lora", strategy="ddp", processes=16))
    assert ddp.host_load >= whole  # every process maps the whole checkpoint


def test_a_finetune_script_prints_the_plan_of_its_flags_and_loads_nothing(tiny_checkpoint, lima_data, tmp_path, capsys):
    import json

    from conftest import load_script
    from lit_llama.cli import run
    from lit_llama.training import TrainArgs

    out_dir = tmp_path / "out"
    run(load_script("finetune/lora.py").setup,
        ["--data_dir", str(lima_data), "--checkpoint_dir", str(tiny_checkpoint), "--out_dir", str(out_dir),
         "--accelerator", "cpu", "--lora.r", "4", "--activation_checkpointing", "true", "--plan", "true"])
    prepared = json.loads((lima_data / "prepare.json").read_text())
    expected = Setup(LLaMAConfig.from_json(tiny_checkpoint / "model_config.json"), method="lora", precision="32-true",
                     micro_batch_size=TrainArgs().micro_batch_size, max_seq_length=prepared["report"]["longest"],
                     activation_checkpointing=True, lora=LoRAConfig(r=4), special_tokens=1, device_type="cpu")
    assert table(plan(expected)) in capsys.readouterr().out
    assert not out_dir.exists()  # nothing trained, nothing written
