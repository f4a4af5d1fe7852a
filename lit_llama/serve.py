"""An OpenAI-compatible chat server over the continuous batch: `GET /v1/models` and
`POST /v1/chat/completions`, plain or streamed as server-sent events.

    Engine(decoder)                   the batch, stepped by a thread of its own; requests join from any thread
    Completion(service, body)         one chat completion: its request in flight, its text, its answers
    create_app(engine, tokenizer, ...) the FastAPI app; uvicorn serves it (generate/serve.py)

FastAPI and uvicorn, not a serving framework that batches for us: the decoder's continuous batch is
the scheduler, and a framework's own request batching would sit in front of it and wait. uvicorn
drains on Ctrl-C or SIGTERM: it stops accepting connections, lets the open replies finish, then the
app's shutdown stops the engine.
"""

import asyncio
import json
import queue
import secrets
import threading
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional, Union

import torch
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lit_llama.errors import UsageError
from lit_llama.generate import ContinuousBatch, Decoder, Request, Sampling, resolve_stop_ids
from lit_llama.prompt_records import parse_prompt_record
from lit_llama.prompts import encode_prompt
from lit_llama.streaming import ReplyText
from lit_llama.tokenizer import Tokenizer

Sink = Callable[[Union[tuple[int, bool], BaseException]], None]  # gets (token, done) per step, or the error


class Engine:
    """A `ContinuousBatch` on `decoder`, stepped by a thread of its own while any request is in it.
    `submit` and `cancel` may be called from any thread; each request's tokens go to its sink, called
    on the engine's thread."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.batch = ContinuousBatch(decoder)
        self.inbox: queue.SimpleQueue[tuple[str, Optional[Request], Optional[Sink]]] = queue.SimpleQueue()
        self.sinks: dict[Request, Sink] = {}
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self.running = False

    def start(self) -> None:
        self.running = True
        self.thread.start()

    def stop(self) -> None:
        self.inbox.put(("stop", None, None))
        self.thread.join()

    def submit(self, request: Request, sink: Sink) -> None:
        self.inbox.put(("submit", request, sink))

    def cancel(self, request: Request) -> None:
        self.inbox.put(("cancel", request, None))

    def take(self, block: bool) -> None:
        """Move what the inbox holds into the batch: waiting for one message first when `block`."""
        try:
            message = self.inbox.get(block=block)
            while True:
                kind, request, sink = message
                if kind == "submit":
                    try:
                        self.batch.submit(request)
                        self.sinks[request] = sink
                    except UsageError as error:  # checked by the caller already; a bad one fails alone
                        sink(error)
                elif kind == "cancel" and request in self.sinks:
                    self.batch.cancel(request)
                    del self.sinks[request]
                elif kind == "stop":
                    self.running = False
                message = self.inbox.get_nowait()
        except queue.Empty:
            pass

    @torch.inference_mode()
    def run(self) -> None:
        while self.running:
            self.take(block=not self.batch.busy)
            try:
                events = self.batch.step()
            except Exception as error:  # a failed step fails the requests in the batch, not the server
                traceback.print_exc()  # the server's log keeps the traceback; clients get a 500 naming the error
                for sink in self.sinks.values():
                    sink(error)
                self.sinks.clear()
                self.decoder.reset()  # what the failed step wrote to the cache is unknown: no slot is reused
                self.batch = ContinuousBatch(self.decoder)
                continue
            for request, token in events:
                self.sinks[request]((token, request.done))
                if request.done:
                    del self.sinks[request]


class Message(BaseModel):
    role: str
    content: str


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that this server acts on; others are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    n: int = 1

    @property
    def wanted(self) -> Optional[int]:
        """The most tokens the reply may take, if the client says."""
        return self.max_completion_tokens or self.max_tokens


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


def engine_error(error: BaseException) -> APIError:
    """What a request whose decoding failed gets: a 400 for a request the batch refused (it does not fit),
    a 500 naming the error for a failed step."""
    if isinstance(error, UsageError):
        return APIError(400, str(error), "context_length_exceeded", "messages")
    return APIError(500, f"decoding failed: {type(error).__name__}: {error}", kind="server_error")


def validation_error(error: RequestValidationError) -> APIError:
    """A 400 naming each field that is wrong and how ("body": the body as a whole)."""
    problems, params = [], []
    for e in error.errors():
        field = ".".join(str(part) for part in e["loc"][1:])  # loc starts with "body"
        if e["type"] == "json_invalid":
            problems.append(f"the request body is not valid JSON ({e['ctx']['error']} at character {e['loc'][-1]})")
        elif not field:
            problems.append(f"the request body must be a JSON object: {e['msg']}")
        else:
            problems.append(f"{field}: {e['msg']}")
            params.append(field)
    return APIError(400, "; ".join(problems), param=params[0] if params else None)


@dataclass
class Service:
    """What every endpoint needs: the engine, the model's tokenizer and name, and the API key."""

    engine: Engine
    tokenizer: Tokenizer
    model_name: str
    api_key: Optional[str] = None
    created: int = field(default_factory=lambda: int(time.time()))
    stop_ids: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.stop_ids = resolve_stop_ids(self.tokenizer)

    @property
    def context(self) -> int:
        return self.engine.decoder.max_seq_length


def models(service: Service) -> dict:
    return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": service.created,
                                        "owned_by": "lit-llama-lima"}]}


def prompt_of(service: Service, body: ChatCompletionRequest) -> list[int]:
    """The ids of the request's messages, or an APIError naming what is wrong with the request."""
    if body.model != service.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {service.model_name!r}",
                       "model_not_found", "model")
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    try:
        record = parse_prompt_record({"messages": [m.model_dump() for m in body.messages]})
    except ValueError as e:
        raise APIError(400, str(e), param="messages")
    ids = encode_prompt(service.tokenizer, record.turns, record.system)
    if len(ids) + (body.wanted or 1) > service.context:
        asked = f" and max_tokens asks for {body.wanted}" if body.wanted else ", leaving no room for a reply"
        raise APIError(400, f"the context holds {service.context} tokens; the messages take {len(ids)}{asked}",
                       "context_length_exceeded", "messages")
    return ids


class Completion:
    """One chat completion: its request, submitted to the engine, and the answers made of its tokens, whole
    or streamed. A stop string ends the reply early, and so does a client that leaves (the request then
    leaves the batch)."""

    def __init__(self, service: Service, body: ChatCompletionRequest) -> None:
        self.service, self.body = service, body
        self.ids = prompt_of(service, body)
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        generator = torch.Generator(service.engine.decoder.device).manual_seed(seed)
        sampling = Sampling(body.temperature, None, body.top_p)
        room = body.wanted or service.context - len(self.ids)
        self.request = Request(self.ids, room, sampling, service.stop_ids, generator)
        self.text = ReplyText(service.tokenizer, [body.stop] if isinstance(body.stop, str) else body.stop or [])
        self.tokens = self.submit()
        self.head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.model_name}

    def submit(self) -> asyncio.Queue:
        """Hand the request to the engine; its (token, done) pairs, or an error, arrive on the queue returned."""
        loop, tokens = asyncio.get_running_loop(), asyncio.Queue()
        self.service.engine.submit(self.request, lambda item: loop.call_soon_threadsafe(tokens.put_nowait, item))
        return tokens

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text as it is decoded."""
        try:
            while True:
                item = await self.tokens.get()
                if isinstance(item, BaseException):
                    raise engine_error(item)
                token, done = item
                if token not in self.service.stop_ids and (piece := self.text.add(token)):
                    yield piece
                if self.text.stopped or done:
                    break
            if piece := self.text.finish():
                yield piece
        finally:
            if not self.request.done:
                self.service.engine.cancel(self.request)

    def finish_reason(self) -> str:
        return "stop" if self.text.stopped or self.request.generation.stop_id is not None else "length"

    def usage(self) -> dict:
        n = len(self.request.generation.tokens)
        return {"prompt_tokens": len(self.ids), "completion_tokens": n, "total_tokens": len(self.ids) + n}

    async def whole(self) -> dict:
        """The reply, once it is done, as one chat.completion."""
        content = "".join([piece async for piece in self.pieces()])
        return {**self.head, "object": "chat.completion", "usage": self.usage(),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": self.finish_reason()}]}

    def chunk(self, choices: list, **extra: Any) -> str:
        data = {**self.head, "object": "chat.completion.chunk", "choices": choices, **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self) -> AsyncIterator[str]:
        """The reply as server-sent events, a chat.completion.chunk per piece of text."""
        yield self.chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        try:
            async for piece in self.pieces():
                yield self.chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        except APIError as error:  # the status went out with the first chunk: the error is an event
            yield f"data: {json.dumps(error.body())}\n\n"
            return
        yield self.chunk([{"index": 0, "delta": {}, "finish_reason": self.finish_reason()}])
        if (self.body.stream_options or {}).get("include_usage"):
            yield self.chunk([], usage=self.usage())
        yield "data: [DONE]\n\n"


async def chat_completions(service: Service, body: ChatCompletionRequest) -> Any:
    completion = Completion(service, body)
    if not body.stream:
        return await completion.whole()
    return StreamingResponse(completion.events(), media_type="text/event-stream")


def authorized(service: Service, request: HTTPRequest) -> bool:
    return service.api_key is None or secrets.compare_digest(request.headers.get("authorization", ""),
                                                             f"Bearer {service.api_key}")


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, api_key: Optional[str] = None) -> FastAPI:
    """The app serving `engine`'s model as `model_name`; with `api_key`, requests must bear it."""
    service = Service(engine, tokenizer, model_name, api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()  # after uvicorn let the open replies finish

    app = FastAPI(title="lit-llama-lima", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, error: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 by default; OpenAI's API answers 400
        return validation_error(error).response()

    @app.middleware("http")
    async def authorize(request: HTTPRequest, call_next: Callable) -> Any:
        if not authorized(service, request):
            return APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                            "invalid_api_key", kind="authentication_error").response()
        return await call_next(request)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return models(service)

    @app.post("/v1/chat/completions")
    async def completions(body: ChatCompletionRequest) -> Any:
        return await chat_completions(service, body)

    return app
