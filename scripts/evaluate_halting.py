"""Does a fine-tune end its turns? For the first user turn of every sample of a prepared split, decode
a reply and count how it stopped: on the end-of-turn token (EOT), on EOS, or not at all before its
cap; and compare the replies' length with the reference answers'. Each reply's cap follows its
reference answer (by default max(64, 2 x its tokens)), so a long reference's reply is not cut short
and counted as not halting.

    python scripts/evaluate_halting.py --lora_path out/lora --data_dir data/lima
    python scripts/evaluate_halting.py --checkpoint_dir out/full --data_dir data/lima --split train

The figures print as a table and go to `--output_file` as JSON, with one row per prompt.
"""

import math
import sys
from pathlib import Path
from statistics import mean, median
from typing import Literal, Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lit_llama.cli import run
from lit_llama.dataset import TokenDataset
from lit_llama.errors import BadValue
from lit_llama.files import require_dir, require_file, write_json
from lit_llama.generate import generate_batch, stop_reason
from lit_llama.inference import Dtype, ModelSource, place
from lit_llama.prompts import first_exchange
from lit_llama.tokenizer import Tokenizer

REASONS = (("stopped on EOT", "eot"), ("stopped on EOS", "eos"), ("hit its cap", "max_new_tokens"))


def main(
    data_dir: Path,
    *,
    source: ModelSource = ModelSource(),
    split: Literal["val", "train"] = "val",
    max_new_tokens: Optional[int] = None,
    reference_factor: float = 2.0,
    min_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 1234,
    batch_size: int = 8,
    max_samples: Optional[int] = None,
    dtype: Dtype = Dtype(),
    output_file: Optional[Path] = None,
) -> dict:
    """Measure how often the fine-tune's replies end on EOT, on the prompts of a prepared split.

    Args:
        data_dir: a prepared data dir (scripts/prepare_*.py): train.pt, val.pt and their tokenizer
        split: which split's prompts: val (held out) or train
        max_new_tokens: one cap for every reply; a reply that reaches its cap did not halt (default: each
            reply's cap follows its reference answer, as the next two flags say)
        reference_factor: a reply may be this many times as long as its reference answer ...
        min_new_tokens: ... and at least this many tokens
        temperature: sampling temperature; 0 (greedy) measures the model's most likely reply
        seed: seed of the sampling (prompt j uses seed + j)
        batch_size: replies decoded side by side (a continuous batch: a finished row takes the next prompt)
        max_samples: evaluate the first this many samples only
        output_file: where the JSON goes (default: halting_<split>.json in the model's dir)
    """
    if reference_factor <= 0 or min_new_tokens < 1 or batch_size < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise BadValue("--reference_factor must be > 0, and --min_new_tokens, --max_new_tokens and --batch_size "
                       "at least 1")
    require_dir(data_dir, "--data_dir", "give a dir that a scripts/prepare_*.py script wrote")
    data_tokenizer = Tokenizer.from_dir(data_dir)  # checked before the model loads
    model, tokenizer = source.load()
    exchanges = first_exchanges(data_dir, split, data_tokenizer, tokenizer, max_samples)
    caps = [max_new_tokens or max(min_new_tokens, math.ceil(reference_factor * len(reference))) for _, reference in exchanges]
    cap_rule = f"max_new_tokens {max_new_tokens}" if max_new_tokens else f"caps max({min_new_tokens}, {reference_factor:g} x reference)"

    model = place(model, dtype.precision)
    device = model.lm_head.weight.device
    results = generate_batch(model, [prompt for prompt, _ in exchanges], caps, temperature=temperature,
                             stop_ids=tuple(tokenizer.stop_ids), batch_size=batch_size, progress=True,
                             generators=[torch.Generator(device).manual_seed(seed + j) for j in range(len(exchanges))])
    per_prompt = [{"prompt_tokens": len(prompt), "reference_tokens": len(reference), "max_new_tokens": cap,
                   "new_tokens": len(result.tokens), "length_ratio": len(result.tokens) / max(len(reference), 1),
                   "stop_reason": stop_reason(result, tokenizer)}
                  for (prompt, reference), cap, result in zip(exchanges, caps, results)]
    report = halting_report(per_prompt, model=str(source.path), data_dir=str(data_dir), split=split,
                            prompts=len(per_prompt), caps=cap_rule, temperature=temperature)
    print_report(report)
    output_file = output_file or Path(report["model"]) / f"halting_{split}.json"
    write_json(report, output_file)
    print(f"written to {output_file}")
    return report


def first_exchanges(data_dir: Path, split: str, data_tokenizer: Tokenizer, tokenizer: Tokenizer,
                    max_samples: Optional[int]) -> list[tuple[list[int], list[int]]]:
    """(prompt, reference reply) of the first user turn of each sample of the split that has a trained reply."""
    data_vocab, model_vocab = (data_tokenizer.eot_id, data_tokenizer.vocab_size), (tokenizer.eot_id, tokenizer.vocab_size)
    if data_tokenizer.eot_id is None or data_vocab != model_vocab:
        raise BadValue(f"{data_dir} was not prepared with the model's tokenizer (end-of-turn id {data_tokenizer.eot_id} "
                       f"of {data_tokenizer.vocab_size}, the model's {tokenizer.eot_id} of {tokenizer.vocab_size})")
    data = TokenDataset.load(require_file(data_dir / f"{split}.pt", "prepare the data again"))
    exchanges = [first_exchange(tokenizer, ids.tolist(), mask.tolist())
                 for ids, mask in (data[i] for i in range(min(len(data), max_samples or len(data))))]
    exchanges = [e for e in exchanges if e is not None]
    if not exchanges:
        raise BadValue(f"{data_dir / f'{split}.pt'} has no sample with a trained reply to evaluate")
    return exchanges


def halting_report(per_prompt: list[dict], **header: object) -> dict:
    """The shares of each stop reason and the reply lengths against the references', after `header`."""
    share = {reason: sum(r["stop_reason"] == reason for r in per_prompt) / len(per_prompt) for _, reason in REASONS}
    mean_new = mean(r["new_tokens"] for r in per_prompt)
    mean_reference = mean(r["reference_tokens"] for r in per_prompt)
    return {**header, "eot_rate": share["eot"], "eos_rate": share["eos"],
            "max_new_tokens_rate": share["max_new_tokens"],
            "mean_new_tokens": mean_new, "mean_reference_tokens": mean_reference,
            "length_ratio": mean_new / max(mean_reference, 1e-9),
            "median_row_length_ratio": median(r["length_ratio"] for r in per_prompt), "rows": per_prompt}


def print_report(report: dict) -> None:
    print(f"halting on {report['split']} prompts of {report['data_dir']} ({report['prompts']} prompts, "
          f"{report['caps']}, temperature {report['temperature']})")
    for label, reason in REASONS:
        count = sum(r["stop_reason"] == reason for r in report["rows"])
        print(f"  {label:<24}{report[f'{reason}_rate']:>7.3f}  ({count})")
    print(f"  {'mean reply length':<24}{report['mean_new_tokens']:>7.1f}  tokens")
    print(f"  {'mean reference length':<24}{report['mean_reference_tokens']:>7.1f}  tokens (reply / reference "
          f"{report['length_ratio']:.2f}; median per prompt {report['median_row_length_ratio']:.2f})")


if __name__ == "__main__":
    run(main)
