"""`POST /v1/completions`, OpenAI's legacy completions: plain text continued, no chat format. A prompt
is a string (encoded after BOS), a list of token ids (taken as they are), or a list of either (a batch).
With `echo` the answer starts with the prompt, and with `logprobs` it scores every token, the
prompt's included: what lm-evaluation-harness's `local-completions` reads to score a continuation.

    completions(service, body)   the answer: a text_completion, or a stream of them
"""

from typing import Any, AsyncIterator, Optional, Union

from pydantic import Field

from lit_llama.api import (APIError, Reply, SamplingRequest, Service, answer, merged, seed_of, text_offsets,
                           token_text)
from lit_llama.generate import Sampling
from lit_llama.logprobs import MAX_TOP, TokenLogprob

Prompt = Union[str, list[int], list[str], list[list[int]]]


class CompletionRequest(SamplingRequest):
    """The fields of OpenAI's completion request that this server acts on."""

    prompt: Prompt
    max_tokens: int = Field(16, ge=0)  # 0 with echo: score the prompt only
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP)


def prompts_of(service: Service, body: CompletionRequest) -> list[list[int]]:
    """The ids of each prompt, or an APIError naming what is wrong with the request."""
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 gives nothing without echo: true", param="max_tokens")
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    ids = [service.tokenizer.encode(p, bos=True) if isinstance(p, str) else p for p in prompts]
    vocab = service.engine.decoder.model.config.vocab_size
    for i, p in enumerate(ids):
        if not p:
            raise APIError(400, f"prompt {i} is empty", param="prompt")
        if not all(0 <= t < vocab for t in p):
            raise APIError(400, f"prompt {i} holds a token id outside 0..{vocab - 1}", param="prompt")
        if len(p) + max(body.max_tokens, 1) > service.context:
            raise APIError(400, f"the context holds {service.context} tokens; prompt {i} takes {len(p)} and max_tokens "
                           f"asks for {body.max_tokens}", "context_length_exceeded", "prompt")
    return ids


class Choice:
    """One sample of one prompt: its reply on the engine, and with `echo`, the prompt before it. Its
    `logprobs` score the stop id that ended it too (text of its own: none), as lm-eval expects after the
    prompt: the one token `max_tokens: 1` decodes is the last, whatever it is."""

    def __init__(self, service: Service, body: CompletionRequest, index: int, prompt: list[int], lora: int) -> None:
        self.service, self.body, self.index, self.prompt = service, body, index, prompt
        sampling = Sampling(body.temperature, None, body.top_p)
        scored = body.logprobs is not None
        # with max_tokens 0 one token is decoded all the same (a request samples at least one), and dropped
        self.reply = Reply(service, prompt, max(body.max_tokens, 1), sampling, seed_of(body.seed, index % body.n),
                           body.stop_strings, logprobs=body.logprobs if scored else None,
                           prompt_logprobs=body.logprobs if scored and body.echo else None, param="prompt",
                           continues=True, lora=lora)
        self.sent = ""  # the text answered so far
        self.ids: list[int] = []  # the tokens scored so far

    def logprobs(self, scores: list[Optional[TokenLogprob]], ids: list[int]) -> Optional[dict]:
        """The legacy `logprobs` object of `ids` (None: the prompt's first token), following what was sent."""
        if self.body.logprobs is None:
            return None
        tokenizer = self.service.tokenizer
        offsets = text_offsets(tokenizer, ids, self.ids, len(self.sent))
        self.ids += ids
        return {"tokens": [token_text(tokenizer, t) for t in ids],
                "token_logprobs": [s.logprob if s else None for s in scores],
                "top_logprobs": [{token_text(tokenizer, t): lp for t, lp in s.top} if s else None for s in scores],
                "text_offset": offsets}

    def piece(self, text: str, logprobs: Optional[dict], finish_reason: Optional[str] = None) -> dict:
        self.sent += text
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    async def pieces(self) -> AsyncIterator[dict]:
        """The choice as pieces: with echo, the prompt first; then the reply's, and the last with its finish reason."""
        if self.body.echo:
            if self.body.logprobs is not None:
                await self.reply.started()  # the prompt is read, and scored
            yield self.piece(self.service.tokenizer.decode(self.prompt),
                             self.logprobs(self.reply.request.prompt_scores, self.prompt))
        async for text, scored in self.reply.pieces():
            if self.body.max_tokens == 0:
                break
            yield self.piece(text, self.logprobs(scored, [s.token for s in scored]))
        yield self.piece("", None, "length" if self.body.max_tokens == 0 else self.reply.finish_reason())

    @property
    def completion_tokens(self) -> int:
        return min(self.reply.completion_tokens, self.body.max_tokens)


class Completion:
    """One completion request: a choice per prompt and sample (index = prompt * n + sample), whole or streamed."""

    def __init__(self, service: Service, body: CompletionRequest) -> None:
        self.service, self.body = service, body
        lora = service.check_model(body.model)
        self.prompts = prompts_of(service, body)
        self.choices = [Choice(service, body, i * body.n + j, p, lora) for i, p in enumerate(self.prompts)
                        for j in range(body.n)]
        self.head = {**service.head("cmpl", body.model), "object": "text_completion"}

    def usage(self) -> dict:
        prompt, completion = sum(map(len, self.prompts)), sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def whole(self) -> dict:
        choices = []
        for choice in self.choices:
            text, merged_logprobs, reason = "", None, None
            async for piece in choice.pieces():
                text, reason = text + piece["text"], piece["finish_reason"]
                if piece["logprobs"]:
                    merged_logprobs = {k: (merged_logprobs or {}).get(k, []) + v for k, v in piece["logprobs"].items()}
            if self.body.logprobs is not None and merged_logprobs is None:
                merged_logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            choices.append({"index": choice.index, "text": text, "logprobs": merged_logprobs, "finish_reason": reason})
        return {**self.head, "choices": choices, "usage": self.usage()}

    def chunks(self) -> AsyncIterator[dict]:
        """The choices' pieces as text_completion chunks, in the order they are decoded."""
        async def each() -> AsyncIterator[dict]:
            async for piece in merged([choice.pieces() for choice in self.choices]):
                yield {**self.head, "choices": [piece]}
        return each()


async def completions(service: Service, body: CompletionRequest) -> Any:
    completion = Completion(service, body)
    usage = (lambda: {**completion.head, "choices": [], "usage": completion.usage()}) if body.with_usage else None
    return await answer(completion.whole, completion.chunks, usage, body.stream)
