"""An OpenAI-compatible server over the continuous batch: `GET /v1/models`, `POST /v1/chat/completions`
and `POST /v1/completions` (plain or streamed as server-sent events), and vLLM's `POST /tokenize` and
`POST /detokenize`.

    create_app(engine, tokenizer, model_name)   the FastAPI app; uvicorn serves it (generate/serve.py)

The endpoints live beside it: lit_llama/chat_api.py and lit_llama/completions_api.py, over what they
share (lit_llama/api.py) and the engine that steps the batch (lit_llama/engine.py).

FastAPI and uvicorn, not a serving framework that batches for us: the decoder's continuous batch is
the scheduler, and a framework's own request batching would sit in front of it and wait. uvicorn
drains on Ctrl-C or SIGTERM: it stops accepting connections, lets the open replies finish, then the
app's shutdown stops the engine.
"""

import secrets
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from lit_llama.api import APIError, Service, validation_error
from lit_llama.chat_api import ChatCompletionRequest, Message, chat_completions
from lit_llama.completions_api import CompletionRequest, completions
from lit_llama.engine import Engine
from lit_llama.prompt_records import parse_prompt_record
from lit_llama.prompts import encode_prompt
from lit_llama.tokenizer import Tokenizer


def models(service: Service) -> dict:
    """The models a client may ask for: the one served, or the base and each LoRA served beside it."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": service.created,
                                        "owned_by": "lit-llama-lima"} for name in service.names]}


class TokenizeRequest(BaseModel):
    """vLLM's: a text (`prompt`, encoded after BOS unless add_special_tokens is false), or chat `messages`
    (encoded in the training format, as the chat endpoint reads them)."""

    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[Message]] = Field(None, min_length=1)
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    tokens: list[int]


def tokenize(service: Service, body: TokenizeRequest) -> dict:
    if body.model is not None:
        service.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give either prompt or messages", param="prompt")
    if body.messages is not None:
        try:
            record = parse_prompt_record({"messages": [m.model_dump() for m in body.messages]})
        except ValueError as e:
            raise APIError(400, str(e), param="messages")
        ids = encode_prompt(service.tokenizer, record.turns, record.system)
    else:
        ids = service.tokenizer.encode(body.prompt, bos=body.add_special_tokens)
    return {"count": len(ids), "max_model_len": service.context, "tokens": ids}


def detokenize(service: Service, body: DetokenizeRequest) -> dict:
    if body.model is not None:
        service.check_model(body.model)
    vocab = service.engine.decoder.model.config.vocab_size
    if not all(0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"tokens holds an id outside 0..{vocab - 1}", param="tokens")
    return {"prompt": service.tokenizer.decode(body.tokens)}


def authorized(service: Service, request: HTTPRequest) -> bool:
    return service.api_key is None or secrets.compare_digest(request.headers.get("authorization", ""),
                                                             f"Bearer {service.api_key}")


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, api_key: Optional[str] = None) -> FastAPI:
    """The app serving `engine`'s model as `model_name` (with several LoRAs, the base, beside the LoRAs its
    decoder's bank names); with `api_key`, requests must bear it."""
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
    async def chat(body: ChatCompletionRequest) -> Any:
        return await chat_completions(service, body)

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest) -> Any:
        return await completions(service, body)

    @app.post("/tokenize")
    async def tokens(body: TokenizeRequest) -> dict:
        return tokenize(service, body)

    @app.post("/detokenize")
    async def text(body: DetokenizeRequest) -> dict:
        return detokenize(service, body)

    return app
