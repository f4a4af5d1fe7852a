"""Log-probabilities from the continuous batch (`Request.logprobs`, `Request.prompt_logprobs`) against
the model's own log-softmax over the whole sequence, read in one forward pass without a KV cache."""

import torch

from lit_llama.decoder import Decoder
from lit_llama.generate import ContinuousBatch, Request, Sampling
from lit_llama.model import LLaMA, LLaMAConfig


def full_logprobs(model: LLaMA, ids: list[int]) -> torch.Tensor:
    """(T, V): position i's log-probabilities of the token after it."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


def test_prompt_and_sampled_tokens_score_as_the_models_log_softmax():
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=1024, block_size=1024)).eval()
    prompts = [[1, *torch.randint(3, 1024, (n,)).tolist()] for n in (5, 700, 30)]  # 700: more than one chunk
    requests = [Request(p, 6, Sampling(temperature=1.0 if i == 1 else 0.0), generator=torch.Generator().manual_seed(i),
                        logprobs=3, prompt_logprobs=i) for i, p in enumerate(prompts)]  # i alternatives: 0 too
    # the third prompt starts with the first: its slot may hold that prefix, and it must still read it all
    requests[2].prompt[:6] = prompts[0]
    with torch.inference_mode(), Decoder(model, batch_size=2, max_seq_length=760) as decoder:
        batch = ContinuousBatch(decoder)
        for request in requests:
            batch.submit(request)
        while batch.busy:
            batch.step()
    for i, request in enumerate(requests):
        ids = request.prompt + request.generation.tokens
        reference = full_logprobs(model, ids)  # (T, V)
        scores = request.prompt_scores + request.generation.logprobs
        assert len(scores) == len(ids) and scores[0] is None
        for position, score in enumerate(scores[1:], start=1):
            expected = reference[position - 1]
            assert score.token == ids[position]
            assert abs(score.logprob - expected[ids[position]].item()) < 1e-5
            n = i if position < len(request.prompt) else 3
            values, indices = expected.topk(n)
            assert [t for t, _ in score.top] == indices.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in score.top]), values, atol=1e-5, rtol=0)


def test_without_logprobs_nothing_is_scored():
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=1024)).eval()
    request = Request([1, 5, 9], 3)
    batch = ContinuousBatch(Decoder(model, batch_size=1, max_seq_length=16))
    batch.submit(request)
    with torch.inference_mode():
        while batch.busy:
            batch.step()
    assert request.prompt_scores == [] and request.generation.logprobs == []
