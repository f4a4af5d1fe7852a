"""A memory plan: what one fine-tuning step needs on each device, and what loading and saving need on
the host, worked out from the config alone (no model is built, nothing is loaded).

The peak on a device is what stays for the whole run (weights, AdamW's state, the gathered root under
fsdp) plus the largest of three moments of a step:

    forward   every block's saved activations, and the loss working on one chunk of positions
    backward  the same activations, plus one block recomputed (checkpointing) and its gradients
    step      every gradient, and AdamW's temporaries

Bytes are counted per tensor from what autograd saves in `model.py`, `lora.py`, `adapter.py` and
`loss.py` (read `activations_per_token` for the list). A GPU's allocator caches and rounds blocks, and
CUDA's context takes a few hundred MiB more: leave 10% or more of a device free.
"""

from dataclasses import dataclass, field
from typing import Literal

from lit_llama.adapter import AdapterConfig
from lit_llama.errors import BadValue
from lit_llama.loss import LOSS_CHUNK_SIZE
from lit_llama.lora import LoRAConfig
from lit_llama.model import LLaMAConfig
from lit_llama.precision import TrainPrecision
from lit_llama.quantize import BLOCK_SIZE, SCALER_BLOCK_SIZE

PlanMethod = Literal["lora", "adapter", "full", "qlora"]
GiB = 1024**3


@dataclass(frozen=True)
class Setup:
    """What the plan depends on. `device_type` "cpu" counts a dropout mask in the input's dtype and
    AdamW one tensor at a time, as torch does there (a GPU: a 1-byte mask, AdamW over all at once)."""

    config: LLaMAConfig
    method: PlanMethod = "lora"
    precision: TrainPrecision = "bf16-true"
    strategy: str = "auto"
    processes: int = 1
    micro_batch_size: int = 1
    max_seq_length: int = 2048
    activation_checkpointing: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    special_tokens: int = 1  # rows of `token_rows` (the end-of-turn token, and any other special one)
    checkpoint_bytes: int = 2  # bytes per weight in lit_model.pth (bf16 as converted from Hugging Face)
    device_type: str = "cuda"

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.processes > 1

    @property
    def base_method(self) -> str:
        return "lora" if self.method == "qlora" else self.method


@dataclass
class Plan:
    """The estimate: bytes per device by part, which moment of the step peaks, and the host's needs."""

    parts: dict[str, int]  # what stays for the whole run, then the peaking moment's parts
    moment: str  # forward, backward or step
    host_load: int  # per process, while loading
    host_load_note: str
    host_save: int  # on rank 0, while saving
    host_save_note: str

    @property
    def peak(self) -> int:
        return sum(self.parts.values())


def block_linear_shapes(c: LLaMAConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear layer of a block, as model.py makes them (q, k, v fused in c_attn)."""
    return {"attn.c_attn": ((c.n_head + 2 * c.n_query_groups) * c.head_size, c.n_embd),
            "attn.c_proj": (c.n_embd, c.n_embd), "mlp.c_fc1": (c.intermediate_size, c.n_embd),
            "mlp.c_fc2": (c.intermediate_size, c.n_embd), "mlp.c_proj": (c.n_embd, c.intermediate_size)}


def base_params(c: LLaMAConfig) -> dict[str, int]:
    """Parameters of the base model by kind: block linears, norms (two per block and ln_f), wte, lm_head."""
    linears = sum(o * i for o, i in block_linear_shapes(c).values())
    return {"block_linears": c.n_layer * linears, "norms": (2 * c.n_layer + 1) * c.n_embd,
            "wte": c.padded_vocab_size * c.n_embd, "lm_head": c.padded_vocab_size * c.n_embd}


def lora_targets(c: LLaMAConfig, lora: LoRAConfig) -> list[tuple[int, int, int]]:
    """(in, out rows with an update, enabled chunks) of each LoRALinear in one block."""
    kv = c.n_query_groups * c.head_size
    chunks = [size for size, on in ((c.n_embd, lora.query), (kv, lora.key), (kv, lora.value)) if on]
    targets = [(c.n_embd, sum(chunks), len(chunks))] if chunks else []
    if lora.projection:
        targets.append((c.n_embd, c.n_embd, 1))
    if lora.mlp:
        targets += [(c.n_embd, c.intermediate_size, 1)] * 2 + [(c.intermediate_size, c.n_embd, 1)]
    return targets


def lora_params(c: LLaMAConfig, lora: LoRAConfig) -> int:
    """A: (r * chunks, in) and B: (out rows, r) per LoRALinear (lora.py), in every block and on the head."""
    per_block = sum(lora.r * n * i + rows * lora.r for i, rows, n in lora_targets(c, lora))
    head = lora.r * c.n_embd + c.padded_vocab_size * lora.r if lora.head else 0
    return c.n_layer * per_block + head


def adapter_params(c: LLaMAConfig, adapter: AdapterConfig) -> int:
    """adapter_wte (prompt_length, n_embd) and a gate per head, in each layer from start_layer on."""
    return (c.n_layer - adapter.start_layer) * (adapter.prompt_length * c.n_head * c.head_size + c.n_head)


def nf4_bytes(numel: int, dtype_bytes: int) -> int:
    """torchao's NF4Tensor: 4-bit codes, an int8 scale per 64 weights, a scale of those per 256 scales in the
    weight's dtype, a mean and the 16-value table."""
    blocks = numel // BLOCK_SIZE
    return numel // 2 + blocks + blocks // SCALER_BLOCK_SIZE * dtype_bytes + 17 * dtype_bytes


def nf4_block_bytes(c: LLaMAConfig, dtype_bytes: int) -> int:
    """One block's linear weights in NF4."""
    return sum(nf4_bytes(o * i, dtype_bytes) for o, i in block_linear_shapes(c).values())


def frozen_bytes(precision: str) -> int:
    return 2 if precision == "bf16-true" else 4


def compute_bytes(precision: str) -> int:
    return 4 if precision == "32-true" else 2


def trained_params(s: Setup) -> int:
    """What trains: the method's parameters and the special tokens' two rows each (both, under every method)."""
    c = s.config
    rows = 2 * s.special_tokens * c.n_embd
    if s.base_method == "full":
        return sum(base_params(c).values()) + rows
    if s.base_method == "lora":
        return lora_params(c, s.lora) + rows
    return adapter_params(c, s.adapter) + rows


def frozen_weight_bytes(s: Setup) -> int:
    """The frozen base on one device (replicated under ddp, 1/N under fsdp): nothing under full; the block
    linears in NF4 under qlora."""
    if s.base_method == "full":
        return 0
    p, b = base_params(s.config), frozen_bytes(s.precision)
    if s.method == "qlora":
        linears = s.config.n_layer * nf4_block_bytes(s.config, b)
    else:
        linears = p["block_linears"] * b
    return (linears + (p["norms"] + p["wte"] + p["lm_head"]) * b) // shard(s)


def shard(s: Setup) -> int:
    return s.processes if s.sharded else 1


def residual_bytes(s: Setup) -> int:
    """The residual stream's dtype is wte's: fp32 when it trains (full) or is stored in fp32."""
    return 4 if s.base_method == "full" else frozen_bytes(s.precision)


def lora_linear_per_token(s: Setup, n_in: int, chunks: int) -> int:
    """A LoRALinear saves its dropped input (cast to the compute dtype, for A's gradient), the dropout mask
    and x A^T (for B's gradient)."""
    a = compute_bytes(s.precision)
    mask = (1 if s.device_type == "cuda" else frozen_bytes(s.precision)) if s.lora.dropout > 0 else 0
    return (a + mask) * n_in + a * s.lora.r * chunks


def activations_per_token(s: Setup) -> int:
    """Bytes one block saves for backward per position (B * T of them), without checkpointing:
    - each RMSNorm: its input in fp32 (pow), and, when its weight trains, the normed input
    - attention: q and k after rotary, the fused qkv output (v is a view of it), SDPA's output and
      its fp32 log-sum-exp per head (flash attention saves no T x T scores)
    - the MLP: c_fc1's output (silu), silu of it and c_fc2's output (their product)
    - a linear layer whose weight trains keeps its input (the MLP's c_proj: the product); LoRA, what
      `lora_linear_per_token` says; the adapter, its prompt attention's output and log-sum-exp."""
    c, a = s.config, compute_bytes(s.precision)
    C, KV, I = c.n_embd, c.n_query_groups * c.head_size, c.intermediate_size
    full = s.base_method == "full"
    norms = 2 * (4 * C + 4) + (2 * residual_bytes(s) * C if full else 0)
    attention = a * (C + KV) + a * (C + 2 * KV) + a * C + 4 * c.n_head
    mlp = 3 * a * I
    if full:
        linears = a * C + a * C + a * I  # c_attn's input, c_fc1/c_fc2's shared input, c_proj's (SDPA's output: counted)
    elif s.base_method == "lora":
        linears = sum(lora_linear_per_token(s, i, n) for i, _, n in lora_targets(c, s.lora))
    else:
        layers = c.n_layer - s.adapter.start_layer
        linears = (a * C + 4 * c.n_head) * layers // c.n_layer  # the gated prompt attention's output (on average)
    return norms + attention + mlp + linears


def weight_casts(s: Setup) -> tuple[int, bool]:
    """Half-precision copies of one block's linear weights beside its activations, and whether autocast's
    cache holds them through the whole forward pass (checkpointing or not): trained fp32 weights (full)
    are cached; frozen fp32 ones (bf16-mixed, 16-mixed) are cast per use and saved for the input's
    gradient. None under 32-true, for bf16 or NF4 weights (dequantized one at a time), or under fsdp,
    which gathers the weights in the compute dtype."""
    if s.precision == "32-true" or s.method == "qlora" or s.sharded:
        return 0, False
    full = s.base_method == "full"
    if not full and s.precision == "bf16-true":
        return 0, False
    return 2 * sum(o * i for o, i in block_linear_shapes(s.config).values()), full


def block_params(s: Setup) -> int:
    """One block's parameters: its linears and its two norms."""
    return sum(o * i for o, i in block_linear_shapes(s.config).values()) + 2 * s.config.n_embd


def resident(s: Setup) -> dict[str, int]:
    """What stays on a device for the whole run."""
    c, t = s.config, trained_params(s)
    parts = {"frozen weights": frozen_weight_bytes(s), "trained weights (fp32)": 4 * t // shard(s),
             "AdamW state (2 x fp32)": 8 * t // shard(s)}
    if s.strategy in ("auto", "ddp") and s.processes > 1:
        parts["ddp gradient buckets (fp32)"] = 4 * t
    if s.sharded:  # the root (wte, lm_head, ln_f) is gathered at the first forward and kept through backward
        gathered = 4 if s.precision == "32-true" else 2
        p = base_params(c)
        parts["fsdp gathered root"] = gathered * (p["wte"] + p["lm_head"] + c.n_embd)
    return parts


def forward_parts(s: Setup) -> dict[str, int]:
    """The end of the forward pass, at the loss's last chunk: activations, the head's inputs and
    gradient by the hidden states (worked out in the forward pass, `loss.HeadLoss`), and one chunk's
    fp32 logits and log-probabilities (and the probabilities in the compute dtype)."""
    c, a = s.config, compute_bytes(s.precision)
    n = s.micro_batch_size * s.max_seq_length
    per_block, cached = weight_casts(s)
    rope = 4 * s.max_seq_length * c.head_size * a if a != 4 else 0  # cos/sin cast for q and k
    if s.activation_checkpointing:
        acts = c.n_layer * (n * c.n_embd * residual_bytes(s) + (per_block if cached else 0))
    else:
        acts = c.n_layer * (n * activations_per_token(s) + per_block + rope)
    # ln_f's input in fp32, and the gradient by its output in the residual stream's dtype
    parts = {"activations": acts, "loss: hidden states and their gradient": n * c.n_embd * (4 + residual_bytes(s)),
             "loss: one chunk of logits": (8 + (2 if a == 2 else 0)) * min(LOSS_CHUNK_SIZE, n) * c.vocab_size}
    if s.base_method == "full":  # the head's gradient, summed in fp32, and one chunk's (compute dtype, then fp32)
        parts["loss: head gradient (fp32)"] = (4 + a + (4 if a == 2 else 0)) * c.vocab_size * c.n_embd
    parts.update(gathered_blocks(s))
    return parts


def gathered_blocks(s: Setup) -> dict[str, int]:
    """fsdp gathers the running block and prefetches the next, in the compute dtype when half: each is
    all-gathered into one flat buffer, then copied out into its weights, so a block's buffer is alive
    beside its weights. An NF4 block is gathered as its codes."""
    if not s.sharded:
        return {}
    b = 4 if s.precision == "32-true" else 2
    block = block_params(s) * b
    if s.method == "qlora":
        block = nf4_block_bytes(s.config, b) + 2 * s.config.n_embd * b
    return {"fsdp gathered blocks (2) and a gather buffer": 3 * block}


def block_work(s: Setup) -> int:
    """A block's backward pass: the gradient of the residual stream (and of the norm's output), and up to
    three (B, T, intermediate) gradients inside the MLP at once; the largest NF4 weight dequantized."""
    c, a = s.config, compute_bytes(s.precision)
    n = s.micro_batch_size * s.max_seq_length
    work = n * (3 * a * c.intermediate_size + 2 * residual_bytes(s) * c.n_embd)
    if s.method == "qlora":  # torchao decodes through an int64 index per weight, beside three copies in its dtype
        work += max(o * i for o, i in block_linear_shapes(c).values()) * (8 + 3 * frozen_bytes(s.precision))
    return work


def backward_parts(s: Setup) -> dict[str, int]:
    """The first block's backward: activations still stored, the head's gradient made (full), one block
    recomputed (checkpointing), its working gradients, and under fsdp its gradients unsharded."""
    c = s.config
    n = s.micro_batch_size * s.max_seq_length
    per_block, _ = weight_casts(s)
    fwd = forward_parts(s)
    parts = {"activations": fwd["activations"], "loss: hidden states and their gradient": n * c.n_embd * 4}
    if s.activation_checkpointing:
        parts["one block recomputed"] = n * activations_per_token(s) + per_block
    parts["block backward"] = block_work(s)
    if s.base_method == "full":
        parts["gradients so far (head)"] = 4 * c.padded_vocab_size * c.n_embd // shard(s)
        if s.sharded:
            parts["fsdp unsharded block gradients (fp32)"] = 4 * block_params(s)
    parts.update(gathered_blocks(s))
    return parts


def step_parts(s: Setup) -> dict[str, int]:
    """The optimizer step: every gradient (fp32), and AdamW's temporaries: on a GPU (foreach) the square
    root of every second moment at once, on a CPU that of one tensor at a time (its root and the division)."""
    t = trained_params(s)
    temp = 4 * t // shard(s) if s.device_type == "cuda" else 2 * 4 * largest_trained(s)
    return {"gradients (fp32)": 4 * t // shard(s), "AdamW temporaries": temp}


def largest_trained(s: Setup) -> int:
    """The largest trained tensor: wte or lm_head (full), a LoRA matrix, an adapter prompt, or a token row block."""
    c = s.config
    if s.base_method == "full":
        return c.padded_vocab_size * c.n_embd
    sizes = [s.special_tokens * c.n_embd]
    if s.base_method == "lora":
        sizes += [max(s.lora.r * n * i, rows * s.lora.r) for i, rows, n in lora_targets(c, s.lora)]
        sizes += [c.padded_vocab_size * s.lora.r] if s.lora.head else []
    else:
        sizes.append(s.adapter.prompt_length * c.n_embd)
    return max(sizes)


def host_load(s: Setup) -> tuple[int, str]:
    """Without fsdp, every process loads the whole checkpoint (memory-mapped: shared in the page cache by
    the processes of one node) and converts to fp32 what trains, and the frozen rest to its dtype, in its
    own memory. Under fsdp (sharded.py) a process builds the embedding and head whole and what the method
    adds, and reads the blocks one at a time: its rows of each (qlora: each whole, to quantize it)."""
    p = base_params(s.config)
    t = trained_params(s)
    if s.strategy == "fsdp":  # the sharded loader, whatever the number of processes
        root = (p["wte"] + p["lm_head"]) * (4 if s.base_method == "full" else frozen_bytes(s.precision))
        made = 0 if s.base_method == "full" else 4 * t
        block = block_params(s) * s.checkpoint_bytes
        read = block if s.method == "qlora" else block // s.processes
        note = (f"each process: the embedding and head whole, {root / GiB:.1f} GiB, and "
                f"{'each block whole' if s.method == 'qlora' else 'its rows of each block'}, one at a time")
        return root + made + read, note
    p = sum(p.values())
    frozen = 0 if s.base_method == "full" else p
    converted = (4 * t if s.checkpoint_bytes != 4 else 0)
    converted += frozen * frozen_bytes(s.precision) if frozen_bytes(s.precision) != s.checkpoint_bytes else 0
    mapped = p * s.checkpoint_bytes
    note = (f"each process maps the whole {mapped / GiB:.1f} GiB checkpoint (shared per node) and holds "
            f"{converted / GiB:.1f} GiB of converted weights of its own")
    return mapped + converted, note


def host_save(s: Setup) -> tuple[int, str]:
    """Rank 0 gathers what trains on the CPU in fp32 (a full fine-tune: also a copy in the checkpoint's
    dtype to write). Under fsdp a full fine-tune is gathered one unit at a time (the root, or a block),
    and each process writes its own shards of the training state."""
    t = trained_params(s)
    if s.strategy != "fsdp":
        return 4 * t + (s.checkpoint_bytes * t if s.base_method == "full" else 0), "rank 0: the trained weights in fp32"
    # the training state's shards go to disk a tensor at a time, from each process
    if s.base_method == "full":
        p = base_params(s.config)
        unit = max(p["wte"] + p["lm_head"] + 2 * s.special_tokens * s.config.n_embd, block_params(s))
        return (4 + s.checkpoint_bytes) * unit, "rank 0: the largest unit (the root, or a block) in fp32 and as written"
    return 4 * t, "rank 0: the trained weights in fp32"


def plan(s: Setup) -> Plan:
    """The peak per device: what stays, plus the largest moment of a step."""
    if s.strategy not in ("auto", "ddp", "fsdp"):
        raise BadValue(f"--strategy {s.strategy!r} is not one of auto, ddp, fsdp")
    if s.method == "qlora" and s.processes > 1 and not s.sharded:
        raise BadValue("qlora (--quantize nf4) on several processes needs --strategy fsdp")
    moments = {"forward": forward_parts(s), "backward": backward_parts(s), "step": step_parts(s)}
    moment = max(moments, key=lambda m: sum(moments[m].values()))
    load, load_note = host_load(s)
    save, save_note = host_save(s)
    return Plan({**resident(s), **moments[moment]}, moment, load, load_note, save, save_note)


def table(p: Plan) -> str:
    """The parts and the totals, in GiB."""
    width = max(len(name) for name in p.parts) + 2
    lines = [f"{name:<{width}}{size / GiB:>9.2f} GiB" for name, size in p.parts.items()]
    lines += ["-" * (width + 13), f"{'peak per device (' + p.moment + ')':<{width}}{p.peak / GiB:>9.2f} GiB",
              f"{'host, loading':<{width}}{p.host_load / GiB:>9.2f} GiB  ({p.host_load_note})",
              f"{'host, saving':<{width}}{p.host_save / GiB:>9.2f} GiB  ({p.host_save_note})"]
    return "\n".join(lines)
