"""Decoding with a KV cache: the prompt is read once (prefill), then one token per step until a stop
id (the end-of-turn token; EOS as fallback) or `max_new_tokens`.

    generate(model, prompt_ids, ...)        -> Generation(tokens, stop_id)
    generate_batch(model, prompts, ...)     -> [Generation, ...], decoded in a continuous batch
    ContinuousBatch(decoder)                Requests decoded side by side, each slot refilled once done
    Sampling, Stopping                      how each token is drawn, and when a reply ends

The KV cache's slots are lit_llama/decoder.py; text as it is decoded, and chat, lit_llama/streaming.py;
what the generate scripts do around the decoder (loading, prompts files, printing) lit_llama/inference.py.
"""

from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
from tqdm import tqdm

from lit_llama.cli import FlagGroup
from lit_llama.decoder import Decoder, compile_step
from lit_llama.errors import BadValue
from lit_llama.logprobs import TokenLogprob, prompt_logprobs, token_logprob
from lit_llama.model import LLaMA
from lit_llama.tokenizer import Tokenizer


@dataclass
class Generation:
    tokens: list[int]  # the new tokens, without the stop id
    stop_id: Optional[int]  # the stop id that ended decoding; None if max_new_tokens did
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when asked: one per token, and the stop id's last


@dataclass(frozen=True)
class Sampling(FlagGroup):
    """How each next token is drawn.

    Args:
        temperature: sampling temperature; 0 picks the most likely token every step
        top_k: sample among the k most likely tokens only
        top_p: sample among the fewest most likely tokens that hold this much of the probability (1: all)
    """

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: float = 1.0

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


@dataclass(eq=False)
class Request:
    """A prompt to decode, how to decode it, and what decoding gave so far. Done once it sampled a stop
    id or `max_new_tokens` ids; `generation` then holds its tokens and stop id."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    stop_ids: Sequence[int] = ()
    generator: Optional[torch.Generator] = None  # its own, so its samples do not depend on its neighbours
    logprobs: Optional[int] = None  # score each new token, with this many alternatives (None: no scores)
    prompt_logprobs: Optional[int] = None  # score each prompt token too, with this many alternatives
    lora: int = 0  # which of the decoder's LoRAs decodes it (an index in its bank's names; 0: the base)
    generation: Generation = field(default_factory=lambda: Generation([], None))
    prompt_scores: list[Optional[TokenLogprob]] = field(default_factory=list)  # with prompt_logprobs, once read
    done: bool = False

    def add(self, token: int, logprob: Optional[TokenLogprob] = None) -> None:
        if token in self.stop_ids:
            self.generation.stop_id = token
        else:
            self.generation.tokens.append(token)
        self.generation.logprobs += [logprob] if logprob else []
        self.done = self.generation.stop_id is not None or len(self.generation.tokens) >= self.max_new_tokens


class ContinuousBatch:
    """Requests decoded together on a `Decoder`, one token each per `step`. A request waits until a slot
    is free; a slot whose request is done takes the next waiting one in the next step, so the batch
    never waits for its slowest request. The cache is the decoder's: slots x max_seq_length, whatever
    the number of requests."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.waiting: deque[Request] = deque()
        self.slots: list[Optional[Request]] = [None] * decoder.batch_size
        self.logits: Optional[torch.Tensor] = None  # (B, V): what each slot samples its next token from

    def submit(self, request: Request) -> None:
        if request.max_new_tokens < 1:
            raise BadValue(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        if len(request.prompt) + request.max_new_tokens > self.decoder.max_seq_length:
            raise BadValue(f"a prompt of {len(request.prompt)} tokens and {request.max_new_tokens} new tokens do not "
                           f"fit in the KV cache of {self.decoder.max_seq_length}")
        self.waiting.append(request)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(self.slots)

    def cancel(self, request: Request) -> None:
        """Stop decoding `request` (its client left, or a stop string ended it): its slot frees up."""
        request.done = True
        if request in self.waiting:
            self.waiting.remove(request)
        self.slots = [None if r is request else r for r in self.slots]

    def step(self) -> list[tuple[Request, int]]:
        """Free slots take waiting requests (their prompts read together, in one forward pass), then every
        slot samples one token. Returns each request's token; a request that is done afterwards has left
        the batch. The sampled ids are read back to the host once per step, for all slots together."""
        free = [slot for slot, request in enumerate(self.slots) if request is None]
        taken = [(slot, self.waiting.popleft()) for slot in free[: len(self.waiting)]]
        if taken:
            logits = self.read_prompts(taken)  # (n, V)
            if self.logits is None:
                self.logits = logits.new_zeros(len(self.slots), logits.shape[-1])
            for (slot, request), row in zip(taken, logits):
                self.logits[slot] = row
                self.slots[slot] = request
        active = [(slot, request) for slot, request in enumerate(self.slots) if request is not None]
        if not active:
            return []
        tokens = self.logits.argmax(-1)  # (B,): greedy slots, and what free slots feed
        for slot, request in active:
            s = request.sampling
            if s.temperature > 0.0:  # each with its own generator: a draw never depends on the neighbours
                tokens[slot : slot + 1] = sample(self.logits[slot], s.temperature, s.top_k, s.top_p, request.generator)
        read = tokens.tolist()
        sampled, fed = [], [None] * len(self.slots)
        for slot, request in active:
            scores = None if request.logprobs is None else token_logprob(self.logits[slot], tokens[slot : slot + 1],
                                                                          read[slot], request.logprobs)
            request.add(read[slot], scores)
            sampled.append((request, read[slot]))
            if request.done:
                self.slots[slot] = None
            else:
                fed[slot] = read[slot]
        if any(self.slots):
            self.logits = self.decoder.feed(tokens, fed)
        return sampled

    def read_prompts(self, taken: list[tuple[int, Request]]) -> torch.Tensor:
        """Prefill each request's prompt into its slot: the logits (n, V) their first tokens are drawn from.
        The prompts are read together in one forward pass, except those whose every token is scored."""
        plain = [(slot, request) for slot, request in taken if request.prompt_logprobs is None]
        logits = {}
        if plain:
            slots = [slot for slot, _ in plain]
            rows = self.decoder.prefill_many(slots, [r.prompt for _, r in plain], [r.lora for _, r in plain])
            logits = dict(zip(slots, rows))
        for slot, request in taken:
            if request.prompt_logprobs is not None:
                hidden = self.decoder.read(slot, request.prompt, 0, request.lora)  # (T, C): every position, to score each
                request.prompt_scores = prompt_logprobs(self.decoder.model, hidden, request.prompt, request.prompt_logprobs)
                logits[slot] = self.decoder.model.head(hidden[-1])
        return torch.stack([logits[slot] for slot, _ in taken])


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
    given: a continuous batch of up to `batch_size` slots, prompts of any lengths side by side. Greedy,
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
    # sized to the longest request, compiled or not: block_size positions per slot of a long-context model can take tens of GiB
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


@dataclass(frozen=True)
class Stopping(FlagGroup):
    """When a reply ends.

    Args:
        max_new_tokens: most tokens of one reply
        stop_on_eos: end a reply on EOS as well as on the end-of-turn token
        stop_tokens: more tokens that end a reply: special-token text, exact piece ("▁Human") or id
            (digits that are a piece name the piece)
    """

    max_new_tokens: int = 256
    stop_on_eos: bool = True
    stop_tokens: tuple[str, ...] = ()

    def stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        return resolve_stop_ids(tokenizer, self.stop_on_eos, self.stop_tokens)
