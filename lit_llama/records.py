"""Input records: reading the JSON objects of a data file, checking each format's records, and counting
what was read, kept and dropped. A record that can't become a sample is counted, never fatal."""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar, Union

from lit_llama.errors import BadValue, file_error
from lit_llama.prompts import PromptStyle, Segment, alpaca_user_turn, mark_label_runs, split_special

T = TypeVar("T")


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
        """Drop the record at `where` (file:line); the first record of each kind is named on stderr."""
        if reason not in self.dropped:
            print(f"{where}: skipped: {reason} (more rows like it are only counted)", file=sys.stderr)
        self.drop(reason)

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items())) or "none"
        return (f"read {self.read}, kept {self.kept} ({self.cut} cut at a turn boundary), dropped: {dropped}; "
                f"{self.tokens} tokens ({self.trained_tokens} trained), longest sample {self.longest} tokens")


class BadRecord(Exception):
    """A record that can't become a sample; the message is the reason it is counted under."""


def json_records(path: Path) -> Iterator[tuple[str, Union[object, BadRecord]]]:
    """(where, record) for each record of a JSONL file, or of a JSON file holding one array of records; a
    line that isn't valid UTF-8 or JSON comes as a BadRecord. `where` is file:line, or file[index] in an array."""
    try:
        f = open(path, "rb")
    except OSError as e:  # there but unreadable (permissions)
        raise file_error(e, str(path)) from None
    with f:
        is_array = f.read(4096).lstrip().startswith((b"[", b"\xef\xbb\xbf["))
        f.seek(0)
        if is_array:  # one document: an error anywhere leaves nothing usable
            try:
                records = json.loads(f.read().decode("utf-8-sig"))
            except UnicodeDecodeError as e:
                raise BadValue(f"{path}: invalid UTF-8 at byte {e.start}") from None
            except json.JSONDecodeError as e:
                raise BadValue(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
            yield from ((f"{path}[{i}]", record) for i, record in enumerate(records))
            return
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8-sig"))  # -sig: a byte order mark at the start of the file
            except UnicodeDecodeError:
                record = BadRecord("invalid UTF-8")
            except json.JSONDecodeError as e:
                record = BadRecord(f"invalid JSON ({e.msg})")
            yield f"{path}:{line_no}", record


def located_records(path: Path, report: PrepareReport, parse: Callable[[dict], T]) -> Iterator[tuple[str, T]]:
    """(file:line, `parse` of the record) for every usable record of `path`. One that can't be used (bad
    JSON, or `parse` raises BadRecord) is counted in `report.dropped` by reason, and the first of each
    kind is named by file:line."""
    for where, record in json_records(path):
        report.read += 1
        try:
            if isinstance(record, BadRecord):
                raise record
            if not isinstance(record, dict):
                raise BadRecord("not a JSON object")
            sample = parse(record)
        except BadRecord as e:
            report.skip(where, str(e))
            continue
        yield where, sample


def read_records(path: Path, report: PrepareReport, parse: Callable[[dict], T]) -> Iterator[T]:
    """`parse` of every usable record of `path` (see `located_records`)."""
    return (sample for _, sample in located_records(path, report, parse))


def checked_turns(turns: list) -> list[str]:
    if not all(isinstance(t, str) for t in turns):
        raise BadRecord("a turn that is not a string")
    if len(turns) < 2 or len(turns) % 2:
        raise BadRecord("not user/assistant pairs (odd or fewer than 2 turns)")
    if not all(t.strip() for t in turns):
        raise BadRecord("an empty turn")
    return turns


def lima_turns(record: dict) -> list[str]:
    """A LIMA record: {"conversations": [user, assistant, user, assistant, ...], "source": ...}."""
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise BadRecord("no 'conversations' list")
    return checked_turns(turns)


def alpaca_turns(record: dict, style: PromptStyle = "plain") -> list[str]:
    """An Alpaca record {"instruction", "input" (optional), "output"} as a user and an assistant turn."""
    for key in ("instruction", "output"):
        if key not in record:
            raise BadRecord(f"missing field '{key}'")
    instruction, input_text, output = record["instruction"], record.get("input") or "", record["output"]
    if not all(isinstance(v, str) for v in (instruction, input_text, output)):
        raise BadRecord("a field that is not a string")
    if not instruction.strip() or not output.strip():
        raise BadRecord("an empty instruction or output")
    return [alpaca_user_turn(instruction, input_text, style), output]


def message_turns(record: dict) -> tuple[Optional[str], list[str]]:
    """An OpenAI-style record {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}:
    the system text (only as the first message) and the user/assistant turns."""
    messages = record["messages"]
    if not isinstance(messages, list):
        raise BadRecord("no 'messages' list")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
        raise BadRecord("a message without a 'role' or 'content'")
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
        if not isinstance(system, str) or not system.strip():
            raise BadRecord("a system message without text")
    roles = [m["role"] for m in messages]
    if unknown := [r for r in roles if r not in ("system", "user", "assistant")]:
        raise BadRecord(f"unknown role {unknown[0]!r}")
    if "system" in roles:
        raise BadRecord("a system message that is not the first message")
    turns = checked_turns([m["content"] for m in messages])
    if roles[0::2] != ["user"] * (len(roles) // 2) or roles[1::2] != ["assistant"] * (len(roles) // 2):
        raise BadRecord("roles not alternating user, assistant, user, ...")
    return system, turns


def segments_layout(record: dict, names: dict[str, int], parse_special_in_text: bool = False,
                    bos_id: Optional[int] = None) -> list[Segment]:
    """A template-free record {"segments": [{"text": ..., "label": true | false}, {"special": "<|eot|>",
    "label": true}, ...]}, laid out as written after `bos_id` (when given). A "special" segment names a
    special token (a key of `names`); text becomes special ids only with `parse_special_in_text`."""
    raw = record["segments"]
    if not isinstance(raw, list) or not raw:
        raise BadRecord("no 'segments' list, or an empty one")
    segments = [] if bos_id is None else [Segment(special_id=bos_id)]
    for s in raw:
        if not isinstance(s, dict) or ("text" in s) == ("special" in s):
            raise BadRecord("a segment without exactly one of 'text' and 'special'")
        label = s.get("label")
        if not isinstance(label, bool):
            raise BadRecord("a segment without a true/false 'label'")
        if "special" in s:
            if not isinstance(s["special"], str) or s["special"] not in names:
                raise BadRecord(f"unknown special token {s['special']!r} (known: {', '.join(names)})")
            segments.append(Segment(special_id=names[s["special"]], label=label))
            continue
        if not isinstance(s["text"], str):
            raise BadRecord("a segment whose 'text' is not a string")
        parts = split_special(s["text"], names) if parse_special_in_text else [s["text"]]
        segments += [Segment(special_id=p, label=label) if isinstance(p, int) else Segment(p, label=label) for p in parts]
    if not any(s.label for s in segments):
        raise BadRecord("no segment with label true")
    return mark_label_runs(segments)
