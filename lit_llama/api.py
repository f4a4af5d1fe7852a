"""What the OpenAI-compatible endpoints share (lit_llama/serve.py builds the app): the service, errors
in OpenAI's format, and a reply in flight on the engine.

    Service(engine, tokenizer, model_name)   the engine, the tokenizer, the models' names and API key
    APIError(status, message, ...)           an error the client caused, in OpenAI's format
    Reply(service, prompt, ...)              one request on the engine: its text as it is decoded, cut at
                                             the first stop string, and its tokens' log-probabilities
    merged(streams)                          several replies' events, in the order they come
    answer(whole, chunks, usage, stream)     the answer: whole, or its chunks as server-sent events
"""

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Union

import torch
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lit_llama.engine import Engine
from lit_llama.errors import UsageError
from lit_llama.generate import Request, Sampling, resolve_stop_ids
from lit_llama.logprobs import TokenLogprob
from lit_llama.streaming import Detokenizer, ReplyText
from lit_llama.tokenizer import Tokenizer


class SamplingRequest(BaseModel):
    """The fields every completion request shares (OpenAI's); fields no endpoint acts on are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else self.stop or []

    @property
    def with_usage(self) -> bool:
        """Whether a stream ends with a chunk of the token counts."""
        return bool((self.stream_options or {}).get("include_usage"))


class APIError(Exception):
    """An error the client caused, answered in OpenAI's error format."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def engine_error(error: BaseException, param: str) -> APIError:
    """What a request whose decoding failed gets: a 400 for a request the batch refused (it does not fit),
    a 500 naming the error for a failed step."""
    if isinstance(error, UsageError):
        return APIError(400, str(error), "context_length_exceeded", param)
    return APIError(500, f"decoding failed: {type(error).__name__}: {error}", kind="server_error")


def validation_error(error: RequestValidationError) -> APIError:
    """A 400 naming each field that is wrong and how ("body": the body as a whole)."""
    problems, params = [], []
    for e in error.errors():
        field_name = ".".join(str(part) for part in e["loc"][1:])  # loc starts with "body"
        if e["type"] == "json_invalid":
            problems.append(f"the request body is not valid JSON ({e['ctx']['error']} at character {e['loc'][-1]})")
        elif not field_name:
            problems.append(f"the request body must be a JSON object: {e['msg']}")
        else:
            problems.append(f"{field_name}: {e['msg']}")
            params.append(field_name)
    return APIError(400, "; ".join(problems), param=params[0] if params else None)


@dataclass
class Service:
    """What every endpoint needs: the engine, the model's tokenizer and name, and the API key. With
    several LoRAs on the engine's decoder, `names` are the base's (`model_name`) and each LoRA's."""

    engine: Engine
    tokenizer: Tokenizer
    model_name: str
    api_key: Optional[str] = None
    created: int = field(default_factory=lambda: int(time.time()))
    stop_ids: tuple[int, ...] = field(init=False)
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.stop_ids = resolve_stop_ids(self.tokenizer)
        bank = self.engine.decoder.bank
        self.names = [self.model_name, *bank.names[1:]] if bank is not None else [self.model_name]

    @property
    def context(self) -> int:
        return self.engine.decoder.max_seq_length

    def check_model(self, name: str) -> int:
        """The index of the model `name` in `names` (which LoRA decodes the request; 0: the base)."""
        if name not in self.names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{', '.join(map(repr, self.names))}", "model_not_found", "model")
        return self.names.index(name)

    def head(self, prefix: str, model: str) -> dict:
        """The fields every answer to one request for `model` shares."""
        return {"id": f"{prefix}-{secrets.token_hex(16)}", "created": int(time.time()), "model": model}


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token's own text, as the API names it in `logprobs`: its piece, with sentencepiece's word mark
    as a space and a byte piece as its byte (a lone byte of a longer character shows as U+FFFD)."""
    piece = tokenizer.processor.id_to_piece(token)
    if tokenizer.processor.is_byte(token):
        return bytes([int(piece[3:-1], 16)]).decode("utf-8", errors="replace")
    return piece.replace("\u2581", " ")


def text_offsets(tokenizer: Tokenizer, ids: list[int], context: list[int], start: int) -> list[int]:
    """Where each of `ids` starts in the text, counted from `start`, when it follows `context`: a token
    whose text is held back (part of a character, a lone word mark) starts where the text then is."""
    detokenizer, offsets, at = Detokenizer(tokenizer), [], start
    detokenizer.context = context[-4:]
    for token in ids:
        offsets.append(at)
        at += len(detokenizer.add(token))
    return offsets


def seed_of(seed: Optional[int], choice: int) -> int:
    """The seed of a request's `choice`-th sample: the client's, stepped per sample, or a random one."""
    return seed + choice if seed is not None else secrets.randbits(63)


class Reply:
    """One request on the engine: `pieces()` gives its text as it is decoded, ended early by a stop
    string or by the client leaving (the request then leaves the batch), with the log-probabilities of
    the tokens that made each piece when asked."""

    def __init__(self, service: Service, prompt: list[int], max_tokens: int, sampling: Sampling, seed: int,
                 stop: list[str], logprobs: Optional[int] = None, prompt_logprobs: Optional[int] = None,
                 param: str = "messages", continues: bool = False, lora: int = 0) -> None:
        """`continues`: the text goes on from the prompt's (a completion), so a first word gets its space;
        `lora`: the index of the model asked for in the service's names."""
        self.service, self.prompt, self.param = service, prompt, param
        generator = torch.Generator(service.engine.decoder.device).manual_seed(seed)
        self.request = Request(prompt, max_tokens, sampling, service.stop_ids, generator, logprobs=logprobs,
                               prompt_logprobs=prompt_logprobs, lora=lora)
        self.text = ReplyText(service.tokenizer, stop)
        if continues:
            self.text.detokenizer.context = prompt[-4:]
        loop, self.tokens = asyncio.get_running_loop(), asyncio.Queue()
        self.first: Optional[Any] = None  # the first item, once `started` took it
        service.engine.submit(self.request, lambda item: loop.call_soon_threadsafe(self.tokens.put_nowait, item))

    async def started(self) -> None:
        """Wait for the first token: the prompt has been read then (and scored, if asked)."""
        if self.first is None:
            self.first = await self.tokens.get()

    async def next_item(self) -> Any:
        item, self.first = (self.first, None) if self.first is not None else (await self.tokens.get(), None)
        return item

    async def pieces(self) -> AsyncIterator[tuple[str, list[TokenLogprob]]]:
        """The reply's text as it is decoded, and the scores of the tokens since the last piece (the engine
        may have scored more already: only those of the tokens taken so far go with a piece)."""
        scored, sent, taken = self.request.generation.logprobs, 0, 0
        try:
            while True:
                item = await self.next_item()
                if isinstance(item, BaseException):
                    raise engine_error(item, self.param)
                token, done = item
                taken += 1
                piece = self.text.add(token) if token not in self.service.stop_ids else ""
                if piece or (done and scored[sent:taken]):
                    yield piece, scored[sent:taken]
                    sent = min(taken, len(scored))
                if self.text.stopped or done:
                    break
            if piece := self.text.finish():
                yield piece, scored[sent:taken]
        finally:
            if not self.request.done:
                self.service.engine.cancel(self.request)

    def finish_reason(self) -> str:
        return "stop" if self.text.stopped or self.request.generation.stop_id is not None else "length"

    @property
    def completion_tokens(self) -> int:
        return len(self.request.generation.tokens)


async def merged(streams: list[AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """The items of several async iterators, as each comes; an error in one ends them all."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
            await queue.put(done)
        except BaseException as error:
            await queue.put(error)

    tasks = [asyncio.create_task(drain(stream)) for stream in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


def event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def server_sent(chunks: AsyncIterator[dict], usage: Optional[Callable[[], dict]]) -> AsyncIterator[str]:
    """`chunks` as server-sent events, then the usage chunk if asked, then [DONE]. An error once the first
    chunk went out (with the status) is an event of its own, and the last."""
    try:
        async for chunk in chunks:
            yield event(chunk)
    except APIError as error:
        yield event(error.body())
        return
    if usage is not None:
        yield event(usage())
    yield "data: [DONE]\n\n"


async def answer(whole: Callable[[], Awaitable[dict]], chunks: Callable[[], AsyncIterator[dict]],
                 usage: Optional[Callable[[], dict]], stream: bool) -> Any:
    """A request's answer: `whole()` once done, or with `stream` its `chunks()` as server-sent events."""
    if not stream:
        return await whole()
    return StreamingResponse(server_sent(chunks(), usage), media_type="text/event-stream")
