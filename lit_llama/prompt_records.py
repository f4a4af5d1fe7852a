"""Prompt records: what a line of a prompts file or a chat request holds, as the user's turns and a
system text, ready for lit_llama/prompts.py to encode.

    parse_prompt_record(value) -> PromptRecord(record, turns, system)
    read_prompts(path)         -> [PromptRecord, ...], a bad line named by file and line
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lit_llama.errors import BadValue, file_error


@dataclass
class PromptRecord:
    record: dict  # what the prompts file holds (a bare prompt becomes {"prompt": ...}); the reply's record extends it
    turns: list[str]  # user, assistant, ..., user
    system: Optional[str] = None


def message_turns(messages: Any) -> tuple[Optional[str], list[str]]:
    """The system text and the turns of OpenAI-style messages: [{"role", "content"}, ...]."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in messages):
        raise BadValue("'messages' must be a list of objects with a 'role' and a text 'content'")
    system = None
    if messages and messages[0].get("role") == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [m.get("role") for m in messages]
    if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        raise BadValue("messages must alternate user, assistant, ..., and end with the user's")
    return system, [m["content"] for m in messages]


def parse_prompt_record(value: Any) -> PromptRecord:
    """A prompt: "text", {"prompt": "text"}, a list of turns ["user", "assistant", ..., "user"],
    {"conversations": [...]} or {"messages": [{"role", "content"}, ...]}; "system" optional."""
    record = value
    if isinstance(value, str):
        record = {"prompt": value}
    elif isinstance(value, list):
        record = {"conversations": value}
    if not isinstance(record, dict):
        raise BadValue("expected a string, a list of turns or an object")
    system = record.get("system")
    if "prompt" in record:
        turns = [record["prompt"]]
    elif "conversations" in record:
        turns = record["conversations"]
    elif "messages" in record:
        system_message, turns = message_turns(record["messages"])
        system = system_message if system_message is not None else system
    else:
        raise BadValue("expected a 'prompt', 'conversations' or 'messages' field")
    if not isinstance(turns, list) or len(turns) % 2 != 1 or not all(isinstance(t, str) for t in turns):
        raise BadValue("expected an odd number of text turns, ending with the user's")
    if system is not None and not isinstance(system, str):
        raise BadValue("'system' must be a string")
    return PromptRecord(record, turns, system)


def read_prompts(path: Path) -> list[PromptRecord]:
    """The records of a JSONL prompts file; a bad one is an error naming its file and line."""
    records = []
    try:
        f = open(path, "rb")
    except OSError as e:  # missing, a directory, unreadable
        raise file_error(e, str(path)) from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(parse_prompt_record(json.loads(line.decode("utf-8"))))
            except ValueError as e:  # invalid UTF-8 and json.JSONDecodeError are ValueErrors too
                raise BadValue(f"{path}:{n}: {e}") from None
    return records
