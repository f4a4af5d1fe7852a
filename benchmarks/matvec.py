"""How fast one decoding step's matrix-vector products read their weights on this CPU, by the way they are
computed: the 51 matrices of a 120M step (10 blocks of qkv, proj, fc1, fc2, mlp proj), cycled so that none
stays in cache, batch 1.

- eager: `F.linear`, as our eager step runs it (aten's matrix-vector product);
- template: inductor with `freezing` and `max_autotune`, as `compile_step` compiles on the CPU;
- reduction: the product written as `(x * w).sum(-1)` with fp32 accumulation, compiled by inductor;
- reduction after a norm: the same with an RMSNorm before each product, as in the model, which inductor
  fuses into the reduction.

    python benchmarks/matvec.py --dtype bfloat16
"""

import time
from typing import Literal

import torch
import torch.nn.functional as F
from torch._inductor import config as inductor_config

from common import table
from decode import DTYPES
from lit_llama.cli import run

WAYS = ("eager", "template", "reduction", "reduction after a norm")


def shapes(n_embd: int = 768, hidden: int = 2048, n_layer: int = 10) -> list[tuple[int, int]]:
    return [(3 * n_embd, n_embd), (n_embd, n_embd), (hidden, n_embd), (hidden, n_embd), (n_embd, hidden)] * n_layer


class Products(torch.nn.Module):
    """Each weight applied to the input's first in_features entries, the outputs summed."""

    def __init__(self, way: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.way = way
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s, dtype=dtype) * 0.02, requires_grad=False)
                                              for s in shapes())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros((), dtype=torch.float32)
        for w in self.weights:
            v = x[:, : w.shape[1]]  # (1, in)
            if self.way == "reduction after a norm":
                v32 = v.float()
                v = (v32 * torch.rsqrt(v32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
            if self.way.startswith("reduction"):
                y = (v.float().unsqueeze(1) * w.float()).sum(-1)  # (1, out)
            else:
                y = F.linear(v, w)
            total = total + y.float().sum()
        return total


def gb_per_s(way: str, dtype: torch.dtype, steps: int) -> float:
    module = Products(way, dtype).eval()
    x = torch.randn(1, max(s[1] for s in shapes()), dtype=dtype)
    nbytes = sum(w.numel() for w in module.weights) * dtype.itemsize
    with torch.inference_mode(), inductor_config.patch(freezing=way == "template"):
        step = module if way == "eager" else torch.compile(module, options={"max_autotune": way == "template"})
        for _ in range(3):
            step(x)
        start = time.perf_counter()
        for _ in range(steps):
            step(x)
        return nbytes * steps / (time.perf_counter() - start)


def main(*, dtype: Literal["float32", "bfloat16"] = "bfloat16", threads: int = 2, steps: int = 50) -> None:
    """Weights read per second by each way of computing a step's matrix-vector products.

    Args:
        dtype: the weights' dtype
        threads: torch threads
        steps: timed steps, after 3 untimed
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = [[way, f"{gb_per_s(way, DTYPES[dtype], steps) / 1e9:.1f}"] for way in WAYS]
    table(f"the 51 matrices of one 120M step, {dtype}, {threads} threads", ["", "GB/s"], rows)


if __name__ == "__main__":
    run(main)
