"""Prepared data: reading rows of the input formats, encoding them into a token dataset, storing it
and loading it (`batches.py` draws training's micro-batches from it).

A prepared split is one file of three flat tensors (every sample end to end, plus offsets), not a
list of per-sample dicts: it loads with mmap in constant time and stays compact for millions of rows.
"""

import json
import pickle
import sys
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Optional, TypeVar, Union

import torch
from tqdm import tqdm

from lit_llama.checkpoint import (CONFIG_FILE, MAKE_CHECKPOINT, atomic_save, check_writable, read_config, require_dir,
                                  write_json)
from lit_llama.errors import BadPath, BadValue, MissingFile, file_error
from lit_llama.prompts import (EncodedConversation, PromptStyle, Segment, alpaca_user_turn, conversation_segments,
                               encode_segments, mark_label_runs, split_special)
from lit_llama.tokenizer import Tokenizer, extend_tokenizer

IGNORE_INDEX = -100  # label of positions that are not trained (F.cross_entropy's default ignore_index)
Overlong = Literal["drop", "cut_turns"]
T = TypeVar("T")


@dataclass
class TokenDataset:
    input_ids: torch.Tensor  # (N,) int32: all samples end to end
    loss_mask: torch.Tensor  # (N,) bool: True where the id is a training target
    offsets: torch.Tensor  # (n + 1,) int64: sample i is input_ids[offsets[i]:offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[start:end], self.loss_mask[start:end]

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets.diff()

    @classmethod
    def from_samples(cls, samples: list[EncodedConversation]) -> "TokenDataset":
        lengths = torch.tensor([0] + [len(s.ids) for s in samples], dtype=torch.int64)
        return cls(
            input_ids=torch.tensor([i for s in samples for i in s.ids], dtype=torch.int32),
            loss_mask=torch.tensor([m for s in samples for m in s.loss_mask], dtype=torch.bool),
            offsets=lengths.cumsum(0),
        )

    @classmethod
    def concat(cls, parts: list["TokenDataset"]) -> "TokenDataset":
        empty = cls.from_samples([])  # keeps dtypes when `parts` is empty
        lengths = torch.cat([empty.offsets, *(p.lengths for p in parts)])
        return cls(input_ids=torch.cat([empty.input_ids, *(p.input_ids for p in parts)]),
                   loss_mask=torch.cat([empty.loss_mask, *(p.loss_mask for p in parts)]),
                   offsets=lengths.cumsum(0))

    def select(self, indices: torch.Tensor) -> "TokenDataset":
        """The samples at `indices`, in that order."""
        starts, ends = self.offsets[indices].tolist(), self.offsets[indices + 1].tolist()
        lengths = torch.tensor([0] + [e - s for s, e in zip(starts, ends)], dtype=torch.int64)
        return TokenDataset(input_ids=torch.cat([self.input_ids[:0], *(self.input_ids[s:e] for s, e in zip(starts, ends))]),
                            loss_mask=torch.cat([self.loss_mask[:0], *(self.loss_mask[s:e] for s, e in zip(starts, ends))]),
                            offsets=lengths.cumsum(0))

    def save(self, path: Path) -> None:
        """Written whole or not at all, and on the disk before its name: see lit_llama/files.py."""
        atomic_save({"input_ids": self.input_ids, "loss_mask": self.loss_mask, "offsets": self.offsets}, path)

    @classmethod
    def load(cls, path: Path) -> "TokenDataset":
        """A split a prepare script wrote; one cut short or damaged (a full disk, a copy stopped midway)
        is named in one line."""
        try:
            return cls(**torch.load(path, mmap=True, weights_only=True, map_location="cpu"))
        except OSError as e:  # there but unreadable (permissions)
            raise file_error(e, str(path)) from None
        except (RuntimeError, EOFError, pickle.UnpicklingError, TypeError):  # TypeError: not the three tensors
            raise BadValue(f"{path} is truncated or corrupted, or not a split a scripts/prepare_*.py script wrote: "
                           f"prepare the data again") from None


@dataclass
class PrepareReport:
    read: int = 0
    kept: int = 0
    cut: int = 0  # kept with trailing turns removed to fit max_seq_length
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def skip(self, where: str, reason: str) -> None:
        """Drop the row at `where` (file:line); the first row of each kind is named on stderr."""
        if reason not in self.dropped:
            print(f"{where}: skipped: {reason} (more rows like it are only counted)", file=sys.stderr)
        self.drop(reason)

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items())) or "none"
        return (f"read {self.read}, kept {self.kept} ({self.cut} cut at a turn boundary), dropped: {dropped}; "
                f"{self.tokens} tokens ({self.trained_tokens} trained), longest sample {self.longest} tokens")


# ---------------------------------------------------------------------------------------------------
# reading rows


class BadRow(Exception):
    """A row that can't become a sample; the message is the reason it is counted under."""


def json_rows(path: Path) -> Iterator[tuple[str, Union[object, BadRow]]]:
    """(where, row) for each row of a JSONL file, or of a JSON file holding one array of rows; a line
    that isn't valid UTF-8 or JSON comes as a BadRow. `where` is file:line, or file[index] in an array."""
    try:
        f = open(path, "rb")
    except OSError as e:  # there but unreadable (permissions)
        raise file_error(e, str(path)) from None
    with f:
        is_array = f.read(4096).lstrip().startswith((b"[", b"\xef\xbb\xbf["))
        f.seek(0)
        if is_array:  # one document: an error anywhere leaves nothing usable
            try:
                rows = json.loads(f.read().decode("utf-8-sig"))
            except UnicodeDecodeError as e:
                raise BadValue(f"{path}: invalid UTF-8 at byte {e.start}") from None
            except json.JSONDecodeError as e:
                raise BadValue(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
            yield from ((f"{path}[{i}]", row) for i, row in enumerate(rows))
            return
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8-sig"))  # -sig: a byte order mark at the start of the file
            except UnicodeDecodeError:
                row = BadRow("invalid UTF-8")
            except json.JSONDecodeError as e:
                row = BadRow(f"invalid JSON ({e.msg})")
            yield f"{path}:{line_no}", row


def located_rows(path: Path, report: PrepareReport, parse: Callable[[dict], T]) -> Iterator[tuple[str, T]]:
    """(file:line, `parse` of the row) for every usable row of `path`. A row that can't be used (bad
    JSON, or `parse` raises BadRow) is counted in `report.dropped` by reason, and the first of each
    kind is named by file:line."""
    for where, row in json_rows(path):
        report.read += 1
        try:
            if isinstance(row, BadRow):
                raise row
            if not isinstance(row, dict):
                raise BadRow("not a JSON object")
            sample = parse(row)
        except BadRow as e:
            report.skip(where, str(e))
            continue
        yield where, sample


def read_rows(path: Path, report: PrepareReport, parse: Callable[[dict], T]) -> Iterator[T]:
    """`parse` of every usable row of `path` (see `located_rows`)."""
    return (sample for _, sample in located_rows(path, report, parse))


def checked_turns(turns: list) -> list[str]:
    if not all(isinstance(t, str) for t in turns):
        raise BadRow("a turn that is not a string")
    if len(turns) < 2 or len(turns) % 2:
        raise BadRow("not user/assistant pairs (odd or fewer than 2 turns)")
    if not all(t.strip() for t in turns):
        raise BadRow("an empty turn")
    return turns


def lima_turns(row: dict) -> list[str]:
    """A LIMA row: {"conversations": [user, assistant, user, assistant, ...], "source": ...}."""
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise BadRow("no 'conversations' list")
    return checked_turns(turns)


def alpaca_turns(row: dict, style: PromptStyle = "plain") -> list[str]:
    """An Alpaca row {"instruction", "input" (optional), "output"} as a user and an assistant turn."""
    for key in ("instruction", "output"):
        if key not in row:
            raise BadRow(f"missing field '{key}'")
    instruction, input_text, output = row["instruction"], row.get("input") or "", row["output"]
    if not all(isinstance(v, str) for v in (instruction, input_text, output)):
        raise BadRow("a field that is not a string")
    if not instruction.strip() or not output.strip():
        raise BadRow("an empty instruction or output")
    return [alpaca_user_turn(instruction, input_text, style), output]


def message_turns(row: dict) -> tuple[Optional[str], list[str]]:
    """An OpenAI-style row {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}:
    the system text (only as the first message) and the user/assistant turns."""
    messages = row["messages"]
    if not isinstance(messages, list):
        raise BadRow("no 'messages' list")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
        raise BadRow("a message without a 'role' or 'content'")
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
        if not isinstance(system, str) or not system.strip():
            raise BadRow("a system message without text")
    roles = [m["role"] for m in messages]
    if unknown := [r for r in roles if r not in ("system", "user", "assistant")]:
        raise BadRow(f"unknown role {unknown[0]!r}")
    if "system" in roles:
        raise BadRow("a system message that is not the first message")
    turns = checked_turns([m["content"] for m in messages])
    if roles[0::2] != ["user"] * (len(roles) // 2) or roles[1::2] != ["assistant"] * (len(roles) // 2):
        raise BadRow("roles not alternating user, assistant, user, ...")
    return system, turns


def segments_layout(row: dict, names: dict[str, int], parse_special_in_text: bool = False,
                    bos_id: Optional[int] = None) -> list[Segment]:
    """A template-free row {"segments": [{"text": ..., "label": true | false}, {"special": "<|eot|>",
    "label": true}, ...]}, laid out as written after `bos_id` (when given). A "special" segment names a
    special token (a key of `names`); text becomes special ids only with `parse_special_in_text`."""
    raw = row["segments"]
    if not isinstance(raw, list) or not raw:
        raise BadRow("no 'segments' list, or an empty one")
    segments = [] if bos_id is None else [Segment(special_id=bos_id)]
    for s in raw:
        if not isinstance(s, dict) or ("text" in s) == ("special" in s):
            raise BadRow("a segment without exactly one of 'text' and 'special'")
        label = s.get("label")
        if not isinstance(label, bool):
            raise BadRow("a segment without a true/false 'label'")
        if "special" in s:
            if not isinstance(s["special"], str) or s["special"] not in names:
                raise BadRow(f"unknown special token {s['special']!r} (known: {', '.join(names)})")
            segments.append(Segment(special_id=names[s["special"]], label=label))
            continue
        if not isinstance(s["text"], str):
            raise BadRow("a segment whose 'text' is not a string")
        parts = split_special(s["text"], names) if parse_special_in_text else [s["text"]]
        segments += [Segment(special_id=p, label=label) if isinstance(p, int) else Segment(p, label=label) for p in parts]
    if not any(s.label for s in segments):
        raise BadRow("no segment with label true")
    return mark_label_runs(segments)


def read_lima_jsonl(path: Path, report: PrepareReport) -> list[list[str]]:
    """The `conversations` of every usable row of a LIMA-format JSONL file (see `read_rows`)."""
    return list(read_rows(path, report, lima_turns))


# ---------------------------------------------------------------------------------------------------
# encoding


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


def encode_conversations(conversations: list[list[str]], tokenizer: Tokenizer, max_seq_length: int, report: PrepareReport,
                         mask_inputs: bool = True, overlong: Overlong = "drop") -> list[EncodedConversation]:
    """Encode each conversation and fit it to `max_seq_length` (see `fit_samples`)."""
    layouts = [conversation_segments(tokenizer, turns, mask_inputs) for turns in conversations]
    return fit_samples(encode_segments(tokenizer, layouts), max_seq_length, report, overlong)


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


def encode_rows(layouts: Iterable[list[Segment]], tokenizer: Tokenizer, max_seq_length: int, report: PrepareReport,
                overlong: Overlong = "drop", base: Optional[Tokenizer] = None) -> tuple[TokenDataset, int]:
    """Encode and fit every layout, a chunk at a time: each chunk is one batch for sentencepiece, and
    only the flat tensors of the chunks done stay in memory. With `base`, also counts where the base
    tokenizer encodes the text to a piece that `tokenizer` repurposed (see `count_repurposed`)."""
    parts, repurposed = [], 0
    with tqdm(desc="encoding", unit=" rows", disable=None) as bar:  # shown on a terminal only
        for chunk in chunked(layouts, 4096):
            if base is not None:
                repurposed += count_repurposed([[s.text for s in layout if s.special_id is None] for layout in chunk], base, tokenizer)
            parts.append(TokenDataset.from_samples(fit_samples(encode_segments(tokenizer, chunk), max_seq_length, report, overlong)))
            bar.update(report.read - bar.n)
    return TokenDataset.concat(parts), repurposed


def prepare_data(data_path: Path, layout: Callable[[dict, Tokenizer], list[Segment]], checkpoint_dir: Path,
                 destination_path: Path, max_seq_length: Optional[int], val_split_fraction: float, seed: int,
                 overlong: Overlong, eot_token: Optional[str], repurpose_eot: Optional[str], allow_repurposed_in_data: bool,
                 extra_special_tokens: Optional[list[str]], strict: bool, settings: dict,
                 role_tokens: bool = False) -> PrepareReport:
    """What every prepare script does once it can lay out a row (`layout` raises BadRow for one it
    can't): extend the checkpoint's tokenizer with the end-of-turn token; read, encode and fit every
    row; print the summary; split into train and val; write both, the tokenizer and prepare.json
    (the settings and the summary) to `destination_path`. `settings["system_text"]`, which the layout
    may set while rows are read, says whether any row had a system text; the tokenizer records it."""
    data_path, checkpoint_dir, destination_path = Path(data_path), Path(checkpoint_dir), Path(destination_path)
    if data_path.is_dir():
        raise BadPath(f"--data_path {data_path} is a directory: give the data file itself")
    if not data_path.is_file():
        raise MissingFile(f"--data_path {data_path} not found")
    if not 0 < val_split_fraction < 1:
        raise BadValue(f"--val_split_fraction must be between 0 and 1, got {val_split_fraction}")
    require_dir(checkpoint_dir, "--checkpoint_dir", "the base checkpoint whose tokenizer gets the end-of-turn token; "
                + MAKE_CHECKPOINT)
    block_size = read_config(checkpoint_dir / CONFIG_FILE, "is this a checkpoint dir? " + MAKE_CHECKPOINT).block_size
    max_seq_length = max_seq_length or block_size
    if max_seq_length > block_size:
        raise BadValue(f"--max_seq_length {max_seq_length} exceeds the model's block_size {block_size}")
    base = Tokenizer.from_dir(checkpoint_dir)
    tokenizer = extend_tokenizer(base, eot_token, repurpose_eot, extra_special_tokens or [], role_tokens)
    repurposing = repurpose_eot is not None and base.eot_id is None  # not a second round's EOT, already there

    check_writable(destination_path, 0, "--destination_path")  # before the work, not after it

    report = PrepareReport()
    rows = read_rows(data_path, report, lambda row: layout(row, tokenizer))
    data, repurposed = encode_rows(rows, tokenizer, max_seq_length, report, overlong, base if repurposing else None)
    if repurposing:
        piece = base.processor.id_to_piece(tokenizer.eot_id)
        if repurposed and not allow_repurposed_in_data:
            raise BadValue(f"{data_path}: the repurposed piece {piece!r} occurs {repurposed} times in the data; pick a rarer "
                           f"piece, or pass --allow_repurposed_in_data true to encode those places with other pieces")
        print(f"the repurposed piece {piece!r} (id {tokenizer.eot_id}) occurs {repurposed} times in the data"
              + (" (encoded with other pieces)" if repurposed else ""))
    print(report.summary())
    if strict and report.dropped:
        raise BadValue(f"{data_path}: {sum(report.dropped.values())} rows dropped and --strict is set (reasons above)")
    if len(data) < 2:
        raise BadValue(f"{data_path}: {len(data)} usable samples; need at least 2 (one for validation)")

    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_val = min(len(data) - 1, max(1, round(len(data) * val_split_fraction)))
    destination_path.mkdir(parents=True, exist_ok=True)
    data.select(order[n_val:]).save(destination_path / "train.pt")
    data.select(order[:n_val]).save(destination_path / "val.pt")
    tokenizer.system_text = settings.get("system_text")  # known once the rows are read: the layout records it
    tokenizer.save(destination_path)
    write_json({"data_path": data_path.resolve(), "checkpoint_dir": checkpoint_dir.resolve(), **settings,
                "max_seq_length": max_seq_length, "overlong": overlong, "special_tokens": [t.as_json() for t in tokenizer.special],
                "eot_id": tokenizer.eot_id, "train": len(data) - n_val, "val": n_val, "report": asdict(report)},
               destination_path / "prepare.json")
    eot = next(t for t in tokenizer.special if t.id == tokenizer.eot_id)
    how = "the checkpoint's own, from an earlier round" if base.eot_id is not None else eot.mode
    print(f"{len(data) - n_val} train and {n_val} val samples, EOT {eot.content!r} = id {eot.id} ({how}), "
          f"written to {destination_path}")
    return report


def load_prepared(data_dir: Path, checkpoint_dir: Path) -> tuple[Tokenizer, TokenDataset, TokenDataset]:
    """The tokenizer, train and val splits written by a prepare script, after checking that the data
    was encoded with (an extension of) the checkpoint's own tokenizer."""
    data_dir = require_dir(data_dir, "--data_dir", "prepare the data first with a scripts/prepare_*.py script")
    checkpoint_dir = require_dir(checkpoint_dir, "--checkpoint_dir", "the base checkpoint the data was prepared for; "
                                 + MAKE_CHECKPOINT)
    tokenizer = Tokenizer.from_dir(data_dir)
    base = Tokenizer.from_dir(checkpoint_dir)
    if tokenizer.base_sha256 != base.base_sha256:
        raise BadValue(f"{data_dir} was prepared with another tokenizer than {checkpoint_dir}'s; "
                       f"run the prepare script again with --checkpoint_dir {checkpoint_dir}")
    splits = []
    for name in ("train", "val"):
        path = data_dir / f"{name}.pt"
        if not path.is_file():
            raise MissingFile(f"{path} not found: prepare the data first (scripts/prepare_lima.py)")
        splits.append(TokenDataset.load(path))
    return tokenizer, splits[0], splits[1]


def load_mix(mix_dir: Path, data_dir: Path, tokenizer: Tokenizer) -> TokenDataset:
    """The train split of a second prepared data dir to mix in (`--mix_dir`), which must have been
    encoded with the very tokenizer of the task data (`tokenizer`, from `data_dir`): same pieces, same
    special tokens at the same ids."""
    mix_dir = require_dir(mix_dir, "--mix_dir", "prepare it first with a scripts/prepare_*.py script")
    mixed = Tokenizer.from_dir(mix_dir)
    if (mixed.model_proto, mixed.special_tokens) != (tokenizer.model_proto, tokenizer.special_tokens):
        raise BadValue(f"--mix_dir {mix_dir} was prepared with another tokenizer than --data_dir {data_dir} "
                       f"(special tokens {mixed.special_tokens} against {tokenizer.special_tokens}): prepare it "
                       f"again with the same --checkpoint_dir and special-token flags")
    path = mix_dir / "train.pt"
    if not path.is_file():
        raise MissingFile(f"{path} not found: prepare --mix_dir again")
    return TokenDataset.load(path)
