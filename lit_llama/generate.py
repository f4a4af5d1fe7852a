"""Decoding with a KV cache: the prompt is read once (prefill), then one token per step until a stop
id (the end-of-turn token; EOS as fallback) or `max_new_tokens`.

    generate(model, prompt_ids, ...)        -> Generation(tokens, stop_id)
    generate_batch(model, prompts, ...)     -> [Generation, ...], prompts of equal length decoded together
    Stream(tokenizer, steps, stop_ids)      the text of a reply as it is decoded
    Chat(model, tokenizer, ...)             turns of a conversation, the KV cache kept across them
    reply(model, tokenizer, ...)            what the generate/*.py scripts do with the model they load
"""

import json
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Sequence, Union

import torch

from lit_llama.checkpoint import GIVE_OUT_DIR, load_finetuned, load_model, require_dir
from lit_llama.model import LLaMA
from lit_llama.prompts import encode_prompt, system_warning
from lit_llama.tokenizer import Tokenizer

Precision = Literal["32-true", "bf16-true", "16-true"]
DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}


@dataclass
class Generation:
    tokens: list[int]  # the new tokens, without the stop id
    stop_id: Optional[int]  # the stop id that ended decoding; None if max_new_tokens did


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: the most likely token every step
    top_k: Optional[int] = None  # sample among the k most likely tokens only
    top_p: float = 1.0  # ... and among the fewest that hold this much of the probability

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top_k must be >= 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One id from the logits (V,) of the last position, as a (1,) tensor: greedy at temperature 0, else
    drawn from the `top_k` most likely ids, cut further to the fewest that hold `top_p` of the probability."""
    if temperature == 0.0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop an id once the more likely ones hold top_p already; the most likely always stays
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)


def compile_step(model: LLaMA) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model compiled for one-token steps: their shapes never change (the KV cache is preallocated),
    so one graph serves every step. Prompts of any length still run eagerly."""
    return torch.compile(model, fullgraph=True, dynamic=False)


class Decoder:
    """A model with a preallocated KV cache of `batch_size` rows and `max_seq_length` positions, and the
    ids the cache holds. A prompt is read in one forward pass, every token after it in one step, and a
    prompt that starts with what is cached (the next turn of a chat, another sample) reads only the rest."""

    def __init__(self, model: LLaMA, batch_size: int = 1, max_seq_length: Optional[int] = None,
                 step: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> None:
        self.model = model
        self.max_seq_length = max_seq_length or model.config.block_size
        model.set_kv_cache(batch_size=batch_size, max_seq_length=self.max_seq_length)
        self.step = model if step is None else step  # what runs one-token steps: the model, or compile_step(model)
        self.device = model.lm_head.weight.device
        self.ids: list[list[int]] = [[] for _ in range(batch_size)]  # what each row's cache holds
        self.prefilled = 0  # prompt tokens read by the last `prefill` (the rest came from the cache)
        self.steps, self.step_seconds = 0, 0.0  # one-token steps run, and their time

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.model.clear_kv_cache()

    def feed(self, idx: torch.Tensor) -> torch.Tensor:
        """Append `idx` (B, T) to the cache; the logits (B, V) after its last token."""
        start, T = len(self.ids[0]), idx.shape[1]
        if start + T > self.max_seq_length:
            raise ValueError(f"{start + T} tokens do not fit in the KV cache of {self.max_seq_length}")
        input_pos = torch.arange(start, start + T, device=self.device)
        begin = time.perf_counter()
        logits = (self.step(idx, input_pos) if T == 1 else self.model(idx, input_pos, last_only=True))[:, -1]
        for row, new in zip(self.ids, idx.tolist()):  # .tolist() waits for the device: the timing is true
            row.extend(new)
        if T == 1:
            self.steps, self.step_seconds = self.steps + 1, self.step_seconds + time.perf_counter() - begin
        return logits

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Make the cache hold `prompts` (one per row, all of one length), reading only what it does not
        hold yet: positions past the common prefix are overwritten, and the causal mask never lets a
        token see a stale position after its own. The logits (B, V) after the last prompt token."""
        keep = min(common_prefix(cached, prompt) for cached, prompt in zip(self.ids, prompts))
        keep = min(keep, len(prompts[0]) - 1)  # the last token is read again: its logits are needed
        for row in self.ids:
            del row[keep:]
        self.prefilled = len(prompts[0]) - keep
        return self.feed(torch.tensor([p[keep:] for p in prompts], device=self.device))

    def decode(self, prompts: list[list[int]], max_new_tokens: Union[int, Sequence[int]], sampling: Sampling,
               stop_ids: Sequence[int] = (), generators: Optional[list[Optional[torch.Generator]]] = None) -> Iterator[list[int]]:
        """The ids each row samples, step by step. A row is done once it sampled a stop id or its own
        `max_new_tokens` (one for all rows, or one per row) ids: what it samples later is to be ignored.
        Decoding ends when every row is done. Row i samples with `generators[i]`, so its tokens do not
        depend on the rows beside it."""
        generators = generators or [None] * len(prompts)
        limits = per_row(max_new_tokens, len(prompts))
        done = [False] * len(prompts)
        logits = self.prefill(prompts)
        for step in range(max(limits)):
            if sampling.temperature == 0.0:
                next_ids = logits.argmax(-1)
            else:
                next_ids = torch.cat([sample(row, sampling.temperature, sampling.top_k, sampling.top_p, g)
                                      for row, g in zip(logits, generators)])
            tokens = next_ids.tolist()
            yield tokens
            done = [d or t in stop_ids or step + 1 == limit for d, t, limit in zip(done, tokens, limits)]
            if all(done):
                return
            logits = self.feed(next_ids.unsqueeze(1))


def per_row(max_new_tokens: Union[int, Sequence[int]], rows: int) -> list[int]:
    """`max_new_tokens` as one limit per row."""
    limits = [max_new_tokens] * rows if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != rows or min(limits) < 1:
        raise ValueError(f"max_new_tokens must be at least 1 for each of the {rows} rows, got {max_new_tokens}")
    return limits


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def room_for(model: LLaMA, prompt_length: int, max_new_tokens: int) -> int:
    """How many tokens may follow a prompt: `max_new_tokens`, or fewer where the context ends first."""
    room = min(max_new_tokens, model.config.block_size - prompt_length)
    if room <= 0:
        raise ValueError(f"the prompt has {prompt_length} tokens: no room left in the model's context of "
                         f"{model.config.block_size}")
    return room


def collect(steps: Iterator[list[int]], limits: list[int], stop_ids: Sequence[int]) -> list[Generation]:
    """Each row's Generation from `Decoder.decode`'s steps: its ids up to a stop id or its limit."""
    results = [Generation([], None) for _ in limits]
    for n, tokens in enumerate(steps):
        for result, token, limit in zip(results, tokens, limits):
            if result.stop_id is not None or n >= limit:
                continue
            if token in stop_ids:
                result.stop_id = token
            else:
                result.tokens.append(token)
    return results


@torch.inference_mode()
def generate(model: LLaMA, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: float = 1.0, stop_ids: Sequence[int] = (),
             generator: Optional[torch.Generator] = None) -> Generation:
    """Decode after `prompt_ids` until a stop id or `max_new_tokens`."""
    return generate_batch(model, [prompt_ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          stop_ids=stop_ids, generators=[generator])[0]


@torch.inference_mode()
def generate_batch(model: LLaMA, prompts: list[list[int]], max_new_tokens: Union[int, Sequence[int]], *,
                   temperature: float = 0.0,
                   top_k: Optional[int] = None, top_p: float = 1.0, stop_ids: Sequence[int] = (),
                   generators: Optional[list[Optional[torch.Generator]]] = None, batch_size: int = 8,
                   compile: bool = False) -> list[Generation]:
    """`generate` for many prompts, in input order, each with its own `max_new_tokens` when a list is
    given. Prompts of one length share batches of up to `batch_size` rows (the model takes one set of
    positions for a whole batch, so rows of other lengths would need padding it cannot mask); each row
    stops on its own. Greedy, a row's tokens are those it gets decoded alone; sampled, too, when each
    prompt has its own generator."""
    sampling = Sampling(temperature, top_k, top_p)
    limits = per_row(max_new_tokens, len(prompts))
    generators = generators or [None] * len(prompts)
    step = compile_step(model) if compile else None
    by_length = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    results: list[Optional[Generation]] = [None] * len(prompts)
    for length, indices in sorted(by_length.items()):
        for start in range(0, len(indices), batch_size):
            rows = indices[start : start + batch_size]
            rooms = [room_for(model, length, limits[i]) for i in rows]
            # compiled steps keep one cache shape for every batch; eager ones size it to the need
            cache_length = model.config.block_size if compile else length + max(rooms)
            with Decoder(model, len(rows), cache_length, step) as decoder:
                steps = decoder.decode([prompts[i] for i in rows], rooms, sampling, stop_ids, [generators[i] for i in rows])
                for i, result in zip(rows, collect(steps, rooms, stop_ids)):
                    results[i] = result
    return results


def stop_reason(generation: Generation, tokenizer: Tokenizer) -> str:
    """Why decoding ended: "eot", "eos", "max_new_tokens", or the piece of another stop id."""
    if generation.stop_id is None:
        return "max_new_tokens"
    if generation.stop_id == tokenizer.eot_id:
        return "eot"
    if generation.stop_id == tokenizer.eos_id:
        return "eos"
    return tokenizer.processor.id_to_piece(generation.stop_id)


def resolve_stop_ids(tokenizer: Tokenizer, stop_on_eos: bool = True, stop_tokens: Sequence[str] = ()) -> tuple[int, ...]:
    """The ids that end a reply: the tokenizer's (EOT when it has one, and EOS), EOS left out unless
    `stop_on_eos`, plus `stop_tokens` named by special-token text, exact piece ("▁Human") or id."""
    ids = [i for i in tokenizer.stop_ids if stop_on_eos or i != tokenizer.eos_id]
    for token in stop_tokens:
        try:
            ids.append(tokenizer.special_tokens[token] if token in tokenizer.special_tokens else tokenizer.piece_id(token))
        except ValueError as e:
            raise ValueError(f"--stop_tokens: {e}") from None
    return tuple(dict.fromkeys(ids))


class Detokenizer:
    """Text of ids that arrive one at a time, each call giving only the new text. It decodes a small
    window, not the whole output: the ids emitted last (context, so sentencepiece puts the space before
    a "▁" piece) and those not emitted yet. Text is held back while it does not grow (a control piece,
    a lone "▁" at the start) or ends in an incomplete UTF-8 sequence (byte-fallback pieces of one char)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.context: list[int] = []
        self.pending: list[int] = []

    def add(self, token: int) -> str:
        self.pending.append(token)
        return self.emit(final=False)

    def flush(self) -> str:
        return self.emit(final=True) if self.pending else ""

    def emit(self, final: bool) -> str:
        before = self.tokenizer.decode(self.context)
        text = self.tokenizer.decode(self.context + self.pending)
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""
        self.context, self.pending = self.pending, []
        return text[len(before):]


class Stream:
    """One reply as it is decoded: iterate for its text, piece by piece; afterwards `generation` holds
    its tokens and stop id, as `generate` returns them. `steps` is `Decoder.decode` of one row."""

    def __init__(self, tokenizer: Tokenizer, steps: Iterator[list[int]], stop_ids: Sequence[int]) -> None:
        self.tokenizer, self.steps, self.stop_ids = tokenizer, steps, stop_ids
        self.generation = Generation([], None)

    def __iter__(self) -> Iterator[str]:
        detokenizer = Detokenizer(self.tokenizer)
        for (token,) in self.steps:
            if token in self.stop_ids:
                self.generation.stop_id = token
                break
            self.generation.tokens.append(token)
            if text := detokenizer.add(token):
                yield text
        if text := detokenizer.flush():
            yield text


class Chat:
    """A conversation in the training format, `<bos> user <EOT> assistant <EOT> ...`, whose KV cache is
    kept across turns: each turn reads only what the cache does not hold yet. The prompt of a turn is
    the whole conversation encoded as training encodes it, so a turn equals a fresh run on its history.
    When the prompt and a `max_new_tokens` reply would not fit in `max_seq_length`, the oldest
    exchanges are dropped, whole."""

    def __init__(self, model: LLaMA, tokenizer: Tokenizer, *, system: Optional[str] = None, max_new_tokens: int = 256,
                 max_seq_length: Optional[int] = None, sampling: Sampling = Sampling(),
                 stop_ids: Optional[Sequence[int]] = None, seed: int = 1234, compile: bool = False) -> None:
        if tokenizer.eot_id is None:  # refused now, not at every message
            raise ValueError("the tokenizer has no end-of-turn token (a base checkpoint?): chat with a fine-tune "
                             "(--lora_path, --adapter_path, or a full or merged checkpoint); continue plain text "
                             "with generate/base.py")
        if system is not None and (warning := system_warning(tokenizer)):
            print(warning, file=sys.stderr)
        self.tokenizer, self.system, self.max_new_tokens, self.sampling = tokenizer, system, max_new_tokens, sampling
        self.stop_ids = resolve_stop_ids(tokenizer) if stop_ids is None else tuple(stop_ids)
        self.decoder = Decoder(model, 1, max_seq_length, compile_step(model) if compile else None)
        self.generator = torch.Generator(self.decoder.device).manual_seed(seed)
        self.turns: list[str] = []  # user, assistant, user, ...: the history the next message joins
        self.dropped = 0  # turns dropped from the history to fit the last message
        self.last: Optional[Generation] = None

    def reset(self) -> None:
        self.turns = []

    def close(self) -> None:
        self.decoder.model.clear_kv_cache()

    def prompt(self, message: str) -> list[int]:
        """The ids of the history and `message`, after dropping the oldest exchanges that do not fit."""
        turns, limit = self.turns + [message], self.decoder.max_seq_length
        ids = encode_prompt(self.tokenizer, turns, self.system)
        while len(ids) + self.max_new_tokens > limit and len(turns) > 1:
            turns = turns[2:]
            ids = encode_prompt(self.tokenizer, turns, self.system)
        if len(ids) >= limit:
            raise ValueError(f"the message makes a prompt of {len(ids)} tokens: no room left in the context of {limit}")
        self.dropped = len(self.turns) + 1 - len(turns)
        self.turns = turns[:-1]
        return ids

    @torch.inference_mode()
    def send(self, message: str) -> Iterator[str]:
        """The reply to `message`, as text pieces while it is decoded. Once it is done, the message and
        the reply join the history and `last` holds the reply's tokens and stop id."""
        ids = self.prompt(message)
        room = min(self.max_new_tokens, self.decoder.max_seq_length - len(ids))
        stream = Stream(self.tokenizer, self.decoder.decode([ids], room, self.sampling, self.stop_ids, [self.generator]),
                        self.stop_ids)
        yield from stream
        self.turns += [message, self.tokenizer.decode(stream.generation.tokens)]
        self.last = stream.generation


def inference_device_dtype(precision: Optional[Precision] = None) -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype to run: `precision` when given, else bf16 on a GPU that supports it
    (fp16 on one that doesn't) and fp32 on the CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if precision is not None:
        return device, DTYPES[precision]
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def place(model: LLaMA, precision: Optional[Precision] = None) -> LLaMA:
    device, dtype = inference_device_dtype(precision)
    return model.to(device=device, dtype=dtype).eval()


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
        raise ValueError("pass --lora_path or --adapter_path, not both")
    out_dir = lora_path or adapter_path
    if out_dir is not None:
        # named by its flag here; load_finetuned, called by other scripts too, names the path only
        require_dir(out_dir, "--lora_path" if lora_path is not None else "--adapter_path", GIVE_OUT_DIR)
        return load_finetuned(out_dir, checkpoint_dir)
    if checkpoint_dir is None:
        raise ValueError("pass --checkpoint_dir, --lora_path or --adapter_path")
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
        raise ValueError("expected a string, a list of turns or an object")
    system = row.get("system")
    if "prompt" in row:
        turns = [row["prompt"]]
    elif "conversations" in row:
        turns = row["conversations"]
    elif "messages" in row:
        messages = row["messages"]
        if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
            system, messages = messages[0].get("content"), messages[1:]
        roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
        if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
            raise ValueError("messages must alternate user, assistant, ..., and end with the user's")
        turns = [m.get("content") for m in messages]
    else:
        raise ValueError("expected a 'prompt', 'conversations' or 'messages' field")
    if not turns or len(turns) % 2 != 1 or not all(isinstance(t, str) for t in turns):
        raise ValueError("expected an odd number of text turns, ending with the user's")
    if system is not None and not isinstance(system, str):
        raise ValueError("'system' must be a string")
    return PromptRow(row, turns, system)


def read_prompts(path: Path) -> list[PromptRow]:
    """The rows of a JSONL prompts file; a bad row is an error naming its file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(parse_prompt_row(json.loads(line)))
            except ValueError as e:  # json.JSONDecodeError is one
                raise ValueError(f"{path}:{n}: {e}") from None
    return rows


def prompt_ids(tokenizer: Tokenizer, turns: list[str], system: Optional[str], raw: bool) -> list[int]:
    """The training format's prompt, or with `raw` the text as it is, after bos (one turn only)."""
    if not raw:
        return encode_prompt(tokenizer, turns, system)
    if len(turns) != 1 or system is not None:
        raise ValueError("--raw takes a single prompt text, not turns or a system text")
    return tokenizer.encode(turns[0], bos=True)


def reply(model: LLaMA, tokenizer: Tokenizer, prompt: str = "How do plants drink water?", max_new_tokens: int = 256,
          temperature: float = 0.8, top_k: Optional[int] = 200, seed: int = 1234, *, top_p: float = 1.0,
          raw: bool = False, system: Optional[str] = None, num_samples: int = 1, stop_on_eos: bool = True,
          stop_tokens: tuple[str, ...] = (), prompts_file: Optional[Path] = None, output_file: Optional[Path] = None,
          batch_size: int = 8, precision: Optional[Precision] = None, compile: bool = False) -> None:
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
        stop_tokens: more tokens to stop on: special-token text, exact piece ("▁Human") or id
        prompts_file: a JSONL file, one prompt per line: "text", {"prompt": "text"}, or a conversation
            ending with a user turn ({"conversations": [...]}, {"messages": [{"role", "content"}, ...]})
        output_file: where the replies to `prompts_file` go, as JSONL (default: stdout); each row is the
            input row with "response", "stop_reason", "prompt_tokens" and "new_tokens" added
        batch_size: most prompts decoded together (prompts of equal token length share a batch)
        precision: 32-true, bf16-true or 16-true (default: bf16 on a GPU that supports it, else fp32)
        compile: compile the one-token decoding step with torch.compile (same outputs; pays off over
            long generations, the first step waits for the compilation)
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError("--num_samples and --batch_size must be at least 1")
    model = place(model, precision)
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
    with torch.inference_mode(), Decoder(model, 1, model.config.block_size if compile else len(ids) + room,
                                         compile_step(model) if compile else None) as decoder:
        for i in range(num_samples):
            generator = torch.Generator(device).manual_seed(seed + i)
            steps, seconds = decoder.steps, decoder.step_seconds
            start = time.perf_counter()
            stream = Stream(tokenizer, decoder.decode([ids], room, sampling, stop_ids, [generator]), stop_ids)
            for text in stream:
                print(text, end="", flush=True)
            print(flush=True)
            elapsed = time.perf_counter() - start
            n = len(stream.generation.tokens)
            decode_rate = (decoder.steps - steps) / max(decoder.step_seconds - seconds, 1e-9)
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
                             compile=compile)
    elapsed = time.perf_counter() - start
    out = open(output_file, "w", encoding="utf-8") if output_file is not None else sys.stdout
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
