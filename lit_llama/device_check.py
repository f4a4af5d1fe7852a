"""A simulated accelerator on the CPU: device mistakes fail here as they would on a GPU, and the reads
a GPU run would make from the device to the host are counted.

On a GPU, the model after `fabric.setup`, the batches after `fabric.to_device` and whatever is made with
`device=` the GPU live there; the rest (data read from disk, lists made into tensors, anything made
without a device) lives on the host. On a CPU both are one place, so a tensor left on the wrong side
goes unnoticed until the first GPU run. Under `DeviceCheck`:

- The accelerator is `torch.device("cpu", 0)`. Fabric's CPU devices, FSDP2's device and
  `simulated_accelerator()` (which inference asks first) are it, and `x.device` answers it for a
  tensor that lives there.
- Tensors made on it, moved to it or computed from it are marked, by storage, so views share the mark.
  A move to the host (`.cpu()`, `.to("cpu")`) gives an unmarked copy.
- An op that mixes marked tensors with host tensors raises `DeviceMismatch`, naming the op and the
  host tensors, unless CUDA allows the mix: a 0-dim host tensor in a pointwise op, host index tensors
  in indexing, and copies. Elsewhere it is as strict as CUDA or stricter.
- A random op whose generator lives on the other side raises too.
- Reads from the accelerator to the host are counted in `syncs` (`.item()`, `int(t)`, `.tolist()`,
  boolean-mask indexing, `nonzero`, copies to the host), and copies from the host in `uploads`.

Two hooks see all this. The dispatch mode sees every aten op, those of autograd and of torch's C++
included: that is where tensors are made and devices mix. The function mode sees the call as Python
code wrote it: that is where `x.device`, a move to the host (on a CPU, a no-op that never reaches an
aten op) and `torch.tensor(..., device=)` can be told apart. A tensor subclass that wraps each tensor
would be the other design; it would have to pass through FSDP2's DTensor, torchao's NF4Tensor and
the optimizers, where a mode sees them as they are.

`LIT_LLAMA_DEVICE_CHECK=1` turns it on for every command run through `lit_llama.cli.run` (and the
processes Fabric launches from one). torch.compile does not run under it: `DeviceCheck.outside` runs a
compiled step with the check off, and `graph_syncs` looks for reads back in the step's graph.
"""

import contextlib
import functools
import importlib
import threading
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.parallel import DistributedDataParallel
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

ENV = "LIT_LLAMA_DEVICE_CHECK"
ACCELERATOR = torch.device("cpu", 0)
aten = torch.ops.aten

# indexing takes host index tensors on CUDA (they are copied over); a boolean mask on the device
# becomes indices through nonzero, which waits for the device
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default,
             aten._unsafe_index.Tensor, aten._unsafe_index_put.default}
COPY_OPS = {aten.copy_.default, aten._to_copy.default, aten.lift_fresh.default, aten.lift_fresh_copy.default,
            aten.to.device, aten.to.dtype_layout, aten.to.other,
            # what compares or swaps tensors without computing (`param.data = ...`)
            aten._has_compatible_shallow_copy_type.default, aten.is_same_size.default, aten.set_.source_Tensor}
# ops whose result's shape or value the host needs before it can go on
SYNC_OPS = {aten._local_scalar_dense.default: "item", aten.nonzero.default: "nonzero",
            aten.masked_select.default: "masked_select", aten.equal.default: "equal",
            aten.repeat_interleave.Tensor: "repeat_interleave", aten._unique2.default: "unique",
            aten.unique_dim.default: "unique", aten.unique_consecutive.default: "unique"}
TO_HOST = {torch.Tensor.cpu, torch.Tensor.to}
DEVICE_OF = torch.Tensor.device.__get__  # `x.device`, as a function mode is handed it
FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}

_active: list["DeviceCheck"] = []


class DeviceMismatch(RuntimeError):
    """An op that a GPU run would refuse: it mixes tensors on the accelerator with host tensors."""


def simulated_accelerator() -> Optional[torch.device]:
    """The simulated accelerator while a `DeviceCheck` is on, else None."""
    return ACCELERATOR if _active else None


class _Generator(torch.Generator):
    """`torch.Generator` while a check is on: it remembers whether it was made on the accelerator."""

    def __new__(cls, device: Any = "cpu") -> "_Generator":
        generator = super().__new__(cls, device)
        generator.on_accelerator = torch.device(device) == ACCELERATOR
        return generator


class DeviceCheck:
    """While active, tensors on the simulated accelerator are marked, mixing them with host tensors
    fails, and `syncs` / `uploads` count the transfers (Counters by kind)."""

    def __init__(self) -> None:
        self.marked: dict[int, StorageWeakRef] = {}
        self.syncs: Counter = Counter()
        self.uploads: Counter = Counter()
        self.calls = threading.local()  # the Python call running now: is it on the accelerator?
        self.modes = (_FunctionMode(self), _DispatchMode(self))
        self.patches: list[tuple[Any, str, Any]] = []
        self.swept_at = 4096  # marks held after the last sweep of freed storages (at least this many)

    # marks ------------------------------------------------------------------------------------------

    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        if is_traceable_wrapper_subclass(tensor):  # DTensor, NF4Tensor: where their inner tensors are
            return any(self.on_accelerator(t) for t in _inner(tensor))
        key = _storage_key(tensor)
        ref = self.marked.get(key) if key is not None else None
        if ref is not None and ref.expired():
            del self.marked[key]
            return False
        return ref is not None

    def mark(self, tensor: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(tensor):
            for t in _inner(tensor):
                self.mark(t)
            return
        key = _storage_key(tensor)
        if key is None:
            return
        self.marked[key] = StorageWeakRef(tensor.untyped_storage())
        if len(self.marked) > 2 * self.swept_at:  # drop the marks of freed storages
            self.marked = {k: r for k, r in self.marked.items() if not r.expired()}
            self.swept_at = max(4096, len(self.marked))

    def unmark(self, tensor: torch.Tensor) -> None:
        for t in _inner(tensor) if is_traceable_wrapper_subclass(tensor) else [tensor]:
            self.marked.pop(_storage_key(t), None)

    def in_accelerator_call(self) -> bool:
        return getattr(self.calls, "accelerator", False)

    @contextlib.contextmanager
    def call(self, on_accelerator: bool) -> Iterator[None]:
        """A Python-level call running, on the accelerator or not: what C++ makes inside it is made there."""
        previous, self.calls.accelerator = self.in_accelerator_call(), on_accelerator
        try:
            yield
        finally:
            self.calls.accelerator = previous

    def total(self) -> tuple[int, int]:
        """(syncs, uploads) so far: take two and subtract to count what lies between."""
        return sum(self.syncs.values()), sum(self.uploads.values())

    # on and off -------------------------------------------------------------------------------------

    def __enter__(self) -> "DeviceCheck":
        from lightning.fabric.accelerators.cpu import CPUAccelerator, _parse_cpu_cores
        from lightning.fabric.strategies import SingleDeviceStrategy

        _fully_shard = importlib.import_module("torch.distributed.fsdp._fully_shard._fully_shard")
        mesh_device = _fully_shard._get_device_from_mesh
        self._patch(torch, "Generator", _Generator)
        # Fabric on CPU, and FSDP2 on a CPU mesh, place the model and batches on the accelerator
        self._patch(CPUAccelerator, "get_parallel_devices",
                    staticmethod(lambda devices: [ACCELERATOR] * _parse_cpu_cores(devices)))
        one_device = SingleDeviceStrategy.root_device.fget
        self._patch(SingleDeviceStrategy, "root_device",
                    property(lambda strategy: ACCELERATOR if one_device(strategy).type == "cpu" else one_device(strategy)))
        self._patch(_fully_shard, "_get_device_from_mesh",
                    lambda mesh: ACCELERATOR if mesh.device_type == "cpu" else mesh_device(mesh))
        # DDP's C++ reducer allocates its gradient buckets where the module is: on the device
        for name in ("__init__", "_pre_forward", "_post_forward"):
            self._patch(DistributedDataParallel, name, self.on_the_device(DistributedDataParallel.__dict__[name]))
        # foreach ops (gradient clipping, optimizers) group tensors by the device C++ sees
        group = torch._C._group_tensors_by_device_and_dtype
        self._patch(torch._C, "_group_tensors_by_device_and_dtype",
                    lambda tensorlistlist, *args: self.regroup(group(tensorlistlist, *args)))
        _active.append(self)
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self.modes):
            mode.__exit__(*exc)
        _active.remove(self)
        for owner, name, old in reversed(self.patches):
            setattr(owner, name, old)
        self.patches.clear()

    def outside(self, function: Callable) -> Callable:
        """`function` run with the check off, its tensor outputs marked as the accelerator's: a compiled graph,
        which torch.compile does not run under a dispatch mode. `graph_syncs` checks the graph's own ops."""
        @functools.wraps(function)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            for mode in reversed(self.modes):
                mode.__exit__(None, None, None)
            try:
                out = function(*args, **kwargs)
            finally:
                for mode in self.modes:
                    mode.__enter__()
            for tensor in _tensors(out):
                self.mark(tensor)
            return out
        return wrapped

    def on_the_device(self, method: Callable) -> Callable:
        """`method` run as one call on the accelerator: what C++ allocates in it is made there."""
        @functools.wraps(method)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.call(on_accelerator=True):
                return method(*args, **kwargs)
        return wrapped

    def regroup(self, groups: dict) -> dict:
        """Groups keyed by (device, dtype), with the accelerator's device where their tensors live."""
        def device(key: tuple, lists: list) -> torch.device:
            first = next((t for t in lists[0] if t is not None), None)
            return ACCELERATOR if first is not None and self.on_accelerator(first) else key[0]

        return {(device(key, lists), key[1]): (lists, indices) for key, (lists, indices) in groups.items()}

    def _patch(self, owner: Any, name: str, new: Any) -> None:
        self.patches.append((owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)))
        setattr(owner, name, new)


def graph_syncs(graph: torch.fx.GraphModule) -> list[str]:
    """The ops of an aten-level graph (as aot_autograd hands it to a compiler) that would read back to the host."""
    return [SYNC_OPS[node.target] for node in graph.graph.nodes if node.target in SYNC_OPS]


def _inner(tensor: torch.Tensor) -> list[torch.Tensor]:
    names, _ = tensor.__tensor_flatten__()
    return [inner for inner in (getattr(tensor, name) for name in names) if isinstance(inner, torch.Tensor)]


def _storage_key(tensor: torch.Tensor) -> Optional[int]:
    if tensor.is_meta:
        return None
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # a tensor without storage of its own
        return None


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _describe(tensors: list[torch.Tensor]) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in tensors)


def _device_argument(func: Any, args: tuple, kwargs: dict) -> Any:
    """The value of the op's `device` argument, if it has one (a factory, `_to_copy`, `to.device`)."""
    for i, argument in enumerate(func._schema.arguments):
        if argument.name == "device":
            return kwargs["device"] if "device" in kwargs else args[i] if i < len(args) else None
    return None


def _is_accelerator(device: Any) -> bool:
    return device is not None and not isinstance(device, torch.Tensor) and torch.device(device) == ACCELERATOR


class _DispatchMode(TorchDispatchMode):
    """Every aten op: mixes checked, syncs counted, outputs marked."""

    def __init__(self, check: DeviceCheck) -> None:
        super().__init__()
        self.check = check

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        check = self.check
        inputs = _tensors((args, kwargs))
        on, host = [], []
        for t in inputs:
            if check.on_accelerator(t):
                on.append(t)
            elif not t.is_meta:
                host.append(t)
        if on and host:
            self.allow_mix(func, args, on, host)
        if on and func in SYNC_OPS:
            check.syncs[SYNC_OPS[func]] += 1
        if func in INDEX_OPS and check.on_accelerator(args[0]):
            indices = [i for i in args[1] if i is not None]
            if any(i.dtype == torch.bool and check.on_accelerator(i) for i in indices):
                check.syncs["boolean-mask indexing"] += 1
        to_device = _device_argument(func, args, kwargs)
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if check.on_accelerator(dst) and not check.on_accelerator(src) and src.dim() > 0:
                check.uploads["copy"] += 1  # a 0-dim host value (t[i] = 3) goes as a kernel argument
            elif check.on_accelerator(src) and not check.on_accelerator(dst):
                check.syncs["copy to host"] += 1
        elif _is_accelerator(to_device) and inputs and not on:  # _to_copy, or in inference mode to itself
            check.uploads["to"] += 1

        out = func(*args, **kwargs)

        made_here = _is_accelerator(to_device) or (not inputs and check.in_accelerator_call())
        if on or made_here:
            kept = {_storage_key(t) for t in inputs}  # an output that views or updates an input keeps its side
            for t in _tensors(out):
                if is_traceable_wrapper_subclass(t) or _storage_key(t) not in kept:
                    check.mark(t)
        return out

    def allow_mix(self, func: Any, args: tuple, on: list[torch.Tensor], host: list[torch.Tensor]) -> None:
        """Return if CUDA takes this mix of accelerator and host tensors; raise DeviceMismatch if not."""
        if func in COPY_OPS:  # copies across, and what reads no values
            return
        if func in INDEX_OPS:  # host indices are copied over, and a 0-dim host value (x[i] = 0) is a scalar
            indices = {id(i) for i in args[1] if i is not None}
            if any(id(t) in indices for t in host):
                self.check.uploads["index"] += 1
            host = [t for t in host if id(t) not in indices and t.dim() > 0]
            if not host:
                return
        if torch.Tag.pointwise in func.tags and all(t.dim() == 0 for t in host):
            return
        raise DeviceMismatch(f"{func} mixes tensors on the accelerator ({_describe(on)}) with host tensors "
                             f"({_describe(host)}): on a GPU this fails; make the host tensor on the accelerator "
                             f"(device=...) or move it there")


class _FunctionMode(TorchFunctionMode):
    """Every torch call as Python code makes it: `x.device`, moves to the host, tensors from data,
    generators, and whether the call runs on the accelerator (the factories inside it then do too)."""

    def __init__(self, check: DeviceCheck) -> None:
        super().__init__()
        self.check = check

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        check = self.check
        if func == DEVICE_OF:
            return ACCELERATOR if check.on_accelerator(args[0]) else func(*args)
        inputs = _tensors((args, kwargs))
        on = any(check.on_accelerator(t) for t in inputs)
        if func in (torch.Tensor.tolist, torch.Tensor.numpy) and on:
            if func is torch.Tensor.numpy:
                raise DeviceMismatch("numpy() of a tensor on the accelerator: on a GPU this fails; .cpu() it first")
            check.syncs["tolist"] += 1
        device = kwargs.get("device")
        generator = kwargs.get("generator")
        call_on_accelerator = on or _is_accelerator(device)
        if generator is not None and getattr(generator, "on_accelerator", False) != call_on_accelerator:
            where = "the accelerator" if call_on_accelerator else "the host"
            raise DeviceMismatch(f"{getattr(func, '__name__', func)} runs on {where} with a generator made on the other "
                                 "side: on a GPU this fails; make the generator with the device of the tensors")
        if func in TO_HOST and on:
            target = torch.device("cpu") if func is torch.Tensor.cpu else self.target(args, kwargs)
            if target is not None and target != ACCELERATOR:
                return self.to_host(func, args, kwargs)
            if target == ACCELERATOR and not _changes_dtype(args, kwargs):
                return args[0]  # already there: no copy, as on a GPU

        with check.call(call_on_accelerator):
            out = func(*args, **kwargs)
        if func in FROM_DATA and _is_accelerator(device):
            check.uploads[func.__name__] += 1
            for t in _tensors(out):
                check.mark(t)
        return out

    def to_host(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """`.cpu()` or `.to(host)` of a tensor on the accelerator: an unmarked copy (on a CPU the call
        alone would return the same tensor)."""
        self.check.syncs["copy to host"] += 1
        out = func(*args, **kwargs)
        if _storage_key(out) is not None and _storage_key(out) == _storage_key(args[0]):
            out = out.clone()
        self.check.unmark(out)
        return out

    def target(self, args: tuple, kwargs: dict) -> Optional[torch.device]:
        """The device `Tensor.to(...)` asks for, if it names one (another tensor's included)."""
        for value in (*args[1:], kwargs.get("device"), kwargs.get("other")):
            if isinstance(value, torch.Tensor):
                return ACCELERATOR if self.check.on_accelerator(value) else value.device
            if isinstance(value, (str, torch.device)):
                return torch.device(value)
        return None


def _changes_dtype(args: tuple, kwargs: dict) -> bool:
    dtypes = [v for v in (*args[1:], kwargs.get("dtype")) if isinstance(v, torch.dtype)]
    return bool(dtypes) and dtypes[0] != args[0].dtype or bool(kwargs.get("copy"))
