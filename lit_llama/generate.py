"""Decoding with a KV cache: the prompt is read once (prefill), then one token per step until a stop
id (the end-of-turn token; EOS as fallback) or `max_new_tokens`.

    generate(model, prompt_ids, ...)        -> Generation(tokens, stop_id)
    generate_batch(model, prompts, ...)     -> [Generation, ...], decoded in a continuous batch
    Decoder(model, batch_size, ...)         the KV cache: rows of their own lengths, read and stepped
    ContinuousBatch(decoder)                Requests decoded side by side, each row refilled once done
    Stream(tokenizer, decoder, request)     the text of a reply as it is decoded
    Chat(model, tokenizer, ...)             turns of a conversation, the KV cache kept across them

What the generate scripts do around it (loading, prompts files, printing) is lit_llama/inference.py.
"""

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from tqdm import tqdm

from lit_llama.errors import BadValue
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
            raise BadValue(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise BadValue(f"--top_k must be >= 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise BadValue(f"--top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One id from the logits (V,) of the last position, as a (1,) tensor on their device: greedy at
    temperature 0, else drawn from the `top_k` most likely ids (exactly k, ties broken by topk), cut
    further to the fewest that hold `top_p` of the probability."""
    if temperature == 0.0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        top = torch.topk(logits, top_k)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
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
    ids each row holds. Rows are independent sequences: each has its own length, and a prompt read into
    one row leaves the others as they are. A prompt that starts with what its row holds (the next turn
    of a chat, another sample) reads only the rest.

    Each row's next position lives on the device beside the cache, and steps take their tokens as a
    device tensor: a step copies nothing from the host and reads nothing back."""

    def __init__(self, model: LLaMA, batch_size: int = 1, max_seq_length: Optional[int] = None,
                 step: Optional[Callable[..., torch.Tensor]] = None) -> None:
        self.model = model
        self.max_seq_length = max_seq_length or model.config.block_size
        model.set_kv_cache(batch_size=batch_size, max_seq_length=self.max_seq_length)
        self.run_step = model if step is None else step  # what runs one-token steps: the model, or compile_step(model)
        self.compiled = step is not None
        self.device = model.lm_head.weight.device
        self.ids: list[list[int]] = [[] for _ in range(batch_size)]  # what each row's cache holds
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # where each row's next token goes
        self.active = torch.zeros(batch_size, dtype=torch.bool, device=self.device)  # rows that hold a sequence
        self.prefilled = 0  # prompt tokens read by the last `prefill` (the rest came from the cache)
        self.steps = 0  # one-token steps run

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.model.clear_kv_cache()

    @property
    def batch_size(self) -> int:
        return len(self.ids)

    def reset(self) -> None:
        """Forget what every row holds (after a failed step, whose writes to the cache are unknown)."""
        for row in range(self.batch_size):
            self.release(row)

    def release(self, row: int) -> None:
        """`row` holds nothing any more: its steps compute a throwaway token at position 0."""
        self.ids[row].clear()
        self.positions[row] = 0
        self.active[row] = False

    def prefill(self, row: int, prompt: list[int]) -> torch.Tensor:
        """Make `row` hold `prompt`, reading only what it does not hold yet: positions past the common
        prefix are overwritten, and the causal mask never lets a token see a stale position after its
        own. The logits (V,) after the last prompt token."""
        if not 0 < len(prompt) <= self.max_seq_length:
            raise BadValue(f"a prompt of {len(prompt)} tokens does not fit in the KV cache of {self.max_seq_length}")
        cached = self.ids[row]
        keep = min(common_prefix(cached, prompt), len(prompt) - 1)  # the last token is read again: its logits are needed
        del cached[keep:]
        idx = torch.tensor([prompt[keep:]], device=self.device)  # (1, T)
        input_pos = torch.arange(keep, len(prompt), device=self.device).unsqueeze(0)  # (1, T)
        logits = self.model(idx, input_pos, last_only=True, row=row, kv_length=len(prompt))[0, -1]
        cached.extend(prompt[keep:])
        self.positions[row] = len(prompt)
        self.active[row] = True
        self.prefilled = len(prompt) - keep
        return logits

    def feed(self, tokens: torch.Tensor, read: list[Optional[int]]) -> torch.Tensor:
        """Append one token to each row in one step: `tokens` (B,) on the device, `read` the same ids as
        the host has them, None for a row with nothing to decode (it is released). The logits (B, V)."""
        for row, token in enumerate(read):
            if token is None:
                if self.ids[row]:
                    self.release(row)
            elif len(self.ids[row]) >= self.max_seq_length:
                raise ValueError(f"a row of {len(self.ids[row]) + 1} tokens does not fit in the KV cache of "
                                 f"{self.max_seq_length}")
        # eager steps attend as far as the furthest row reaches; a compiled one keeps the cache's shape
        kv_length = None if self.compiled else max(len(ids) for ids in self.ids) + 1
        logits = self.run_step(tokens.view(-1, 1), self.positions.view(-1, 1), kv_length=kv_length)[:, -1]
        self.positions += self.active
        for ids, token in zip(self.ids, read):
            if token is not None:
                ids.append(token)
        self.steps += 1
        return logits


@dataclass(eq=False)
class Request:
    """A prompt to decode, how to decode it, and what decoding gave so far. Done once it sampled a stop
    id or `max_new_tokens` ids; `generation` then holds its tokens and stop id."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    stop_ids: Sequence[int] = ()
    generator: Optional[torch.Generator] = None  # its own, so its samples do not depend on its neighbours
    generation: Generation = field(default_factory=lambda: Generation([], None))
    done: bool = False

    def add(self, token: int) -> None:
        if token in self.stop_ids:
            self.generation.stop_id = token
        else:
            self.generation.tokens.append(token)
        self.done = self.generation.stop_id is not None or len(self.generation.tokens) >= self.max_new_tokens


class ContinuousBatch:
    """Requests decoded together on a `Decoder`, one token each per `step`. A request waits until a row
    is free; a row whose request is done takes the next waiting one in the next step, so the batch
    never waits for its slowest row. The cache is the decoder's: rows x max_seq_length, whatever the
    number of requests."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.waiting: deque[Request] = deque()
        self.rows: list[Optional[Request]] = [None] * decoder.batch_size
        self.logits: Optional[torch.Tensor] = None  # (B, V): what each row samples its next token from

    def submit(self, request: Request) -> None:
        if request.max_new_tokens < 1:
            raise BadValue(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        if len(request.prompt) + request.max_new_tokens > self.decoder.max_seq_length:
            raise BadValue(f"a prompt of {len(request.prompt)} tokens and {request.max_new_tokens} new tokens do not "
                           f"fit in the KV cache of {self.decoder.max_seq_length}")
        self.waiting.append(request)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(self.rows)

    def cancel(self, request: Request) -> None:
        """Stop decoding `request` (its client left, or a stop string ended it): its row frees up."""
        request.done = True
        if request in self.waiting:
            self.waiting.remove(request)
        self.rows = [None if r is request else r for r in self.rows]

    def step(self) -> list[tuple[Request, int]]:
        """Free rows take waiting requests (their prompts are read), then every row samples one token.
        Returns each request's token; a request that is done afterwards has left the batch. The sampled
        ids are read back to the host once per step, for all rows together."""
        for row in range(len(self.rows)):
            if self.rows[row] is None and self.waiting:
                request = self.waiting.popleft()
                logits = self.decoder.prefill(row, request.prompt)
                if self.logits is None:
                    self.logits = logits.new_zeros(len(self.rows), logits.shape[-1])
                self.logits[row] = logits
                self.rows[row] = request
        active = [(row, request) for row, request in enumerate(self.rows) if request is not None]
        if not active:
            return []
        tokens = self.logits.argmax(-1)  # (B,): greedy rows, and what free rows feed
        for row, request in active:
            s = request.sampling
            if s.temperature > 0.0:  # each with its own generator: a draw never depends on the neighbours
                tokens[row : row + 1] = sample(self.logits[row], s.temperature, s.top_k, s.top_p, request.generator)
        read = tokens.tolist()
        sampled, fed = [], [None] * len(self.rows)
        for row, request in active:
            request.add(read[row])
            sampled.append((request, read[row]))
            if request.done:
                self.rows[row] = None
            else:
                fed[row] = read[row]
        if any(self.rows):
            self.logits = self.decoder.feed(tokens, fed)
        return sampled

def decode(decoder: Decoder, request: Request) -> Iterator[int]:
    """The ids `request` samples, one per step, alone on `decoder`: a stop id, if one ends it, last."""
    batch = ContinuousBatch(decoder)
    batch.submit(request)
    while batch.busy:
        for _, token in batch.step():
            yield token


def room_for(model: LLaMA, prompt_length: int, max_new_tokens: int) -> int:
    """How many tokens may follow a prompt: `max_new_tokens`, or fewer where the context ends first."""
    room = min(max_new_tokens, model.config.block_size - prompt_length)
    if room <= 0:
        raise BadValue(f"the prompt has {prompt_length} tokens: no room left in the model's context of "
                       f"{model.config.block_size}")
    return room


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.inference_mode()
def generate(model: LLaMA, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: float = 1.0, stop_ids: Sequence[int] = (),
             generator: Optional[torch.Generator] = None) -> Generation:
    """Decode after `prompt_ids` until a stop id or `max_new_tokens`."""
    return generate_batch(model, [prompt_ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          stop_ids=stop_ids, generators=[generator])[0]


@torch.inference_mode()
def generate_batch(model: LLaMA, prompts: list[list[int]], max_new_tokens: Union[int, Sequence[int]], *,
                   temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
                   stop_ids: Sequence[int] = (), generators: Optional[list[Optional[torch.Generator]]] = None,
                   batch_size: int = 8, compile: bool = False, progress: bool = False) -> list[Generation]:
    """`generate` for many prompts, in input order, each with its own `max_new_tokens` when a list is
    given: a continuous batch of up to `batch_size` rows, prompts of any lengths side by side. Greedy,
    a reply's tokens are those it gets decoded alone; sampled, too, when each prompt has its own
    generator. `progress` shows a bar of replies done."""
    sampling = Sampling(temperature, top_k, top_p)
    if isinstance(max_new_tokens, int):
        max_new_tokens = [max_new_tokens] * len(prompts)
    if len(max_new_tokens) != len(prompts) or min(max_new_tokens, default=1) < 1:
        raise BadValue(f"max_new_tokens must be at least 1 for each of the {len(prompts)} prompts, got {max_new_tokens}")
    generators = generators or [None] * len(prompts)
    requests = [Request(prompt, room_for(model, len(prompt), limit), sampling, stop_ids, generator)
                for prompt, limit, generator in zip(prompts, max_new_tokens, generators)]
    if not requests:
        return []
    # sized to the longest request, compiled or not: block_size rows of a long-context model can take tens of GiB
    cache_length = max(len(r.prompt) + r.max_new_tokens for r in requests)
    with Decoder(model, min(batch_size, len(requests)), cache_length, compile_step(model) if compile else None) as decoder, \
            tqdm(total=len(requests), unit="reply", disable=not progress) as bar:
        batch = ContinuousBatch(decoder)
        for request in requests:
            batch.submit(request)
        while batch.busy:
            bar.update(sum(request.done for request, _ in batch.step()))
    return [request.generation for request in requests]


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
    `stop_on_eos`, plus `stop_tokens` named by special-token text, exact piece ("▁Human") or id (digits
    that are a piece name the piece)."""
    ids = [i for i in tokenizer.stop_ids if stop_on_eos or i != tokenizer.eos_id]
    for token in stop_tokens:
        try:
            ids.append(tokenizer.special_tokens[token] if token in tokenizer.special_tokens else tokenizer.piece_id(token))
        except ValueError as e:
            raise BadValue(f"--stop_tokens: {e}") from None
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
    """`request`'s reply as it is decoded alone on `decoder`: iterate for its text, piece by piece;
    afterwards `generation` holds its tokens and stop id, as `generate` returns them, and
    `first_token_at` the time (perf_counter) the host had the first one: the prompt's read ends there."""

    def __init__(self, tokenizer: Tokenizer, decoder: Decoder, request: Request) -> None:
        self.tokenizer, self.decoder, self.request = tokenizer, decoder, request
        self.first_token_at: Optional[float] = None

    @property
    def generation(self) -> Generation:
        return self.request.generation

    def __iter__(self) -> Iterator[str]:
        detokenizer = Detokenizer(self.tokenizer)
        for token in decode(self.decoder, self.request):
            self.first_token_at = self.first_token_at or time.perf_counter()
            if token in self.request.stop_ids:
                break
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
            raise BadValue("the tokenizer has no end-of-turn token (a base checkpoint?): chat with a fine-tune "
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
            raise BadValue(f"the message makes a prompt of {len(ids)} tokens: no room left in the context of {limit}")
        self.dropped = len(self.turns) + 1 - len(turns)
        self.turns = turns[:-1]
        return ids

    @torch.inference_mode()
    def send(self, message: str) -> Iterator[str]:
        """The reply to `message`, as text pieces while it is decoded. Once it is done, the message and
        the reply join the history and `last` holds the reply's tokens and stop id."""
        ids = self.prompt(message)
        room = min(self.max_new_tokens, self.decoder.max_seq_length - len(ids))
        stream = Stream(self.tokenizer, self.decoder, Request(ids, room, self.sampling, self.stop_ids, self.generator))
        yield from stream
        self.turns += [message, self.tokenizer.decode(stream.generation.tokens)]
        self.last = stream.generation
