"""The model side of a vocabulary change: room for appended ids, fresh rows for special tokens, and
the small trainable "token rows" that let LoRA/adapter training learn them with the rest frozen."""

from dataclasses import replace

import torch
import torch.nn as nn

from lit_llama.model import LLaMA, TokenRows, find_multiple
from lit_llama.tokenizer import Tokenizer


def grow_vocab(model: LLaMA, vocab_size: int) -> None:
    """Make `wte` and `lm_head` cover `vocab_size` ids. Existing rows are kept bit for bit; new rows
    are zero until `init_special_rows` fills them. The padded size stays a multiple of 64."""
    config = model.config
    if vocab_size < config.vocab_size:
        raise ValueError(f"cannot shrink the vocabulary from {config.vocab_size} to {vocab_size}")
    padded = max(config.padded_vocab_size, find_multiple(vocab_size, 64))
    if padded > config.padded_vocab_size:
        for module in (model.transformer.wte, model.lm_head):
            old = module.weight
            new = torch.zeros(padded, old.shape[1], dtype=old.dtype, device=old.device)
            new[: old.shape[0]] = old.detach()
            module.weight = nn.Parameter(new, requires_grad=old.requires_grad)
        model.transformer.wte.num_embeddings = padded
        model.lm_head.out_features = padded
    model.config = replace(config, vocab_size=vocab_size, padded_vocab_size=padded)


@torch.no_grad()
def init_special_rows(model: LLaMA, ids: list[int], base_vocab_size: int) -> None:
    """Re-initialise the rows of `ids` in `wte` and in `lm_head`, each from its own matrix: the mean
    of the real rows (the base vocabulary, without the special ids), computed in fp32.

    A mean head row scores the new token like an average token, so it starts neither dominant nor
    unreachable, and the original vocabulary's logits do not change at all."""
    real = torch.ones(base_vocab_size, dtype=torch.bool)
    real[[i for i in ids if i < base_vocab_size]] = False
    for weight in (model.transformer.wte.weight, model.lm_head.weight):
        mean = weight[:base_vocab_size][real.to(weight.device)].float().mean(0)
        weight[ids] = mean.to(weight.dtype)


def attach_token_rows(model: LLaMA, ids: list[int]) -> None:
    """Give the rows of `ids` their own trainable parameters (`model.token_rows`), initialised from
    the current weights, so they can learn while `wte` and `lm_head` stay frozen."""
    index = torch.tensor(ids, dtype=torch.long, device=model.lm_head.weight.device)
    model.token_rows = TokenRows(
        index,
        model.transformer.wte.weight.detach()[index].clone(),
        model.lm_head.weight.detach()[index].clone(),
    )


@torch.no_grad()
def merge_token_rows(model: LLaMA) -> None:
    """Write the trained rows back into `wte` and `lm_head` and drop `model.token_rows`."""
    rows = model.token_rows
    if rows is None:
        return
    model.transformer.wte.weight[rows.ids] = rows.wte.to(model.transformer.wte.weight.dtype)
    model.lm_head.weight[rows.ids] = rows.lm_head.to(model.lm_head.weight.dtype)
    model.token_rows = None


def add_special_tokens(model: LLaMA, tokenizer: Tokenizer) -> list[int]:
    """Fit a base model to `tokenizer`'s extended vocabulary: room for the appended ids and fresh
    rows for every special token. Returns the special ids."""
    if model.config.vocab_size != tokenizer.base_vocab_size:
        raise ValueError(f"the tokenizer extends a vocabulary of {tokenizer.base_vocab_size} ids but the model has "
                         f"{model.config.vocab_size}: data and checkpoint do not belong together")
    ids = sorted(tokenizer.special_tokens.values())
    grow_vocab(model, tokenizer.vocab_size)
    init_special_rows(model, ids, tokenizer.base_vocab_size)
    return ids
