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
from typing import Optional

# run from a checkout without installing the package
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from lit_llama.batches import collate
from lit_llama.checkpoint import load_model
from lit_llama.cli import run
from lit_llama.data import TokenDataset
from lit_llama.inference import load_for_inference
from lit_llama.model import LLaMA
from lit_llama.tokenizer import Tokenizer
from lit_llama.training import n_targets, next_token_targets


def script(*args: str) -> str:
    """Run one of the project's scripts as a user would; its output (a failure ends the experiment)."""
    print("$ python " + " ".join(args), flush=True)
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{args[0]} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
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
        total += model(input_ids, targets=next_token_targets(labels)).item()
        count += n_targets(labels)
    return total / count


def halting(out_dir: Path, data_dir: Path, split: str) -> tuple[int, int]:
    """(replies that ended on EOT, prompts) of evaluate_halting.py on one split of `data_dir`."""
    output = out_dir / f"halting_{data_dir.name}_{split}.json"
    script("scripts/evaluate_halting.py", "--lora_path", str(out_dir), "--data_dir", str(data_dir), "--split", split,
           "--output_file", str(output))
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
    corpus = [d.strip() for d in (ROOT / "data" / "tiny" / "corpus.txt").read_text().splitlines() if d.strip()]
    order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(0)).tolist()
    held = [corpus[i] for i in sorted(order[:held_out])]
    kept = [corpus[i] for i in sorted(order[held_out:])]
    (work_dir / "corpus.txt").write_text("\n".join(kept) + "\n")
    (work_dir / "diverse.jsonl").write_text("\n".join(messages_rows(kept)) + "\n")
    (work_dir / "held_out.jsonl").write_text("\n".join(messages_rows(held)) + "\n")

    base, lima, cache, held_prompts = (work_dir / name for name in ("base", "lima", "cache", "held_out"))
    if not (base / "lit_model.pth").is_file():
        script("scripts/prepare_tiny.py", "--corpus", str(work_dir / "corpus.txt"), "--out_dir", str(base))
    script("scripts/self_sample.py", "--checkpoint_dir", str(base), "--data_path", str(work_dir / "diverse.jsonl"),
           "--destination_path", str(work_dir / "cache.jsonl"), "--max_new_tokens", str(max_new_tokens))
    script("scripts/prepare_conversations.py", "--data_path", str(work_dir / "cache.jsonl"), "--checkpoint_dir",
           str(base), "--destination_path", str(cache), "--val_split_fraction", "0.05")
    script("scripts/prepare_lima.py", "--data_path", str(ROOT / "data" / "lima_sample.jsonl"), "--checkpoint_dir",
           str(base), "--destination_path", str(lima))
    script("scripts/prepare_conversations.py", "--data_path", str(work_dir / "held_out.jsonl"), "--checkpoint_dir",
           str(base), "--destination_path", str(held_prompts), "--val_split_fraction", "0.5")

    base_loss = text_loss(load_model(base), Tokenizer.from_dir(base), held)
    n_task, n_cache = len(TokenDataset.load(lima / "train.pt")), len(TokenDataset.load(cache / "train.pt"))
    # the mix adds round(n_task x ratio) samples to every epoch: the long control trains as many steps
    long_epochs = epochs * (n_task + round(n_task * mix_ratio)) / n_task
    arms = {"task alone": ("task", epochs, []), "task alone, as many steps": ("task-long", long_epochs, []),
            "task + mix": ("mix", epochs, ["--mix_dir", str(cache), "--mix_ratio", str(mix_ratio)])}
    results = {"base_held_out_loss": base_loss, "task_samples": n_task, "cache_samples": n_cache,
               "mix_ratio": mix_ratio, "epochs": epochs, "runs": []}
    for seed in seeds:
        for arm, (name, arm_epochs, flags) in arms.items():
            out_dir = work_dir / f"{name}-seed{seed}"
            figures = out_dir / "experiment.json"  # a finished run's figures: a rerun skips it
            if not figures.is_file():
                script("finetune/lora.py", "--data_dir", str(lima), "--checkpoint_dir", str(base), "--out_dir",
                       str(out_dir), "--train.epochs", str(arm_epochs), "--train.eval_interval", "1000000",
                       "--train.eval_iters", "0", "--train.save_interval", "0", "--train.seed", str(seed), *flags)
                figures.write_text(json.dumps({"seed": seed, "arm": arm, **measure(out_dir, lima, held_prompts, held,
                                                                                   base_loss)}) + "\n")
            results["runs"].append(json.loads(figures.read_text()))
            print(json.dumps(results["runs"][-1]), flush=True)
    (work_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\nbase model: held-out loss {base_loss:.4f}; {n_task} task samples, {n_cache} cached samples, "
          f"mix ratio {mix_ratio}, {epochs:g} task epochs, seeds {list(seeds)}\n")
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
    return results


if __name__ == "__main__":
    run(main)
