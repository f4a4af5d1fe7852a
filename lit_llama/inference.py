"""What the generate scripts do around the decoder (lit_llama/generate.py): load the model they are
pointed at and place it where it runs, read prompts files, print replies with their stop reason, speed
and peak memory, and write JSONL replies. The flag groups the scripts share are defined here, once.

    ModelSource(lora_path, adapter_path, checkpoint_dir)   where the model comes from; .load() -> (model, tokenizer)
    Dtype, Placement                        the dtype it runs in; with NF4 and a compiled step
    place(model, precision, quantize)       the model on the GPU when there is one, in its dtype, maybe in NF4
    reply(model, tokenizer, replies=...)    what generate/*.py do with the model they load
"""

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Literal, Optional

import torch

from lit_llama.checkpoint import GIVE_OUT_DIR, load_finetuned, load_model
from lit_llama.cli import FlagGroup
from lit_llama.device_check import simulated_accelerator
from lit_llama.errors import BadValue, file_error
from lit_llama.files import require_dir
from lit_llama.decoder import Decoder, compile_step
from lit_llama.generate import Request, Sampling, Stopping, generate_batch, room_for, stop_reason
from lit_llama.model import LLaMA
from lit_llama.precision import gpu_computes_bf16
from lit_llama.prompt_records import PromptRecord, read_prompts
from lit_llama.prompts import encode_prompt, system_warning
from lit_llama.quantize import Quantize, nf4_tensor, quantize as quantize_weights
from lit_llama.streaming import Stream
from lit_llama.tokenizer import Tokenizer

Precision = Literal["32-true", "bf16-true", "16-true"]
DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}


def inference_device_dtype(precision: Optional[Precision] = None) -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype to run: `precision` when given, else bf16 on a GPU that computes it
    natively, fp16 on an older GPU, and fp32 on the CPU. Under a `DeviceCheck`, its simulated accelerator."""
    device = simulated_accelerator() or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if precision is not None:
        return device, DTYPES[precision]
    if device.type == "cuda":
        return device, torch.bfloat16 if gpu_computes_bf16() else torch.float16
    return device, torch.float32


def place(model: LLaMA, precision: Optional[Precision] = None, quantize: Optional[Quantize] = None) -> LLaMA:
    """The model where and in the dtype it runs. With `quantize`, the block weights are quantized a
    layer at a time on their way to the device, so the dense model is never there whole (a 70B base
    would need 140 GB); the rest follows, past the NF4 weights (moved to a dtype, one would dequantize)."""
    device, dtype = inference_device_dtype(precision)
    model.requires_grad_(False)  # nothing trains here: a checkpoint loads its weights as trainable parameters
    if quantize is None:
        return model.to(device=device, dtype=dtype).eval()
    quantize_weights(model, quantize, device, dtype)
    for param in model.parameters():
        if not isinstance(param, nf4_tensor()):  # embeddings, norms, the head
            param.data = param.data.to(device=device, dtype=dtype)
    return model.eval()


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak memory {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB"
    import resource  # the CPU peak is the process's: the model, the cache and everything else

    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, in KB elsewhere
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    return f"peak memory {peak / 1e9:.2f} GB (process)"


def load_for_inference(checkpoint_dir: Optional[Path] = None, lora_path: Optional[Path] = None,
                       adapter_path: Optional[Path] = None) -> tuple[LLaMA, Tokenizer]:
    """The model and tokenizer a script is pointed at: a LoRA or adapter out dir (on the base checkpoint
    it names, or `checkpoint_dir`), else a checkpoint dir (a base model, a merged LoRA, a full fine-tune)."""
    if lora_path is not None and adapter_path is not None:
        raise BadValue("pass --lora_path or --adapter_path, not both")
    out_dir = lora_path or adapter_path
    if out_dir is not None:
        # named by its flag here; load_finetuned, called by other scripts too, names the path only
        require_dir(out_dir, "--lora_path" if lora_path is not None else "--adapter_path", GIVE_OUT_DIR)
        return load_finetuned(out_dir, checkpoint_dir)
    if checkpoint_dir is None:
        raise BadValue("pass --checkpoint_dir, --lora_path or --adapter_path")
    return load_model(checkpoint_dir), Tokenizer.from_dir(checkpoint_dir)


@dataclass(frozen=True)
class ModelSource(FlagGroup):
    """Where the model comes from.

    Args:
        lora_path: a finetune/lora.py out dir
        adapter_path: a finetune/adapter.py out dir
        checkpoint_dir: a checkpoint dir (a full fine-tune or a merged LoRA; a base model where the script
            takes one), or the base checkpoint of --lora_path/--adapter_path (default: the one the out dir names)
    """

    lora_path: Optional[Path] = None
    adapter_path: Optional[Path] = None
    checkpoint_dir: Optional[Path] = None

    @property
    def path(self) -> Optional[Path]:
        """The dir the model is known by: its out dir, else its checkpoint dir."""
        return self.lora_path or self.adapter_path or self.checkpoint_dir

    def load(self) -> tuple[LLaMA, Tokenizer]:
        return load_for_inference(self.checkpoint_dir, self.lora_path, self.adapter_path)


@dataclass(frozen=True)
class Dtype(FlagGroup):
    """The dtype the model runs in.

    Args:
        precision: 32-true, bf16-true or 16-true (default: bf16 on a GPU that computes it natively, fp16
            on an older GPU, fp32 on the CPU)
    """

    precision: Optional[Precision] = None


@dataclass(frozen=True)
class Placement(Dtype):
    """How the model is placed and run.

    Args:
        quantize: nf4 stores the block weights in 4 bits (about a quarter of bf16's memory; needs torchao)
        compile: compile the one-token decoding step with torch.compile (same outputs; pays off over
            long generations, the first step waits for the compilation: tens of seconds on the CPU, where
            the step holds a second copy of the weights in the layout of inductor's matrix products)
    """

    quantize: Optional[Quantize] = None
    compile: bool = False


@dataclass(frozen=True)
class Replies(FlagGroup):
    """What to reply to, and where the replies go.

    Args:
        prompt: the user's message
        system: a system text before the conversation (when the fine-tune was trained with one)
        raw: feed the prompt as plain text after bos, without the conversation format (the default when
            the tokenizer has no end-of-turn token, as a base checkpoint's)
        num_samples: replies to generate for each prompt
        seed: seed of the sampling: reply n (from 0, in output order) samples with seed + n, so sample i
            of prompt j of a prompts file uses seed + j x num_samples + i
        prompts_file: a JSONL file, one prompt per line: "text", {"prompt": "text"}, or a conversation
            ending with a user turn ({"conversations": [...]}, {"messages": [{"role", "content"}, ...]})
        output_file: where the replies to `prompts_file` go, as JSONL (default: stdout); each row is the
            input row with "response", "stop_reason", "prompt_tokens" and "new_tokens" added
        batch_size: replies decoded side by side (a continuous batch: a finished row takes the next prompt)
    """

    prompt: str = "How do plants drink water?"
    system: Optional[str] = None
    raw: bool = False
    num_samples: int = 1
    seed: int = 1234
    prompts_file: Optional[Path] = None
    output_file: Optional[Path] = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.batch_size < 1:
            raise BadValue("--num_samples and --batch_size must be at least 1")


REPLY_SAMPLING = Sampling(temperature=0.8, top_k=200)  # what the generate scripts and chat sample with by default


def prompt_ids(tokenizer: Tokenizer, turns: list[str], system: Optional[str], raw: bool) -> list[int]:
    """The training format's prompt, or with `raw` the text as it is, after bos (one turn only)."""
    if not raw:
        return encode_prompt(tokenizer, turns, system)
    if len(turns) != 1 or system is not None:
        raise BadValue("--raw takes a single prompt text, not turns or a system text")
    return tokenizer.encode(turns[0], bos=True)


def reply(model: LLaMA, tokenizer: Tokenizer, *, replies: Replies = Replies(), sampling: Sampling = REPLY_SAMPLING,
          stopping: Stopping = Stopping(), placement: Placement = Placement()) -> None:
    """Reply to the prompt, formatted as one user turn exactly as in training: the reply streams to stdout
    as it is decoded; why it stopped, tokens/s and peak memory go to stderr. With a prompts file, reply
    to every record of it instead, in batches, and write one JSON record per reply."""
    model = place(model, placement.precision, placement.quantize)
    stop_ids = stopping.stop_ids(tokenizer)
    if tokenizer.eot_id is None and not replies.raw:
        stops = ", ".join(tokenizer.processor.id_to_piece(i) for i in stop_ids) or "nothing but --max_new_tokens"
        print(f"the tokenizer has no end-of-turn token (a base checkpoint?): the prompt goes in as plain text, "
              f"decoding stops on {stops}", file=sys.stderr)
        replies = replace(replies, raw=True)
    if replies.prompts_file is None:
        reply_to_prompt(model, tokenizer, replies=replies, sampling=sampling, stop_ids=stop_ids,
                        max_new_tokens=stopping.max_new_tokens, compile=placement.compile)
        return
    reply_to_file(model, tokenizer, read_prompts(replies.prompts_file), replies=replies, sampling=sampling,
                  stop_ids=stop_ids, max_new_tokens=stopping.max_new_tokens, compile=placement.compile)


def reply_to_prompt(model: LLaMA, tokenizer: Tokenizer, *, replies: Replies, sampling: Sampling,
                    stop_ids: tuple[int, ...], max_new_tokens: int, compile: bool) -> None:
    """Each sample of the reply to `replies.prompt`, streamed to stdout, with its stats on stderr."""
    ids = prompt_ids(tokenizer, [replies.prompt], replies.system, replies.raw)
    if replies.system is not None and (warning := system_warning(tokenizer)):
        print(warning, file=sys.stderr)
    room = room_for(model, len(ids), max_new_tokens)
    device = model.lm_head.weight.device
    # the cache holds what this prompt and its reply need, compiled or not (one graph per cache length)
    step = compile_step(model) if compile else None
    with torch.inference_mode(), Decoder(model, 1, len(ids) + room, step) as decoder:
        for i in range(replies.num_samples):
            generator = torch.Generator(device).manual_seed(replies.seed + i)
            stream_reply(tokenizer, decoder, Request(ids, room, sampling, stop_ids, generator))


def stream_reply(tokenizer: Tokenizer, decoder: Decoder, request: Request) -> None:
    """`request`'s reply printed as it is decoded, then why it stopped, its speed and the peak memory."""
    steps = decoder.steps
    start = time.perf_counter()
    stream = Stream(tokenizer, decoder, request)
    for text in stream:
        print(text, end="", flush=True)
    print(flush=True)
    end = time.perf_counter()
    elapsed, n = end - start, len(stream.generation.tokens)
    # after the first token, each step's token reaches the host one step after the last: steps / time
    # holds on a GPU too, where a step's launch returns before its work is done
    decode_rate = (decoder.steps - steps) / max(end - (stream.first_token_at or end), 1e-9)
    print(f"stop reason: {stop_reason(stream.generation, tokenizer)} after {n} tokens | {n / elapsed:.1f} tokens/s, "
          f"decode steps {decode_rate:.1f} tokens/s | {peak_memory(decoder.device)}", file=sys.stderr)


def reply_to_file(model: LLaMA, tokenizer: Tokenizer, records: list[PromptRecord], *, replies: Replies,
                  sampling: Sampling, stop_ids: tuple[int, ...], max_new_tokens: int, compile: bool) -> None:
    """Every sample of the reply to each record, decoded in a continuous batch, written as JSONL."""
    jobs = [(record, i) for record in records for i in range(replies.num_samples)]
    prompts = [prompt_ids(tokenizer, record.turns, record.system, replies.raw) for record, _ in jobs]
    device = model.lm_head.weight.device
    generators = [torch.Generator(device).manual_seed(replies.seed + j) for j in range(len(jobs))]  # reply j: seed + j
    start = time.perf_counter()
    results = generate_batch(model, prompts, max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                             top_p=sampling.top_p, stop_ids=stop_ids, generators=generators,
                             batch_size=replies.batch_size, compile=compile, progress=True)
    elapsed = time.perf_counter() - start
    written = []
    for (record, i), ids, result in zip(jobs, prompts, results):
        extra = {"sample": i} if replies.num_samples > 1 else {}
        written.append({**record.record, **extra, "response": tokenizer.decode(result.tokens),
                        "stop_reason": stop_reason(result, tokenizer), "prompt_tokens": len(ids),
                        "new_tokens": len(result.tokens)})
    write_jsonl(replies.output_file, written)
    reasons = Counter(stop_reason(result, tokenizer) for result in results)
    n = sum(len(r.tokens) for r in results)
    print(f"{len(results)} replies, stop reasons: {', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))} | "
          f"{n} tokens, {n / elapsed:.1f} tokens/s | {peak_memory(device)}", file=sys.stderr)


def write_jsonl(output_file: Optional[Path], records: Iterable[dict]) -> None:
    """`records` as JSON lines to `output_file` (--output_file), or to stdout."""
    try:
        out = open(output_file, "w", encoding="utf-8") if output_file is not None else sys.stdout
    except OSError as e:  # its dir missing, a directory, not writable
        raise file_error(e, f"--output_file {output_file}") from None
    try:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
