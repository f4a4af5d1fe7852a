"""What every prepare script does once it can lay out a record: extend the base tokenizer with the
end-of-turn token, encode and fit every record, split the samples into train and val, and write them
with the tokenizer and prepare.json. The flag groups the scripts share are defined here, once."""

from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Optional, TypeVar

import torch
from tqdm import tqdm

from lit_llama.checkpoint import CONFIG_FILE, MAKE_CHECKPOINT, read_config
from lit_llama.cli import FlagGroup
from lit_llama.dataset import TokenDataset
from lit_llama.errors import BadPath, BadValue, MissingFile
from lit_llama.files import check_writable, require_dir, write_json
from lit_llama.prompts import EncodedConversation, Segment, encode_segments
from lit_llama.records import PrepareReport, read_records
from lit_llama.tokenizer import Tokenizer, extend_tokenizer

Overlong = Literal["drop", "cut_turns"]
Layout = Callable[[dict, Tokenizer], list[Segment]]  # a record and the extended tokenizer -> the sample's layout
T = TypeVar("T")


@dataclass
class PrepareDirs(FlagGroup):
    """Where the tokenizer comes from and where the prepared data goes.

    Args:
        checkpoint_dir: the base checkpoint whose tokenizer gets the end-of-turn token
        destination_path: where the prepared data goes
    """

    checkpoint_dir: Path = Path("checkpoints/tiny")
    destination_path: Path = Path("data/prepared")  # each script names its own


@dataclass
class VocabChange(FlagGroup):
    """The special tokens the prepared data's tokenizer adds to the base checkpoint's.

    Args:
        eot_token: the end-of-turn token's name (default <|eot|>), appended to the vocabulary as a new id;
            a checkpoint that already has one (for a second round of fine-tuning) keeps its own
        repurpose_eot: give the end-of-turn role to an existing piece instead, by its exact text or id:
            a rare ordinary piece ("▁zebra") or a reserved control piece ("[control_20]"). It is renamed
            to the end-of-turn name, so no tool finds it in text; the vocabulary keeps its size
        allow_repurposed_in_data: prepare even when the data contains the repurposed piece (its text is
            then encoded with other pieces)
        extra_special_tokens: more special tokens to append after the end-of-turn token (e.g. for
            segments records to place)
        role_tokens: mark each turn with a role token, <|SYSTEM|>, <|USER|> or <|ASSISTANT|>, appended to the
            vocabulary (StableLM's); generation, chat and the export then format prompts with them
    """

    eot_token: Optional[str] = None
    repurpose_eot: Optional[str] = None
    allow_repurposed_in_data: bool = False
    extra_special_tokens: Optional[list[str]] = None
    role_tokens: bool = False


@dataclass
class Samples(FlagGroup):
    """How records become samples, and samples the train and val splits.

    Args:
        max_seq_length: longest sample in tokens (default: the model's block_size)
        val_split_fraction: share of the samples held out for validation
        seed: seed of the train/val split
        mask_inputs: train only on assistant turns (and their end-of-turn token), not on user turns; a
            system message is never trained, and segments follow their own labels
        overlong: what to do with a sample longer than max_seq_length: drop it, or cut_turns (keep it up
            to its last assistant turn, or labelled run of segments, that fits; a single exchange, such as
            an Alpaca record, is dropped)
        strict: fail (exit code 2) when any row is dropped, instead of only counting it
    """

    max_seq_length: Optional[int] = None
    val_split_fraction: float = 0.1
    seed: int = 42
    mask_inputs: bool = True
    overlong: Overlong = "drop"
    strict: bool = False


def fit_samples(samples: list[EncodedConversation], max_seq_length: int, report: PrepareReport,
                overlong: Overlong = "drop") -> list[EncodedConversation]:
    """The samples that fit `max_seq_length`; one longer is dropped or cut after its last reply that
    fits, never cut mid-turn (a reply's final EOT is what teaches the model to stop). Counted in `report`."""
    kept = []
    for sample in samples:
        if len(sample.ids) > max_seq_length:
            if overlong == "drop":
                report.drop("longer than max_seq_length")
                continue
            fits = [end for end in sample.reply_ends if end <= max_seq_length]
            if not fits:
                report.drop("first exchange longer than max_seq_length")
                continue
            end = fits[-1]
            sample = EncodedConversation(sample.ids[:end], sample.loss_mask[:end],
                                         [e for e in sample.turn_ends if e <= end], [e for e in sample.reply_ends if e <= end])
            report.cut += 1
        kept.append(sample)
        report.kept += 1
        report.tokens += len(sample.ids)
        report.trained_tokens += sum(sample.loss_mask)
        report.longest = max(report.longest, len(sample.ids))
    return kept


def count_repurposed(conversations: list[list[str]], base: Tokenizer, tokenizer: Tokenizer) -> int:
    """How often the base tokenizer encodes the data to a piece that `tokenizer` repurposed. Those
    places now encode to other pieces (the text is kept), but the model saw that piece there in
    pretraining, so a user should know."""
    repurposed = {t.id for t in tokenizer.special if t.mode == "repurposed"}
    if not repurposed:
        return 0
    texts = [text for turns in conversations for text in turns]
    return sum(i in repurposed for ids in base.processor.encode(texts) for i in ids)


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def encode_records(layouts: Iterable[list[Segment]], tokenizer: Tokenizer, *, max_seq_length: int, report: PrepareReport,
                   overlong: Overlong = "drop", base: Optional[Tokenizer] = None) -> tuple[TokenDataset, int]:
    """Encode and fit the layout of every record, a chunk at a time: each chunk is one batch for
    sentencepiece, and only the flat tensors of the chunks done stay in memory. With `base`, also counts
    where the base tokenizer encodes the text to a piece that `tokenizer` repurposed (see `count_repurposed`)."""
    parts, repurposed = [], 0
    with tqdm(desc="encoding", unit=" rows", disable=None) as bar:  # shown on a terminal only
        for chunk in chunked(layouts, 4096):
            if base is not None:
                repurposed += count_repurposed([[s.text for s in layout if s.special_id is None] for layout in chunk], base, tokenizer)
            parts.append(TokenDataset.from_samples(fit_samples(encode_segments(tokenizer, chunk), max_seq_length, report, overlong)))
            bar.update(report.read - bar.n)
    return TokenDataset.concat(parts), repurposed


def checked_inputs(data_path: Path, checkpoint_dir: Path, samples: Samples) -> int:
    """The longest sample allowed, after checking the flags that name the inputs: one line names the flag at fault."""
    if data_path.is_dir():
        raise BadPath(f"--data_path {data_path} is a directory: give the data file itself")
    if not data_path.is_file():
        raise MissingFile(f"--data_path {data_path} not found")
    if not 0 < samples.val_split_fraction < 1:
        raise BadValue(f"--val_split_fraction must be between 0 and 1, got {samples.val_split_fraction}")
    require_dir(checkpoint_dir, "--checkpoint_dir", "the base checkpoint whose tokenizer gets the end-of-turn token; "
                + MAKE_CHECKPOINT)
    block_size = read_config(checkpoint_dir / CONFIG_FILE, "is this a checkpoint dir? " + MAKE_CHECKPOINT).block_size
    max_seq_length = samples.max_seq_length or block_size
    if max_seq_length > block_size:
        raise BadValue(f"--max_seq_length {max_seq_length} exceeds the model's block_size {block_size}")
    return max_seq_length


def check_repurposed(data_path: Path, base: Tokenizer, tokenizer: Tokenizer, repurposed: int, allowed: bool) -> None:
    """Refuse data in which the repurposed piece occurs `repurposed` times, unless `allowed`; say how often."""
    piece = base.processor.id_to_piece(tokenizer.eot_id)
    if repurposed and not allowed:
        raise BadValue(f"{data_path}: the repurposed piece {piece!r} occurs {repurposed} times in the data; pick a rarer "
                       f"piece, or pass --allow_repurposed_in_data true to encode those places with other pieces")
    print(f"the repurposed piece {piece!r} (id {tokenizer.eot_id}) occurs {repurposed} times in the data"
          + (" (encoded with other pieces)" if repurposed else ""))


def save_splits(data: TokenDataset, destination_path: Path, samples: Samples) -> int:
    """Write a seeded random split of `data` as train.pt and val.pt; the number of val samples."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(samples.seed))
    n_val = min(len(data) - 1, max(1, round(len(data) * samples.val_split_fraction)))
    destination_path.mkdir(parents=True, exist_ok=True)
    data.select(order[n_val:]).save(destination_path / "train.pt")
    data.select(order[:n_val]).save(destination_path / "val.pt")
    return n_val


def prepare_data(*, data_path: Path, layout: Layout, dirs: PrepareDirs, vocab: VocabChange, samples: Samples,
                 settings: dict) -> PrepareReport:
    """Prepare `data_path` into `dirs.destination_path` (`layout` raises BadRecord for a record it can't
    lay out) and print the summary. prepare.json records `settings` with the rest; the layout may set
    `settings["system_text"]` while records are read, and the tokenizer records it."""
    data_path, checkpoint_dir, destination_path = Path(data_path), Path(dirs.checkpoint_dir), Path(dirs.destination_path)
    max_seq_length = checked_inputs(data_path, checkpoint_dir, samples)
    base = Tokenizer.from_dir(checkpoint_dir)
    tokenizer = extend_tokenizer(base, vocab.eot_token, vocab.repurpose_eot, vocab.extra_special_tokens or [],
                                 vocab.role_tokens)
    repurposing = vocab.repurpose_eot is not None and base.eot_id is None  # not a second round's EOT, already there

    check_writable(destination_path, 0, "--destination_path")  # before the work, not after it

    report = PrepareReport()
    layouts = read_records(data_path, report, lambda record: layout(record, tokenizer))
    data, repurposed = encode_records(layouts, tokenizer, max_seq_length=max_seq_length, report=report,
                                      overlong=samples.overlong, base=base if repurposing else None)
    if repurposing:
        check_repurposed(data_path, base, tokenizer, repurposed, vocab.allow_repurposed_in_data)
    print(report.summary())
    if samples.strict and report.dropped:
        raise BadValue(f"{data_path}: {sum(report.dropped.values())} rows dropped and --strict is set (reasons above)")
    if len(data) < 2:
        raise BadValue(f"{data_path}: {len(data)} usable samples; need at least 2 (one for validation)")

    n_val = save_splits(data, destination_path, samples)
    tokenizer.system_text = settings.get("system_text", False)  # known once the records are read
    tokenizer.save(destination_path)
    write_json({"data_path": data_path.resolve(), "checkpoint_dir": checkpoint_dir.resolve(), **settings,
                "mask_inputs": samples.mask_inputs, "system_text": tokenizer.system_text, "max_seq_length": max_seq_length,
                "overlong": samples.overlong, "special_tokens": [t.as_json() for t in tokenizer.special],
                "eot_id": tokenizer.eot_id, "train": len(data) - n_val, "val": n_val, "report": asdict(report)},
               destination_path / "prepare.json")
    eot = next(t for t in tokenizer.special if t.id == tokenizer.eot_id)
    how = "the checkpoint's own, from an earlier round" if base.eot_id is not None else eot.mode
    print(f"{len(data) - n_val} train and {n_val} val samples, EOT {eot.content!r} = id {eot.id} ({how}), "
          f"written to {destination_path}")
    return report
