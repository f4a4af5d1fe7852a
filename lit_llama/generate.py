"""Decoding with a KV cache: the prompt is read once (prefill), then one token per step until a stop
id (the end-of-turn token; EOS as fallback) or `max_new_tokens`.

    generate(model, prompt_ids, ...)        -> Generation(tokens, stop_id)
    generate_batch(model, prompts, ...)     -> [Generation, ...], prompts of equal length decoded together
    Stream(tokenizer, steps, stop_ids)      the text of a reply as it is decoded
    Chat(model, tokenizer, ...)             turns of a conversation, the KV cache kept across them

What the generate scripts do around it (loading, prompts files, printing) is lit_llama/inference.py.
"""

import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from lit_llama.model import LLaMA
from lit_llama.prompts import encode_prompt, system_warning
from lit_llama.tokenizer import Tokenizer

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
