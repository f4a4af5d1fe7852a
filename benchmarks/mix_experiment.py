"""Does DELIA's self-sampled mix change what a LIMA-style LoRA fine-tune does to the tiny model?

Every step runs the project's own scripts, as a user would, in `--work_dir`:

1. The tiny base is pretrained on the shipped corpus less `--held_out` documents picked at random:
   those are the held-out pretraining text that forgetting is measured on.
2. The diverse data: each pretraining document as a query (its first sentence) and a reference reply
   (the rest). `scripts/self_sample.py` has the base model write its own reply to each query (DELIA's
   one-shot echo prompt; a base model's prompt is plain text and its reply ends at a blank line), and
   `scripts/prepare_conversations.py` prepares that cache.
3. The task: the shipped LIMA sample, prepared with `scripts/prepare_lima.py`.
4. For each seed, three LoRA fine-tunes with the same settings: the task alone; the task with
   `--mix_dir` (the cache) at `--mix_ratio`, the same passes over the task data and so more steps;
   and the task alone for as many steps as the mixed run, which tells the mix from the extra steps.
5. Measured on each fine-tune:
   - the task's validation loss (the run's last one, the whole validation split);
   - forgetting: its loss per token on the held-out documents minus the base model's;
   - the share of greedy replies that end on EOT (`scripts/evaluate_halting.py`), on the task's
     validation prompts and on the held-out documents' first sentences, prompts of neither training set.

    python benchmarks/mix_experiment.py --seeds [1,2,3]

Each finished fine-tune keeps its figures in its out dir (`experiment.json`), and a rerun skips it.
"""

import csv
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from common import ROOT, flags
from lit_llama.batches import collate
from lit_llama.checkpoint import load_model
from lit_llama.cli import run
from lit_llama.dataset import TokenDataset
from lit_llama.inference import load_for_inference
from lit_llama.loss import loss_sum
from lit_llama.model import LLaMA
from lit_llama.tokenizer import Tokenizer
from lit_llama.training import n_targets, next_token_targets


def script(path: str, args: Sequence[str]) -> str:
    """Run one of the project's scripts as a user would; its output (a failure ends the experiment)."""
    print("$ python " + " ".join([path, *args]), flush=True)
    done = subprocess.run([sys.executable, path, *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{path} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def query_and_reference(document: str) -> Optional[tuple[str, str]]:
    """A document's first sentence and the rest; None for a document of one sentence."""
    parts = re.split(r"(?<=[.!?])\s+", document, maxsplit=1)
    return (parts[0], parts[1]) if len(parts) == 2 else None


def messages_rows(documents: list[str]) -> list[str]:
    pairs = [pair for pair in map(query_and_reference, documents) if pair]
    return [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]})
            for q, r in pairs]


@torch.no_grad()
def text_loss(model: LLaMA, tokenizer: Tokenizer, documents: list[str]) -> float:
    """Mean loss per token of `documents`, each read as pretraining read it (<bos> text <eos>, cut to
    the context)."""
    model.eval()
    total = count = 0.0
    for document in documents:
        ids = torch.tensor(tokenizer.encode(document, bos=True, eos=True)[: model.config.block_size])
        input_ids, labels = collate([(ids, torch.ones_like(ids, dtype=torch.bool))])
        total += loss_sum(model, input_ids, next_token_targets(labels)).item()
        count += n_targets(labels)
    return total / count


def halting(out_dir: Path, data_dir: Path, split: str) -> tuple[int, int]:
    """(replies that ended on EOT, prompts) of evaluate_halting.py on one split of `data_dir`."""
    output = out_dir / f"halting_{data_dir.name}_{split}.json"
    script("scripts/evaluate_halting.py", flags(lora_path=out_dir, data_dir=data_dir, split=split, output_file=output))
    report = json.loads(output.read_text())
    return round(report["eot_rate"] * report["prompts"]), report["prompts"]


def measure(out_dir: Path, lima: Path, held_prompts: Path, held: list[str], base_loss: float) -> dict:
    """A finished fine-tune's figures: its last validation, forgetting, and halting on both prompt sets."""
    with open(out_dir / "metrics.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]  # the last step: its validation ran on the whole split
    model, tokenizer = load_for_inference(lora_path=out_dir)
    task = halting(out_dir, lima, "val")
    held_out = [halting(out_dir, held_prompts, split) for split in ("train", "val")]
    return {"steps": int(row["step"]), "val_loss": float(row["val_loss"]), "val_eot_loss": float(row["val_eot_loss"]),
            "forgetting": text_loss(model, tokenizer, held) - base_loss, "halt_task_val": task[0] / task[1],
            "halt_held_out": sum(eot for eot, _ in held_out) / sum(n for _, n in held_out),
            "prompts": {"task_val": task[1], "held_out": sum(n for _, n in held_out)}}


def split_corpus(work_dir: Path, held_out: int) -> list[str]:
    """Write the base's pretraining corpus less `held_out` documents picked at random, and each part's
    documents as conversations (query, reference reply); returns the held-out documents."""
    corpus = [d.strip() for d in (ROOT / "data" / "tiny" / "corpus.txt").read_text().splitlines() if d.strip()]
    order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(0)).tolist()
    held = [corpus[i] for i in sorted(order[:held_out])]
    kept = [corpus[i] for i in sorted(order[held_out:])]
    (work_dir / "corpus.txt").write_text("\n".join(kept) + "\n")
    (work_dir / "diverse.jsonl").write_text("\n".join(messages_rows(kept)) + "\n")
    (work_dir / "held_out.jsonl").write_text("\n".join(messages_rows(held)) + "\n")
    return held


def prepare(work_dir: Path, max_new_tokens: int) -> tuple[Path, Path, Path, Path]:
    """Steps 1 to 3: the base, the self-sampled cache, the task data and the held-out prompts, as dirs
    (base, lima, cache, held_prompts) in `work_dir`."""
    base, lima, cache, held_prompts = (work_dir / name for name in ("base", "lima", "cache", "held_out"))
    if not (base / "lit_model.pth").is_file():
        script("scripts/prepare_tiny.py", flags(corpus=work_dir / "corpus.txt", out_dir=base))
    script("scripts/self_sample.py", flags(checkpoint_dir=base, data_path=work_dir / "diverse.jsonl",
                                           destination_path=work_dir / "cache.jsonl", max_new_tokens=max_new_tokens))
    script("scripts/prepare_conversations.py", flags(data_path=work_dir / "cache.jsonl", checkpoint_dir=base,
                                                     destination_path=cache, val_split_fraction=0.05))
    script("scripts/prepare_lima.py", flags(data_path=ROOT / "data" / "lima_sample.jsonl", checkpoint_dir=base,
                                            destination_path=lima))
    script("scripts/prepare_conversations.py", flags(data_path=work_dir / "held_out.jsonl", checkpoint_dir=base,
                                                     destination_path=held_prompts, val_split_fraction=0.5))
    return base, lima, cache, held_prompts


def print_table(results: dict, arms: list[str], seeds: tuple[int, ...]) -> None:
    """Each arm's figures, as mean ± standard deviation over the seeds."""
    print(f"\nbase model: held-out loss {results['base_held_out_loss']:.4f}; {results['task_samples']} task samples, "
          f"{results['cache_samples']} cached samples, mix ratio {results['mix_ratio']}, {results['epochs']:g} task "
          f"epochs, seeds {list(seeds)}\n")
    print("| | steps | task val loss | val loss at EOT | forgetting (held-out loss - base) | halts on EOT, task val "
          "| halts on EOT, held-out |")
    print("|---|---|---|---|---|---|---|")
    for arm in arms:
        runs = [r for r in results["runs"] if r["arm"] == arm]

        def cell(key: str, fmt: str) -> str:
            values = [r[key] for r in runs]
            spread = f" ± {statistics.stdev(values):{fmt.lstrip('+')}}" if len(values) > 1 else ""
            return f"{statistics.mean(values):{fmt}}{spread}"

        print(f"| {arm} | {runs[0]['steps']} | {cell('val_loss', '.4f')} | {cell('val_eot_loss', '.3f')} | "
              f"{cell('forgetting', '+.4f')} | {cell('halt_task_val', '.2f')} | {cell('halt_held_out', '.2f')} |")


def main(
    work_dir: Path = Path("out/mix_experiment"),
    seeds: tuple[int, ...] = (1, 2, 3),
    held_out: int = 25,
    mix_ratio: float = 2.0,
    epochs: float = 30.0,
    max_new_tokens: int = 128,
) -> dict:
    """Fine-tune the tiny model on the LIMA sample with and without a self-sampled mix, and compare.

    Args:
        work_dir: where the base, the data, the fine-tunes and results.json go
        seeds: one set of the three fine-tunes per training seed
        held_out: pretraining documents kept out of the base's pretraining, to measure forgetting on
        mix_ratio: cached samples per task sample (--mix_ratio)
        epochs: passes over the task data, the same in both fine-tunes (the mix adds steps)
        max_new_tokens: longest self-sampled reply
    """
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    held = split_corpus(work_dir, held_out)
    base, lima, cache, held_prompts = prepare(work_dir, max_new_tokens)
    base_loss = text_loss(load_model(base), Tokenizer.from_dir(base), held)
    n_task, n_cache = len(TokenDataset.load(lima / "train.pt")), len(TokenDataset.load(cache / "train.pt"))
    # the mix adds round(n_task x ratio) samples to every epoch: the long control trains as many steps
    long_epochs = epochs * (n_task + round(n_task * mix_ratio)) / n_task
    arms = {"task alone": ("task", epochs, {}), "task alone, as many steps": ("task-long", long_epochs, {}),
            "task + mix": ("mix", epochs, {"mix_dir": cache, "mix_ratio": mix_ratio})}
    results = {"base_held_out_loss": base_loss, "task_samples": n_task, "cache_samples": n_cache,
               "mix_ratio": mix_ratio, "epochs": epochs, "runs": []}
    for seed in seeds:
        for arm, (name, arm_epochs, mix) in arms.items():
            out_dir = work_dir / f"{name}-seed{seed}"
            figures = out_dir / "experiment.json"  # a finished run's figures: a rerun skips it
            if not figures.is_file():
                train = dict(epochs=arm_epochs, eval_interval=1000000, eval_iters=0, save_interval=0, seed=seed)
                script("finetune/lora.py",
                       flags(data_dir=lima, checkpoint_dir=base, out_dir=out_dir, train=train, **mix))
                figures.write_text(json.dumps({"seed": seed, "arm": arm, **measure(out_dir, lima, held_prompts, held,
                                                                                   base_loss)}) + "\n")
            results["runs"].append(json.loads(figures.read_text()))
            print(json.dumps(results["runs"][-1]), flush=True)
    (work_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, list(arms), seeds)
    return results


if __name__ == "__main__":
    run(main)
