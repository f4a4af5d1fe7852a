"""Text as it is decoded, and chat: the decoder (lit_llama/generate.py) gives ids one step at a time;
these turn them into text without decoding the whole reply again each step.

    Detokenizer(tokenizer)                  the new text of each id as it arrives
    Stream(tokenizer, decoder, request)     the text of a reply as it is decoded
    ReplyText(tokenizer, stop)              a reply's text as tokens arrive, cut at the first stop string
    Chat(model, tokenizer, ...)             turns of a conversation, the KV cache kept across them
"""

import time
from typing import Iterator, Optional, Sequence

import torch

from lit_llama.errors import BadValue
from lit_llama.decoder import Decoder, compile_step
from lit_llama.generate import Generation, Request, Sampling, decode, resolve_stop_ids
from lit_llama.model import LLaMA
from lit_llama.prompts import encode_prompt, system_warning
from lit_llama.tokenizer import Tokenizer


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


class ReplyText:
    """A reply's text as its tokens arrive. It ends before the first of the `stop` strings, which is
    not part of the reply; text that may be the start of one is held back until it is known not to be."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.detokenizer = Detokenizer(tokenizer)
        self.stop = [s for s in stop if s]
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.text += self.detokenizer.add(token)
        return self.release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.detokenizer.flush()
        return self.release(final=True)

    def release(self, final: bool) -> str:
        """The text not sent yet that is sure to be part of the reply (all of it when `final`)."""
        found = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True
        end = len(self.text)
        if not (final or self.stopped):
            end -= max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        piece, self.sent = self.text[self.sent : end], max(self.sent, end)
        return piece


class Chat:
    """A conversation in the training format, `<bos> user <EOT> assistant <EOT> ...`, whose KV cache is
    kept across turns: each turn reads only what the cache does not hold yet. The prompt of a turn is
    the whole conversation encoded as training encodes it, so a turn equals a fresh run on its history.
    When the prompt and a `max_new_tokens` reply would not fit in `max_seq_length`, the oldest
    exchanges are dropped, whole. `warnings` says what the caller should tell the user."""

    def __init__(self, model: LLaMA, tokenizer: Tokenizer, *, system: Optional[str] = None, max_new_tokens: int = 256,
                 max_seq_length: Optional[int] = None, sampling: Sampling = Sampling(),
                 stop_ids: Optional[Sequence[int]] = None, seed: int = 1234, compile: bool = False) -> None:
        if tokenizer.eot_id is None:  # refused now, not at every message
            raise BadValue("the tokenizer has no end-of-turn token (a base checkpoint?): chat with a fine-tune "
                           "(--lora_path, --adapter_path, or a full or merged checkpoint); continue plain text "
                           "with generate/base.py")
        warning = system_warning(tokenizer) if system is not None else None
        self.warnings: list[str] = [warning] if warning else []
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
