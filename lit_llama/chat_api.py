"""`POST /v1/chat/completions`: the messages encoded in the training format, `n` replies, each ending
on the end-of-turn token, whole or streamed as server-sent events, with log-probabilities if asked.

    chat_completions(service, body)   the answer: a chat.completion, or a stream of chat.completion.chunk
"""

from typing import Any, AsyncIterator, Optional

from pydantic import BaseModel, Field

from lit_llama.api import APIError, Reply, SamplingRequest, Service, answer, merged, seed_of, token_text
from lit_llama.generate import Sampling
from lit_llama.logprobs import MAX_TOP, TokenLogprob
from lit_llama.prompt_records import parse_prompt_record
from lit_llama.prompts import encode_prompt


class Message(BaseModel):
    role: str
    content: str


class ChatCompletionRequest(SamplingRequest):
    """The fields of OpenAI's chat completion request that this server acts on."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP)

    @property
    def wanted(self) -> Optional[int]:
        """The most tokens the reply may take, if the client says."""
        return self.max_completion_tokens or self.max_tokens


def prompt_of(service: Service, body: ChatCompletionRequest) -> list[int]:
    """The ids of the request's messages, or an APIError naming what is wrong with the request."""
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
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


def content_logprobs(service: Service, scores: list[TokenLogprob]) -> list[dict]:
    """Chat's `logprobs.content` entries: each token's text, bytes and log-probability, and its alternatives."""
    def entry(token: int, logprob: float) -> dict:
        text = token_text(service.tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]} for s in scores]


class ChatCompletion:
    """One chat completion request: its `n` replies, submitted to the engine, and the answers made of them."""

    def __init__(self, service: Service, body: ChatCompletionRequest) -> None:
        self.service, self.body = service, body
        lora = service.check_model(body.model)
        self.ids = prompt_of(service, body)
        sampling = Sampling(body.temperature, None, body.top_p)
        top = (body.top_logprobs or 0) if body.logprobs else None
        self.replies = [Reply(service, self.ids, body.wanted or service.context - len(self.ids), sampling,
                              seed_of(body.seed, j), body.stop_strings, logprobs=top, lora=lora) for j in range(body.n)]
        self.head = service.head("chatcmpl", body.model)

    def usage(self) -> dict:
        n = sum(reply.completion_tokens for reply in self.replies)
        return {"prompt_tokens": len(self.ids), "completion_tokens": n, "total_tokens": len(self.ids) + n}

    def logprobs(self, scores: list[TokenLogprob]) -> Optional[dict]:
        """Chat's `logprobs` of the reply's tokens; the end-of-turn token that ends it is not part of it."""
        if not self.body.logprobs:
            return None
        return {"content": content_logprobs(self.service, [s for s in scores if s.token not in self.service.stop_ids])}

    async def choice(self, index: int) -> dict:
        reply, content, scores = self.replies[index], [], []
        async for piece, scored in reply.pieces():
            content.append(piece)
            scores += scored
        return {"index": index, "message": {"role": "assistant", "content": "".join(content)},
                "logprobs": self.logprobs(scores), "finish_reason": reply.finish_reason()}

    async def whole(self) -> dict:
        """The replies, once all are done, as one chat.completion."""
        choices = [await self.choice(j) for j in range(len(self.replies))]
        return {**self.head, "object": "chat.completion", "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list, **extra: Any) -> dict:
        return {**self.head, "object": "chat.completion.chunk", "choices": choices, **extra}

    async def deltas(self, index: int) -> AsyncIterator[dict]:
        """Reply `index` as chunks: its role, a chunk per piece of text, and its finish reason."""
        yield self.chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}])
        reply = self.replies[index]
        async for piece, scored in reply.pieces():
            yield self.chunk([{"index": index, "delta": {"content": piece}, "logprobs": self.logprobs(scored),
                               "finish_reason": None}])
        yield self.chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reply.finish_reason()}])

    def chunks(self) -> AsyncIterator[dict]:
        """The replies' chunks, in the order their pieces are decoded."""
        return merged([self.deltas(j) for j in range(len(self.replies))])


async def chat_completions(service: Service, body: ChatCompletionRequest) -> Any:
    completion = ChatCompletion(service, body)
    usage = (lambda: completion.chunk([], usage=completion.usage())) if body.with_usage else None
    return await answer(completion.whole, completion.chunks, usage, body.stream)
