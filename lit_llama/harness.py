"""lm-evaluation-harness on our model directly, no conversion: an lm-eval model over our decoder
(scripts/evaluate.py runs it; howto/evaluate.md).

    HarnessModel(model, tokenizer)   loglikelihood batched, rolling loglikelihood in windows of the
                                     context, generation on the continuous batch until the end-of-turn
                                     token or a stop string of the task

Texts start with BOS, as training encoded them. With lm-eval's `apply_chat_template`, a task's turns
are encoded in the training format (`lit_llama/prompts.py`): lm-eval joins a chat template's text to
what follows, so the template is a marked JSON of the turns that `tok_encode` reads back.
"""

import json
from typing import Any, Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lit_llama.errors import BadValue
from lit_llama.generate import generate_batch, resolve_stop_ids
from lit_llama.model import LLaMA
from lit_llama.prompt_records import parse_prompt_record
from lit_llama.prompts import encode_prompt
from lit_llama.tokenizer import Tokenizer

CHAT = "\x00turns:"  # starts a chat template's text; the JSON of the turns ends at the next NUL


class HarnessModel(TemplateLM):
    def __init__(self, model: LLaMA, tokenizer: Tokenizer, batch_size: int = 8, name: str = "model") -> None:
        super().__init__()
        self.model, self.tokenizer, self.batch, self.name = model.eval(), tokenizer, batch_size, name
        self.device_ = model.lm_head.weight.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id if self.tokenizer.eot_id is not None else self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # what an empty context is: the start of a text

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def chat_template(self, chat_template: Any = False) -> str:
        return "the training format (lit_llama/prompts.py)"

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return CHAT + json.dumps(chat_history) + "\x00"

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        if string.startswith(CHAT):  # a chat template's turns, then what lm-eval joined to them
            turns, rest = string[len(CHAT):].split("\x00", 1)
            record = parse_prompt_record({"messages": json.loads(turns)})
            return encode_prompt(self.tokenizer, record.turns, record.system) + self.tokenizer.encode(rest)
        return self.tokenizer.encode(string, bos=add_special_tokens is not False)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Each continuation's summed log-probability after its context, and whether it is the greedy one:
        the sequences of a batch side by side, padded on the right (causal: padding is never seen)."""
        limit = self.model.config.block_size
        sequences = [((context + continuation)[-(limit + 1):], len(continuation)) for _, context, continuation in requests]
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))  # similar lengths together
        results: list[Any] = [None] * len(sequences)
        for start in tqdm(range(0, len(order), self.batch), desc="loglikelihood", disable=disable_tqdm):
            rows = order[start : start + self.batch]
            width = max(len(sequences[i][0]) - 1 for i in rows)
            idx = torch.zeros(len(rows), width, dtype=torch.long)  # the input: each sequence but its last token
            for r, i in enumerate(rows):
                idx[r, : len(sequences[i][0]) - 1] = torch.tensor(sequences[i][0][:-1])
            hidden = self.model.hidden(idx.to(self.device_))  # (B, width, C)
            scores = []  # per row: (summed log-probability, 1.0 if greedy), read back once for the batch
            for r, i in enumerate(rows):
                ids, n = sequences[i]
                logprobs = self.model.head(hidden[r, len(ids) - 1 - n : len(ids) - 1]).float().log_softmax(-1)  # (n, V)
                target = torch.tensor(ids[-n:], device=logprobs.device)
                greedy = (logprobs.argmax(-1) == target).all().float()
                scores.append(torch.stack([logprobs.gather(-1, target.unsqueeze(-1)).sum(), greedy]))
            for i, (score, greedy) in zip(rows, torch.stack(scores).tolist()):
                results[i] = (score, greedy == 1.0)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """A whole text's log-probability, in windows of the model's context, each token scored once."""
        scores = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            ids = self.tok_encode(request.args[0], add_special_tokens=False)
            windows = map(make_disjoint_window, get_rolling_token_windows(
                ids, prefix_token=self.prefix_token_id, max_seq_len=self.model.config.block_size, context_len=1))
            scored = self._loglikelihood_tokens([(None, context, target) for context, target in windows], True)
            scores.append(sum(score for score, _ in scored))
        return scores

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """The replies, decoded side by side on the continuous batch, each until the end-of-turn token (or
        EOS), its `max_gen_toks`, or in its text the first of its `until` strings (cut off)."""
        prompts, rooms, stops = [], [], []
        for context, options in (r.args for r in requests):
            if options.get("do_sample") or options.get("temperature", 0) > 0:
                raise BadValue("generate_until: only greedy decoding is supported (temperature 0, no do_sample)")
            until = options.get("until") or []
            prompts.append(self.tok_encode(context))
            rooms.append(min(options.get("max_gen_toks", 256), self.model.config.block_size - len(prompts[-1])))
            stops.append([until] if isinstance(until, str) else until)
        generations = generate_batch(self.model, prompts, rooms, stop_ids=resolve_stop_ids(self.tokenizer),
                                     batch_size=self.batch, progress=not disable_tqdm)
        replies = []
        for generation, until in zip(generations, stops):
            text = self.tokenizer.decode(generation.tokens)
            replies.append(min((text[: text.index(s)] for s in until if s and s in text), key=len, default=text))
        return replies
