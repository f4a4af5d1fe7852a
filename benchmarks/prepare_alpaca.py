"""How long scripts/prepare_alpaca.py takes on 50,000 Alpaca-shaped rows, and how big its output is,
next to lit-llama's format (a list of per-sample dicts of int64 tensors) for the same samples.

    python benchmarks/prepare_alpaca.py                       # the tiny tokenizer of the tests
    python benchmarks/prepare_alpaca.py --checkpoint_dir checkpoints/Llama-2-7b-hf

The rows are synthetic and deterministic: words of data/tiny/corpus.txt, with lengths shaped like
Alpaca's (a short instruction, an input in 40% of rows, an output of 45 words on average).
"""

import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lit_llama.cli import run
from lit_llama.batches import collate
from lit_llama.dataset import TokenDataset
from lit_llama.model import LLaMAConfig
from lit_llama.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def synthetic_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = (REPO / "data" / "tiny" / "corpus.txt").read_text().split()

    def text(n_words: int) -> str:
        return " ".join(rng.choices(words, k=n_words)).capitalize() + "."

    # Alpaca's outputs average about 45 words, with a long tail
    return [{"instruction": text(rng.randint(4, 25)), "input": text(rng.randint(3, 40)) if rng.random() < 0.4 else "",
             "output": text(min(500, 1 + int(rng.expovariate(1 / 45))))} for _ in range(n)]


def lit_llama_style_size_and_load(data: TokenDataset, path: Path) -> tuple[int, float]:
    """Bytes and load seconds of the same samples as lit-llama stored them: one dict of tensors each."""
    samples = []
    for i in range(len(data)):
        input_ids, labels = collate([data[i]])
        samples.append({"input_ids": input_ids[0], "labels": labels[0]})
    torch.save(samples, path)
    start = time.perf_counter()
    torch.load(path)
    return path.stat().st_size, time.perf_counter() - start


def main(rows: int = 50_000, checkpoint_dir: Optional[Path] = None, seed: int = 0) -> None:
    """Prepare `rows` synthetic Alpaca rows with scripts/prepare_alpaca.py; print its time and output size.

    Args:
        rows: how many rows to generate
        checkpoint_dir: the base checkpoint whose tokenizer encodes them (default: the tests' tiny tokenizer)
        seed: seed of the synthetic rows
    """
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if checkpoint_dir is None:
            checkpoint_dir = tmp / "checkpoint"
            checkpoint_dir.mkdir()
            shutil.copy(REPO / "tests" / "fixtures" / "tokenizer.model", checkpoint_dir)
            LLaMAConfig.from_name("tiny", block_size=2048).save(checkpoint_dir / "model_config.json")
        data_path = tmp / "alpaca_data.json"
        data_path.write_text(json.dumps(synthetic_rows(rows, seed), indent=4))  # one array, as alpaca_data.json
        tokenizer = Tokenizer.from_dir(checkpoint_dir)

        # as a user runs it: interpreter start and imports included
        command = [sys.executable, str(REPO / "scripts" / "prepare_alpaca.py"), "--data_path", str(data_path),
                   "--checkpoint_dir", str(checkpoint_dir), "--destination_path", str(tmp / "out")]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        elapsed = time.perf_counter() - start

        out = tmp / "out"
        size = sum((out / f"{name}.pt").stat().st_size for name in ("train", "val"))
        start = time.perf_counter()
        train = TokenDataset.load(out / "train.pt")
        load_time = time.perf_counter() - start
        old_size, old_load_time = lit_llama_style_size_and_load(train, tmp / "lit_llama_train.pt")
        train_size = (out / "train.pt").stat().st_size

        print(f"\ntokenizer: {checkpoint_dir / 'tokenizer.model'} (vocab {tokenizer.vocab_size}); "
              f"input: {data_path.stat().st_size / 1e6:.1f} MB of JSON")
        print(f"prepared {rows} rows in {elapsed:.2f} s: {rows / elapsed:.0f} rows/s")
        print(f"output: train.pt + val.pt = {size} bytes ({size / 1e6:.1f} MB) for {int(train.offsets[-1])} train tokens")
        print(f"train.pt: {train_size / 1e6:.1f} MB, loads in {load_time * 1e3:.1f} ms (mmap); as lit-llama's list of dicts: "
              f"{old_size / 1e6:.1f} MB ({old_size / train_size:.1f}x), loads in {old_load_time * 1e3:.0f} ms")


if __name__ == "__main__":
    run(main)
