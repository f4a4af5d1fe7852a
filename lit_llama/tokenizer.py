"""Sentencepiece tokenizer that can carry special tokens (the end-of-turn token above all).

Special tokens are appended to the sentencepiece model as CONTROL pieces at the next free ids, so the
saved `tokenizer.model` is a plain sentencepiece file that other tools read with the same ids. Text
never encodes to a CONTROL piece: a literal "<|eot|>" typed by a user is ordinary characters. Special
ids enter a sequence only where the formatting code (`lit_llama/prompts.py`) puts them, by id.

`special_tokens.json` next to `tokenizer.model` records what was added and on which base tokenizer.
"""

import hashlib
import json
from pathlib import Path
from typing import Optional

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

DEFAULT_EOT = "<|eot|>"
MODEL_FILE = "tokenizer.model"
SPECIAL_TOKENS_FILE = "special_tokens.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Tokenizer:
    def __init__(self, model_proto: bytes, special: Optional[dict] = None) -> None:
        self.model_proto = model_proto
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.processor.vocab_size()
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()
        special = special or {}
        self.special_tokens: dict[str, int] = {t["content"]: t["id"] for t in special.get("tokens", [])}
        self.eot_id: Optional[int] = special.get("eot_id")
        # the tokenizer this one extends (itself when nothing was added)
        self.base_vocab_size: int = special.get("base_vocab_size", self.vocab_size)
        self.base_sha256: str = special.get("base_sha256", _sha256(model_proto))

    @classmethod
    def from_dir(cls, directory: Path) -> "Tokenizer":
        directory = Path(directory)
        model_path = directory / MODEL_FILE
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path} not found: a checkpoint or data dir must hold its tokenizer.model")
        special_path = directory / SPECIAL_TOKENS_FILE
        special = json.loads(special_path.read_text()) if special_path.is_file() else None
        return cls(model_path.read_bytes(), special)

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generated turn: EOT when there is one, EOS as the fallback."""
        return [i for i in (self.eot_id, self.eos_id) if i is not None and i >= 0]

    def with_special_tokens(self, tokens: list[str], eot: Optional[str] = None) -> "Tokenizer":
        """A new tokenizer with `tokens` appended as CONTROL pieces; `eot` (one of them) ends turns."""
        if self.special_tokens:
            raise ValueError("this tokenizer already has special tokens; extend the base tokenizer instead")
        if eot is not None and eot not in tokens:
            raise ValueError(f"eot token {eot!r} is not among the tokens to add {tokens}")
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.model_proto)
        existing = {p.piece for p in proto.pieces}
        added = []
        for content in tokens:
            if content in existing:
                raise ValueError(f"{content!r} is already a piece of the tokenizer (id {self.processor.piece_to_id(content)})")
            existing.add(content)
            piece = proto.pieces.add()
            piece.piece, piece.score, piece.type = content, 0.0, sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
            added.append({"content": content, "id": len(proto.pieces) - 1, "mode": "appended"})
        ids = {t["content"]: t["id"] for t in added}
        special = {
            "base_vocab_size": self.vocab_size,
            "base_sha256": self.base_sha256,
            "tokens": added,
            "eot_id": ids.get(eot),
            "stop_ids": [i for i in (ids.get(eot), self.eos_id) if i is not None and i >= 0],
        }
        return Tokenizer(proto.SerializeToString(), special)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MODEL_FILE).write_bytes(self.model_proto)
        if self.special_tokens:
            special = {
                "base_vocab_size": self.base_vocab_size,
                "base_sha256": self.base_sha256,
                "tokens": [{"content": c, "id": i, "mode": "appended"} for c, i in self.special_tokens.items()],
                "eot_id": self.eot_id,
                "stop_ids": self.stop_ids,
            }
            (directory / SPECIAL_TOKENS_FILE).write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text`. Never a special id: CONTROL pieces are not matched in text."""
        ids = self.processor.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of `ids`. Special tokens are dropped, or shown by their content with skip_special=False."""
        ids = [int(i) for i in ids]
        if skip_special:
            return self.processor.decode(ids)
        names = {i: c for c, i in self.special_tokens.items()}
        text, run = [], []
        for i in ids:
            if i in names:
                text += [self.processor.decode(run), names[i]]
                run = []
            else:
                run.append(i)
        return "".join(text + [self.processor.decode(run)])
