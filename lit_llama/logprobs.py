"""Log-probabilities of tokens under the model, for the API's `logprobs`: each token's own, and the
most likely alternatives at its position. They are the model's (an fp32 log-softmax of its logits),
whatever temperature or top_p the tokens were sampled with.

    prompt_logprobs(model, hidden, prompt, top)   every prompt token's, from one read of the prompt
    token_logprob(logits, token, top)             a sampled token's, from the logits it was drawn from
"""

from dataclasses import dataclass
from typing import Optional

import torch

from lit_llama.model import LLaMA

MAX_TOP = 20  # the most alternatives per position that OpenAI's API gives
CHUNK = 512  # positions whose (chunk, vocab) log-probabilities exist at a time


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely ids at this position and their log-probabilities, best first


def scored(logprobs: torch.Tensor, tokens: torch.Tensor, ids: list[int], top: int) -> list[TokenLogprob]:
    """`tokens` (N,), on the device, whose ids the host holds as `ids`, scored by the rows of `logprobs`
    (N, V), with `top` alternatives each: two reads back to the host, the values and the alternatives' ids."""
    own = logprobs.gather(-1, tokens.unsqueeze(-1))  # (N, 1)
    best = logprobs.topk(top, dim=-1)  # (N, top)
    values = torch.cat([own, best.values], dim=-1).tolist()
    alternatives = best.indices.tolist() if top else [[]] * len(ids)
    return [TokenLogprob(token, v[0], list(zip(a, v[1:]))) for token, v, a in zip(ids, values, alternatives)]


def prompt_logprobs(model: LLaMA, hidden: torch.Tensor, prompt: list[int], top: int) -> list[Optional[TokenLogprob]]:
    """Each prompt token's log-probability given the tokens before it, from the final hidden states
    (T, C) of the whole prompt, a chunk of positions at a time. The first token has none (None)."""
    targets = torch.tensor(prompt[1:], device=hidden.device)  # position i scores token i + 1
    out: list[Optional[TokenLogprob]] = [None]
    for start in range(0, len(prompt) - 1, CHUNK):
        logits = model.head(hidden[start : start + CHUNK][: len(targets) - start])  # (chunk, V)
        ids = prompt[1 + start : 1 + start + CHUNK]
        out += scored(logits.float().log_softmax(-1), targets[start : start + CHUNK], ids, top)
    return out


def token_logprob(logits: torch.Tensor, token: torch.Tensor, token_id: int, top: int) -> TokenLogprob:
    """The log-probability of `token` (1,), on the device (`token_id` on the host), under `logits` (V,),
    and the `top` most likely ids."""
    return scored(logits.float().log_softmax(-1).unsqueeze(0), token, [token_id], top)[0]
