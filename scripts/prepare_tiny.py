"""Build the embedded default base model, so everything runs with no download and no GPU.

A small sentencepiece tokenizer (BPE with byte fallback; unk 0, bos 1, eos 2 as in LLaMA) is trained
on the plain text shipped in data/tiny/corpus.txt, and the tiny LLaMA config is pretrained on that
text for a few hundred steps, every document ending with EOS. Like a real base model it knows the
language and EOS, and has never seen an end-of-turn token.

    python scripts/prepare_tiny.py --out_dir checkpoints/tiny
"""

import io
import sys
import time
from pathlib import Path

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sentencepiece as spm
import torch
from tqdm import tqdm

from lit_llama.checkpoint import save_checkpoint_dir
from lit_llama.cli import run
from lit_llama.errors import BadValue, MissingFile, file_error
from lit_llama.files import check_writable
from lit_llama.loss import loss_sum
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.tokenizer import Tokenizer
from lit_llama.training import TrainArgs, lr_at_step, next_token_targets

REPO = Path(__file__).resolve().parents[1]


def train_tokenizer(documents: list[str], vocab_size: int) -> Tokenizer:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(documents), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        # keep text as it is (no normalisation, whitespace kept) and digits apart, as LLaMA's does
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        character_coverage=0.9995, max_sentence_length=1 << 16, num_threads=1, minloglevel=2,
    )
    return Tokenizer(model.getvalue())


def main(
    corpus: Path = REPO / "data" / "tiny" / "corpus.txt",
    out_dir: Path = Path("checkpoints/tiny"),
    vocab_size: int = 1024,
    steps: int = 300,
    batch_size: int = 8,
    seq_len: int = 256,
    learning_rate: float = 3e-3,
    seed: int = 1337,
) -> None:
    """Train the tokenizer and pretrain the tiny model on `corpus`; write a checkpoint dir.

    Args:
        corpus: plain text, one document per line
        out_dir: the checkpoint dir to write
        vocab_size: tokenizer vocabulary size
        steps: pretraining steps
        batch_size: windows per step
        seq_len: tokens per window
        learning_rate: peak AdamW learning rate (cosine decay to a tenth of it)
        seed: seed of the initialisation and the sampled windows
    """
    if not Path(corpus).is_file():
        raise MissingFile(f"--corpus {corpus} not found: give a plain text file, one document per line")
    check_writable(out_dir, 0)  # before the pretraining, not after it
    torch.manual_seed(seed)
    try:
        text = Path(corpus).read_text(encoding="utf-8")
    except OSError as e:  # there but unreadable (permissions)
        raise file_error(e, f"--corpus {corpus}") from None
    except UnicodeDecodeError as e:
        raise BadValue(f"--corpus {corpus}: invalid UTF-8 at byte {e.start}; give a plain text file") from None
    documents = [line.strip() for line in text.splitlines() if line.strip()]
    tokenizer = train_tokenizer(documents, vocab_size)
    stream = torch.tensor([i for doc in documents for i in tokenizer.encode(doc, bos=True, eos=True)])
    print(f"{len(documents)} documents, {len(stream):,} tokens, vocabulary {tokenizer.vocab_size}")

    config = LLaMAConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)
    model = LLaMA(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = TrainArgs(learning_rate=learning_rate, min_learning_rate=learning_rate / 10,
                         warmup_iters=steps // 10)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="pretraining", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(step, schedule, steps)
        offsets = torch.randint(len(stream) - seq_len, (batch_size,))
        windows = torch.stack([stream[o : o + seq_len] for o in offsets])  # (B, T)
        loss = loss_sum(model, windows, next_token_targets(windows)) / windows[:, 1:].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    print(f"pretrained {steps} steps in {time.perf_counter() - start:.0f}s, final loss {loss.item():.3f}")
    save_checkpoint_dir(model, tokenizer, out_dir)
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    run(main)
