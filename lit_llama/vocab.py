"""The model side of a vocabulary change: room for appended ids, fresh rows for special tokens, and
the small trainable "token rows" that let LoRA/adapter training learn them with the rest frozen."""

from dataclasses import replace
from typing import Collection

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.errors import BadValue
from lit_llama.loss import ScoreRows, fused_head
from lit_llama.model import LLaMA, find_multiple
from lit_llama.tokenizer import Tokenizer

TOKEN_INITS = ("mean", "mean_noise", "normal", "copy:<piece>", "describe:<text>")


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


def _row_stats(weight: torch.Tensor, n_rows: int, excluded: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 mean and per-dimension std of rows [0, n_rows) minus `excluded`, without an fp32 copy of the matrix."""
    total = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
    squares = torch.zeros_like(total)
    for chunk in weight[:n_rows].detach().split(4096):
        chunk = chunk.float()
        total += chunk.sum(0)
        squares += chunk.pow(2).sum(0)
    if excluded:
        rows = weight[excluded].detach().float()
        total -= rows.sum(0)
        squares -= rows.pow(2).sum(0)
    count = n_rows - len(excluded)
    mean = total / count
    return mean, (squares / count - mean.pow(2)).clamp(min=0).sqrt()


@torch.no_grad()
def init_special_rows(model: LLaMA, tokenizer: Tokenizer, ids: list[int], method: str = "mean", seed: int = 0) -> None:
    """Re-initialise the rows of the special tokens `ids` in `wte` and in `lm_head`, each matrix from its
    own rows, in fp32, over the real rows only (the base vocabulary without the special ids):

    - mean: the mean row. A mean head row scores the new token at the mean logit, an ordinary token,
      and since the logits are linear in the head rows, the original vocabulary's logits don't move.
    - mean_noise: the mean plus Gaussian noise of 1% of the rows' per-dimension spread, so several
      new tokens start apart.
    - normal: Gaussian with the mean and per-dimension spread of the real rows.
    - copy:<piece>: the row of an existing piece (its exact text, e.g. "▁end", or its id; a text that
      is a piece, digits included, is that piece).
    - describe:<text>: the mean of the rows of the pieces `text` encodes to, e.g. "describe:end of turn".
    """
    base = tokenizer.base_vocab_size
    # repurposed rows hold an old meaning (or a role an earlier round taught), not a real row any more
    excluded = [t.id for t in tokenizer.special if t.id < base]
    kind, _, arg = method.partition(":")
    if kind in ("copy", "describe"):
        sources = [tokenizer.piece_id(arg)] if kind == "copy" else tokenizer.encode(arg)
        if not sources or any(i in excluded or i >= base for i in sources):
            raise BadValue(f"--token_init {method!r}: needs pieces of the base vocabulary, got ids {sources}")
    elif kind not in ("mean", "mean_noise", "normal") or arg:
        raise BadValue(f"--token_init {method!r} is not one of {', '.join(TOKEN_INITS)}")
    if not ids:  # a second round with no new token
        return
    generator = torch.Generator().manual_seed(seed)
    for weight in (model.transformer.wte.weight, model.lm_head.weight):
        mean, std = _row_stats(weight, base, excluded)
        noise = torch.randn(len(ids), weight.shape[1], generator=generator).to(weight.device)
        if kind == "mean":
            rows = mean.expand(len(ids), -1)
        elif kind == "mean_noise":
            rows = mean + 0.01 * std * noise
        elif kind == "normal":
            rows = mean + std * noise
        else:
            rows = weight[sources].float().mean(0).expand(len(ids), -1)
        weight[ids] = rows.to(weight.dtype)


def add_special_tokens(model: LLaMA, tokenizer: Tokenizer, method: str = "mean", seed: int = 0,
                       learned: Collection[int] = ()) -> list[int]:
    """Fit a model to `tokenizer`'s special tokens: room for appended ids, and fresh rows for every
    special token, appended or repurposed, except the `learned` ones, whose rows an earlier round of
    fine-tuning trained (the model is then that round's checkpoint) and which are kept. Returns all
    the special ids."""
    new = [t.id for t in tokenizer.special if t.id not in learned]
    known = tokenizer.vocab_size - sum(i >= tokenizer.base_vocab_size for i in new)  # ids the model must have
    if model.config.vocab_size != known:
        raise BadValue(f"the tokenizer extends a vocabulary of {known} ids but the model has "
                       f"{model.config.vocab_size}: data and checkpoint do not belong together")
    grow_vocab(model, tokenizer.vocab_size)
    init_special_rows(model, tokenizer, new, method, seed)
    return sorted(t.id for t in tokenizer.special)


class TokenRows(nn.Module):
    """Trainable embedding and head rows for a few token ids (the special tokens), in place of theirs in
    `wte` and `lm_head`: parameters of their own, which can learn at their own rate.

    With the vocabulary frozen (LoRA, adapter), training k rows this way costs O(k * n_embd) in gradients,
    optimizer state and checkpoint size, where unfreezing `wte` and `lm_head` would cost O(vocab_size * n_embd).
    """

    def __init__(self, ids: torch.Tensor, wte_rows: torch.Tensor, head_rows: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("ids", ids)  # (k,)
        self.wte = nn.Parameter(wte_rows)  # (k, n_embd)
        self.lm_head = nn.Parameter(head_rows)  # (k, n_embd)

    def embed(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # idx: (B, T); x: (B, T, C) looked up in the frozen table
        match = idx.unsqueeze(-1) == self.ids  # (B, T, k)
        rows = match.to(x.dtype) @ self.wte.to(x.dtype)  # (B, T, C), zero where no id matched
        return torch.where(match.any(-1, keepdim=True), rows, x)

    def head(self, x: torch.Tensor, lm_head: nn.Module, vocab_size: int) -> torch.Tensor:
        # x: (..., C) -> logits (..., vocab_size), our ids scored by our rows
        if fused_head(lm_head):  # one matmul, our columns swapped in, and a backward that reads only ours
            return ScoreRows.apply(x, lm_head.weight[:vocab_size], self.lm_head, self.ids)
        logits = lm_head(x)[..., :vocab_size]  # LoRA on the head: its logits, our columns written over
        logits[..., self.ids] = F.linear(x, self.lm_head.to(x.dtype)).to(logits.dtype)
        return logits


def attach_token_rows(model: LLaMA, ids: list[int]) -> None:
    """Give the rows of `ids` their own trainable parameters (`model.token_rows`), initialised from
    the current weights, so they can learn while `wte` and `lm_head` stay frozen."""
    index = torch.tensor(ids, dtype=torch.long, device=model.lm_head.weight.device)
    model.token_rows = TokenRows(
        index,
        model.transformer.wte.weight.detach()[index].clone(),
        model.lm_head.weight.detach()[index].clone(),
    )


def fold_token_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict with its `token_rows.*` written into (copies of) `transformer.wte.weight` and
    `lm_head.weight` and dropped: the plain checkpoint of the model `merge_token_rows` would give."""
    state = dict(state)
    ids = state.pop("token_rows.ids")
    for name, rows in (("transformer.wte.weight", state.pop("token_rows.wte")),
                       ("lm_head.weight", state.pop("token_rows.lm_head"))):
        state[name] = state[name].detach().clone()
        state[name][ids] = rows.detach().to(state[name].dtype)
    return state


@torch.no_grad()
def merge_token_rows(model: LLaMA) -> None:
    """Write the trained rows back into `wte` and `lm_head` and drop `model.token_rows`."""
    rows = model.token_rows
    if rows is None:
        return
    model.transformer.wte.weight[rows.ids] = rows.wte.to(model.transformer.wte.weight.dtype)
    model.lm_head.weight[rows.ids] = rows.lm_head.to(model.lm_head.weight.dtype)
    model.token_rows = None
