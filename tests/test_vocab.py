import re

import pytest
import torch

from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.tokenizer import extend_tokenizer
from lit_llama.vocab import add_special_tokens, attach_token_rows, grow_vocab, merge_token_rows


def make_model(vocab_size: int = 1024) -> LLaMA:
    torch.manual_seed(0)
    return LLaMA(LLaMAConfig.from_name("tiny", block_size=32, vocab_size=vocab_size, n_layer=2))


def test_grow_keeps_every_row_and_repads_to_64():
    model = make_model()
    wte, head = model.transformer.wte.weight.clone(), model.lm_head.weight.clone()
    grow_vocab(model, 1025)
    assert model.config.vocab_size == 1025 and model.config.padded_vocab_size == 1088
    assert model.transformer.wte.weight.shape == (1088, 128) and model.lm_head.weight.shape == (1088, 128)
    assert torch.equal(model.transformer.wte.weight[:1024], wte) and torch.equal(model.lm_head.weight[:1024], head)
    assert model(torch.tensor([[1, 1024]])).shape == (1, 2, 1025)


def test_grow_reuses_padding_capacity():
    model = make_model(vocab_size=1000)  # padded to 1024
    grow_vocab(model, 1001)
    assert model.config.padded_vocab_size == 1024 and model.lm_head.weight.shape == (1024, 128)


def test_append_with_mean_init_keeps_original_logits(tokenizer):
    model = make_model()
    idx = torch.randint(0, 1024, (2, 16))
    before = model(idx)
    ids = add_special_tokens(model, tokenizer)
    assert ids == [1024]
    for weight in (model.transformer.wte.weight, model.lm_head.weight):
        torch.testing.assert_close(weight[1024], weight[:1024].mean(0))  # each from its own matrix
    after = model(idx)
    assert torch.equal(after[..., :1024], before)  # the original vocabulary's logits are untouched
    # a mean head row scores EOT at the mean logit: an ordinary, not a dominant, token
    torch.testing.assert_close(after[..., 1024], before.mean(-1), atol=1e-5, rtol=1e-5)


def test_token_rows_train_alone_and_merge_back(tokenizer):
    model = make_model()
    ids = add_special_tokens(model, tokenizer)
    base_wte, base_head = model.transformer.wte.weight.clone(), model.lm_head.weight.clone()
    attach_token_rows(model, ids)
    for p in model.parameters():
        p.requires_grad = False
    model.token_rows.wte.requires_grad = model.token_rows.lm_head.requires_grad = True
    optimizer = torch.optim.SGD([model.token_rows.wte, model.token_rows.lm_head], lr=1.0)
    idx = torch.tensor([[1, 50, 1024, 60, 1024]])
    for _ in range(3):
        logits = model(idx)
        # push EOT's probability up everywhere: both rows get gradient
        loss = -torch.log_softmax(logits, -1)[..., 1024].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    expected = model(idx)
    merge_token_rows(model)
    assert model.token_rows is None
    torch.testing.assert_close(model(idx), expected)
    wte, head = model.transformer.wte.weight, model.lm_head.weight
    assert not torch.equal(wte[1024], base_wte[1024]) and not torch.equal(head[1024], base_head[1024])
    others = torch.arange(1088) != 1024
    assert torch.equal(wte[others], base_wte[others]) and torch.equal(head[others], base_head[others])


def init_rows(tokenizer, method: str, model: LLaMA = None) -> tuple[LLaMA, torch.Tensor, torch.Tensor]:
    model = model or make_model()
    wte, head = model.transformer.wte.weight.clone(), model.lm_head.weight.clone()
    add_special_tokens(model, tokenizer, method, seed=3)
    return model, wte, head


def test_init_methods(base_tokenizer):
    tokenizer = base_tokenizer.with_special_tokens(append=["<|eot|>", "<|user|>"], eot="<|eot|>")
    model, wte, head = init_rows(tokenizer, "mean_noise")
    for new, old in ((model.transformer.wte.weight, wte), (model.lm_head.weight, head)):
        spread = old.std(0)
        assert not torch.equal(new[1024], new[1025])  # two tokens start apart...
        assert ((new[1024:1026] - old.mean(0)).abs() < 0.06 * spread).all()  # ...close to the mean

    model, wte, head = init_rows(tokenizer, "normal")
    for new, old in ((model.transformer.wte.weight, wte), (model.lm_head.weight, head)):
        assert 0.5 < (new[1024:1026] - old.mean(0)).std() / old.std(0).mean() < 1.5  # the real rows' scale

    model, wte, head = init_rows(tokenizer, "copy:▁twenty")
    assert torch.equal(model.transformer.wte.weight[1024], wte[823]) and torch.equal(model.lm_head.weight[1025], head[823])

    model, wte, head = init_rows(tokenizer, "describe:end of turn")
    pieces = tokenizer.encode("end of turn")
    torch.testing.assert_close(model.transformer.wte.weight[1024], wte[pieces].mean(0))
    torch.testing.assert_close(model.lm_head.weight[1025], head[pieces].mean(0))


@pytest.mark.parametrize("method, message", [
    ("zeros", "'zeros' is not one of mean, mean_noise, normal"), ("mean:x", "'mean:x' is not one of"),
    ("copy:▁nope", "'▁nope' is not a piece"), ("copy:<|eot|>", "'copy:<|eot|>': needs pieces of the base vocabulary"),
])
def test_bad_init_methods_are_named(tokenizer, method, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        init_rows(tokenizer, method)


def test_repurposed_row_is_reinitialised_without_growing(base_tokenizer):
    tokenizer = extend_tokenizer(base_tokenizer, repurpose_eot="▁twenty")
    model, wte, head = init_rows(tokenizer, "mean")
    assert model.config.vocab_size == 1024 and model.lm_head.weight.shape == (1024, 128)
    others = torch.arange(1024) != 823
    for new, old in ((model.transformer.wte.weight, wte), (model.lm_head.weight, head)):
        torch.testing.assert_close(new[823], old[others].mean(0))  # the mean of the other rows only
        assert torch.equal(new[others], old[others])


def test_learned_special_rows_are_kept_and_only_new_tokens_initialised(base_tokenizer):
    """A second round: the model already has the EOT (trained rows); a token new in this round is
    initialised, the EOT's rows are not."""
    first = base_tokenizer.with_special_tokens(append=["<|eot|>"], eot="<|eot|>")
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=1024, n_layer=1))
    add_special_tokens(model, first)
    with torch.no_grad():
        model.lm_head.weight[1024] = 7.0  # as if trained
    second = first.with_special_tokens(append=["<|user|>"])
    assert add_special_tokens(model, second, "normal", learned=[1024]) == [1024, 1025]
    assert torch.all(model.lm_head.weight[1024] == 7.0) and model.config.vocab_size == 1026
    assert model.lm_head.weight[1025].abs().sum() > 0
    with pytest.raises(ValueError, match="extends a vocabulary of 1025 ids but the model has 1026"):
        add_special_tokens(model, second.with_special_tokens(append=["<|x|>"]), learned=[1024])
