"""What the generate scripts do around the decoder (lit_llama/generate.py): load the model they are
pointed at and place it where it runs, read prompts and prompts files, print replies with their stop
reason, speed and peak memory, and write JSONL replies.

    load_for_inference(checkpoint_dir, lora_path, adapter_path) -> (model, tokenizer)
    place(model, precision, quantize)       the model on the GPU when there is one, in its dtype, maybe in NF4
    reply(model, tokenizer, ...)            what generate/*.py do with the model they load
"""

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from lit_llama.checkpoint import GIVE_OUT_DIR, load_finetuned, load_model, require_dir
from lit_llama.device_check import simulated_accelerator
from lit_llama.errors import BadValue, file_error
from lit_llama.generate import (Decoder, Request, Sampling, Stream, compile_step, generate_batch, resolve_stop_ids,
                                room_for, stop_reason)
from lit_llama.model import LLaMA
from lit_llama.precision import gpu_computes_bf16
from lit_llama.prompts import encode_prompt, system_warning
from lit_llama.quantize import Quantize, nf4_tensor, quantize as quantize_weights
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


@dataclass
class PromptRow:
    row: dict  # what the prompts file holds (a bare prompt becomes {"prompt": ...}); the output row extends it
    turns: list[str]  # user, assistant, ..., user
    system: Optional[str] = None


def parse_prompt_row(row: Any) -> PromptRow:
    """A prompt: "text", {"prompt": "text"}, a list of turns ["user", "assistant", ..., "user"],
    {"conversations": [...]} or {"messages": [{"role", "content"}, ...]}; "system" optional."""
    if isinstance(row, str):
        row = {"prompt": row}
    elif isinstance(row, list):
        row = {"conversations": row}
    if not isinstance(row, dict):
        raise BadValue("expected a string, a list of turns or an object")
    system = row.get("system")
    if "prompt" in row:
        turns = [row["prompt"]]
    elif "conversations" in row:
        turns = row["conversations"]
    elif "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                     for m in messages):
            raise BadValue("'messages' must be a list of objects with a 'role' and a text 'content'")
        if messages and messages[0].get("role") == "system":
            system, messages = messages[0]["content"], messages[1:]
        roles = [m.get("role") for m in messages]
        if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
            raise BadValue("messages must alternate user, assistant, ..., and end with the user's")
        turns = [m["content"] for m in messages]
    else:
        raise BadValue("expected a 'prompt', 'conversations' or 'messages' field")
    if not isinstance(turns, list) or len(turns) % 2 != 1 or not all(isinstance(t, str) for t in turns):
        raise BadValue("expected an odd number of text turns, ending with the user's")
    if system is not None and not isinstance(system, str):
        raise BadValue("'system' must be a string")
    return PromptRow(row, turns, system)


def read_prompts(path: Path) -> list[PromptRow]:
    """The rows of a JSONL prompts file; a bad row is an error naming its file and line."""
    rows = []
    try:
        f = open(path, "rb")
    except OSError as e:  # missing, a directory, unreadable
        raise file_error(e, str(path)) from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(parse_prompt_row(json.loads(line.decode("utf-8"))))
            except ValueError as e:  # invalid UTF-8 and json.JSONDecodeError are ValueErrors too
                raise BadValue(f"{path}:{n}: {e}") from None
    return rows


def prompt_ids(tokenizer: Tokenizer, turns: list[str], system: Optional[str], raw: bool) -> list[int]:
    """The training format's prompt, or with `raw` the text as it is, after bos (one turn only)."""
    if not raw:
        return encode_prompt(tokenizer, turns, system)
    if len(turns) != 1 or system is not None:
        raise BadValue("--raw takes a single prompt text, not turns or a system text")
    return tokenizer.encode(turns[0], bos=True)


def reply(model: LLaMA, tokenizer: Tokenizer, prompt: str = "How do plants drink water?", max_new_tokens: int = 256,
          temperature: float = 0.8, top_k: Optional[int] = 200, seed: int = 1234, *, top_p: float = 1.0,
          raw: bool = False, system: Optional[str] = None, num_samples: int = 1, stop_on_eos: bool = True,
          stop_tokens: tuple[str, ...] = (), prompts_file: Optional[Path] = None, output_file: Optional[Path] = None,
          batch_size: int = 8, precision: Optional[Precision] = None, quantize: Optional[Quantize] = None,
          compile: bool = False) -> None:
    """Reply to `prompt`, formatted as one user turn exactly as in training: the reply streams to stdout
    as it is decoded; why it stopped, tokens/s and peak memory go to stderr. With `prompts_file`, reply to
    every row of it instead, in batches, and write one JSON row per reply.

    Args:
        prompt: the user's message
        max_new_tokens: most tokens to generate
        temperature: sampling temperature; 0 picks the most likely token every step
        top_k: sample among the k most likely tokens only
        seed: seed of the sampling (sample i of a prompt uses seed + i, row j of a prompts file seed + j)
        top_p: sample among the fewest most likely tokens that hold this much of the probability (1: all)
        raw: feed the prompt as plain text after bos, without the conversation format (the default when
            the tokenizer has no end-of-turn token, as a base checkpoint's)
        system: a system text before the conversation (when the fine-tune was trained with one)
        num_samples: replies to generate for each prompt
        stop_on_eos: stop on EOS as well as on the end-of-turn token
        stop_tokens: more tokens to stop on: special-token text, exact piece ("▁Human") or id (digits
            that are a piece name the piece)
        prompts_file: a JSONL file, one prompt per line: "text", {"prompt": "text"}, or a conversation
            ending with a user turn ({"conversations": [...]}, {"messages": [{"role", "content"}, ...]})
        output_file: where the replies to `prompts_file` go, as JSONL (default: stdout); each row is the
            input row with "response", "stop_reason", "prompt_tokens" and "new_tokens" added
        batch_size: replies decoded side by side (a continuous batch: a finished row takes the next prompt)
        precision: 32-true, bf16-true or 16-true (default: bf16 on a GPU that computes it natively, fp16
            on an older GPU, fp32 on the CPU)
        quantize: nf4 stores the block weights in 4 bits (about a quarter of bf16's memory; needs torchao)
        compile: compile the one-token decoding step with torch.compile (same outputs; pays off over
            long generations, the first step waits for the compilation)
    """
    if num_samples < 1 or batch_size < 1:
        raise BadValue("--num_samples and --batch_size must be at least 1")
    model = place(model, precision, quantize)
    sampling = Sampling(temperature, top_k, top_p)
    stop_ids = resolve_stop_ids(tokenizer, stop_on_eos, stop_tokens)
    if tokenizer.eot_id is None and not raw:
        stops = ", ".join(tokenizer.processor.id_to_piece(i) for i in stop_ids) or "nothing but --max_new_tokens"
        print(f"the tokenizer has no end-of-turn token (a base checkpoint?): the prompt goes in as plain text, "
              f"decoding stops on {stops}", file=sys.stderr)
        raw = True
    if prompts_file is not None:
        reply_to_file(model, tokenizer, read_prompts(prompts_file), output_file, max_new_tokens, sampling, seed, raw,
                      num_samples, stop_ids, batch_size, compile)
        return
    ids = prompt_ids(tokenizer, [prompt], system, raw)
    if system is not None and (warning := system_warning(tokenizer)):
        print(warning, file=sys.stderr)
    room = room_for(model, len(ids), max_new_tokens)
    device = model.lm_head.weight.device
    # the cache holds what this prompt and its reply need, compiled or not (one graph per cache length)
    with torch.inference_mode(), Decoder(model, 1, len(ids) + room, compile_step(model) if compile else None) as decoder:
        for i in range(num_samples):
            generator = torch.Generator(device).manual_seed(seed + i)
            steps = decoder.steps
            start = time.perf_counter()
            stream = Stream(tokenizer, decoder, Request(ids, room, sampling, stop_ids, generator))
            for text in stream:
                print(text, end="", flush=True)
            print(flush=True)
            end = time.perf_counter()
            elapsed, n = end - start, len(stream.generation.tokens)
            # after the first token, each step's token reaches the host one step after the last: steps / time
            # holds on a GPU too, where a step's launch returns before its work is done
            decode_rate = (decoder.steps - steps) / max(end - (stream.first_token_at or end), 1e-9)
            print(f"stop reason: {stop_reason(stream.generation, tokenizer)} after {n} tokens | {n / elapsed:.1f} tokens/s, "
                  f"decode steps {decode_rate:.1f} tokens/s | {peak_memory(device)}", file=sys.stderr)


def reply_to_file(model: LLaMA, tokenizer: Tokenizer, rows: list[PromptRow], output_file: Optional[Path],
                  max_new_tokens: int, sampling: Sampling, seed: int, raw: bool, num_samples: int,
                  stop_ids: tuple[int, ...], batch_size: int, compile: bool) -> None:
    jobs = [(row, i) for row in rows for i in range(num_samples)]
    prompts = [prompt_ids(tokenizer, row.turns, row.system, raw) for row, _ in jobs]
    device = model.lm_head.weight.device
    generators = [torch.Generator(device).manual_seed(seed + j) for j in range(len(jobs))]
    start = time.perf_counter()
    results = generate_batch(model, prompts, max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                             top_p=sampling.top_p, stop_ids=stop_ids, generators=generators, batch_size=batch_size,
                             compile=compile, progress=True)
    elapsed = time.perf_counter() - start
    try:
        out = open(output_file, "w", encoding="utf-8") if output_file is not None else sys.stdout
    except OSError as e:  # its dir missing, a directory, not writable
        raise file_error(e, f"--output_file {output_file}") from None
    try:
        for (row, i), ids, result in zip(jobs, prompts, results):
            extra = {"sample": i} if num_samples > 1 else {}
            out.write(json.dumps({**row.row, **extra, "response": tokenizer.decode(result.tokens),
                                  "stop_reason": stop_reason(result, tokenizer), "prompt_tokens": len(ids),
                                  "new_tokens": len(result.tokens)}, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    reasons = Counter(stop_reason(result, tokenizer) for result in results)
    n = sum(len(r.tokens) for r in results)
    print(f"{len(results)} replies, stop reasons: {', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))} | "
          f"{n} tokens, {n / elapsed:.1f} tokens/s | {peak_memory(device)}", file=sys.stderr)
