"""Sentencepiece tokenizer that can carry special tokens (the end-of-turn token above all).

A special token is either appended (a new CONTROL piece at the next free id) or repurposed (an
existing piece of the base vocabulary, ordinary or a reserved control piece such as "[control_20]",
turned into a CONTROL piece at its own id and renamed to the token's name, e.g. "<|eot|>"). Either
way the saved `tokenizer.model` is a plain sentencepiece file that other tools read with the same
ids, and text never encodes to a special id: sentencepiece does not match CONTROL pieces in text, so
a literal "<|eot|>" typed by a user is ordinary characters, and text that used to encode to a
repurposed piece now encodes to other pieces, losslessly. The rename is for the other tools:
transformers matches special tokens by their text, so a repurposed "▁pizza" kept under its name
would turn every typed "pizza" into the end-of-turn id. Special ids enter a sequence only where the
formatting code (`lit_llama/prompts.py`) puts them, by id.

`special_tokens.json` next to `tokenizer.model` records each special token (content, id, mode, and
a repurposed one's original piece), the end-of-turn id, the ids that stop generation, and which base
tokenizer was extended. A tokenizer that already has them (a fine-tune's, for a second round) keeps
them: extending it again adds only new tokens.
"""

import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from lit_llama.errors import BadValue, MissingFile, file_error
from lit_llama.files import write_atomic

DEFAULT_EOT = "<|eot|>"
ROLE_TOKENS = {"system": "<|SYSTEM|>", "user": "<|USER|>", "assistant": "<|ASSISTANT|>"}  # StableLM's, opt-in
MODEL_FILE = "tokenizer.model"
SPECIAL_TOKENS_FILE = "special_tokens.json"
Piece = sentencepiece_model_pb2.ModelProto.SentencePiece


# names sentencepiece vocabularies give pieces held in reserve, free to take a role
RESERVED_NAME = re.compile(r"control|unused|reserved|extra_id|placeholder", re.IGNORECASE)


@dataclass(frozen=True)
class SpecialToken:
    content: str  # its name, in tokenizer.model too
    id: int
    mode: Literal["appended", "repurposed"]
    piece: Optional[str] = None  # a repurposed token's piece in the base vocabulary, before the rename

    def as_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Tokenizer:
    def __init__(self, model_proto: bytes, special: Optional[dict] = None) -> None:
        self.model_proto = model_proto
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.processor.vocab_size()
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()
        special = special or {}
        self.special: list[SpecialToken] = [SpecialToken(**t) for t in special.get("tokens", [])]
        self.eot_id: Optional[int] = special.get("eot_id")
        # with role tokens, the format marks each turn's role: role -> id (lit_llama/prompts.py)
        self.roles: dict[str, int] = special.get("roles", {})
        # whether the data prepared with this tokenizer had system texts (None: not recorded)
        self.system_text: Optional[bool] = special.get("system_text")
        # the tokenizer this one extends (itself when nothing was added)
        self.base_vocab_size: int = special.get("base_vocab_size", self.vocab_size)
        self.base_sha256: str = special.get("base_sha256", hashlib.sha256(model_proto).hexdigest())

    @classmethod
    def from_dir(cls, directory: Path) -> "Tokenizer":
        directory = Path(directory)
        model_path = directory / MODEL_FILE
        if not model_path.is_file():
            raise MissingFile(f"{model_path} not found: a checkpoint or data dir must hold its tokenizer.model")
        special_path = directory / SPECIAL_TOKENS_FILE
        try:
            special = json.loads(special_path.read_text()) if special_path.is_file() else None
            model_proto = model_path.read_bytes()
        except OSError as e:  # there but unreadable (permissions)
            raise file_error(e, e.filename) from None
        except ValueError as e:
            raise BadValue(f"{special_path} is damaged ({e}); copy it again with the tokenizer.model "
                           f"beside it") from None
        try:
            return cls(model_proto, special)
        except RuntimeError:  # sentencepiece could not parse it
            raise BadValue(f"{model_path} is not a sentencepiece model (damaged, or another kind of tokenizer); "
                           f"LLaMA-family models ship one, copy it again") from None

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t.content: t.id for t in self.special}

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generated turn: EOT when there is one, EOS as the fallback."""
        return [i for i in (self.eot_id, self.eos_id) if i is not None and i >= 0]

    def piece_id(self, piece: Union[str, int]) -> int:
        """The id of `piece`, given as its exact piece text (e.g. "▁zebra") or as an id. A text that is a
        piece is that piece, digits included (the piece "1"); digits that are no piece are an id."""
        if isinstance(piece, str):
            i = self.processor.piece_to_id(piece)
            if self.processor.id_to_piece(i) == piece:
                return i
            if not piece.isdecimal():
                raise BadValue(f"{piece!r} is not a piece of the tokenizer (pieces spell a leading space as '▁')")
        i = int(piece)
        if not 0 <= i < self.vocab_size:
            raise BadValue(f"id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return i

    def with_special_tokens(self, append: list[str] = (), repurpose: Optional[dict[Union[str, int], str]] = None,
                            eot: Optional[str] = None, roles: Optional[dict[str, str]] = None) -> "Tokenizer":
        """A new tokenizer with the `append` tokens added as CONTROL pieces at the next ids, and the
        pieces of `repurpose` (text or id -> the name it takes) made CONTROL pieces of that name in
        place. `eot` names the one that ends turns, `roles` (role -> name) the ones that mark each
        turn's role. Special tokens this tokenizer already has stay."""
        if eot is not None and self.eot_id is not None:
            raise ValueError(f"this tokenizer already has an end-of-turn token (id {self.eot_id})")
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.model_proto)
        special = list(self.special)
        existing = {p.piece for p in proto.pieces}
        keep_roles = {self.bos_id, self.eos_id, self.processor.unk_id(), self.processor.pad_id()}
        for piece, name in (repurpose or {}).items():
            i = self.piece_id(piece)
            entry = proto.pieces[i]
            if i in keep_roles or i in self.special_tokens.values():
                raise BadValue(f"cannot repurpose {entry.piece!r} (id {i}): the tokenizer's bos/eos/unk/pad and special "
                               "tokens keep their roles; pick a reserved control piece or a rarely used ordinary one")
            if entry.type not in (Piece.NORMAL, Piece.USER_DEFINED, Piece.UNUSED, Piece.CONTROL):
                raise BadValue(f"cannot repurpose {entry.piece!r} (id {i}): it is a {Piece.Type.Name(entry.type).lower()} "
                               "piece that byte fallback needs to encode arbitrary text; pick a rarely used ordinary piece")
            if entry.type == Piece.CONTROL and not RESERVED_NAME.search(entry.piece):
                print(f"warning: {entry.piece!r} (id {i}) is a control piece whose name suggests a role in the model's "
                      f"own chat format; repurposing it as {name!r} anyway", file=sys.stderr)
            if name != entry.piece and name in existing:
                raise BadValue(f"cannot name the repurposed piece {entry.piece!r} {name!r}: that is already a piece "
                               f"of the tokenizer; choose another name")
            existing.add(name)
            special.append(SpecialToken(name, i, "repurposed", piece=entry.piece))
            entry.piece, entry.type = name, Piece.CONTROL  # from now on text never encodes to it, in any tool
        for content in append:
            if content in existing:
                raise BadValue(f"{content!r} is already a piece of the tokenizer (id {self.processor.piece_to_id(content)}); "
                               f"repurpose it or append another text")
            existing.add(content)
            proto.pieces.add(piece=content, score=0.0, type=Piece.CONTROL)
            special.append(SpecialToken(content, len(proto.pieces) - 1, "appended"))

        eot_id = self.eot_id
        if eot is not None:
            eot_id = next((t.id for t in special if eot in (t.content, t.piece)), None)
            if eot_id is None:
                raise ValueError(f"the end-of-turn token {eot!r} is not among the special tokens {[t.content for t in special]}")
        role_ids = dict(self.roles)
        for role, name in (roles or {}).items():
            role_ids[role] = next((t.id for t in special if t.content == name), None)
            if role_ids[role] is None:
                raise ValueError(f"the {role} role token {name!r} is not among the special tokens")
        return Tokenizer(proto.SerializeToString(), {
            "base_vocab_size": self.base_vocab_size,
            "base_sha256": self.base_sha256,
            "tokens": [t.as_json() for t in special],
            "eot_id": eot_id,
            "roles": role_ids,
        })

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / MODEL_FILE, self.model_proto)
        if self.special:
            special = {
                "base_vocab_size": self.base_vocab_size,
                "base_sha256": self.base_sha256,
                "tokens": [t.as_json() for t in self.special],
                "eot_id": self.eot_id,
                "stop_ids": self.stop_ids,
                **({"roles": self.roles} if self.roles else {}),
                **({"system_text": self.system_text} if self.system_text is not None else {}),
            }
            write_atomic(directory / SPECIAL_TOKENS_FILE, json.dumps(special, indent=2, ensure_ascii=False) + "\n")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text`. Never a special id: CONTROL pieces are not matched in text."""
        ids = self.processor.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of `ids`. Special tokens are dropped, or shown by their content with skip_special=False."""
        ids = [int(i) for i in ids]
        if skip_special:
            return self.processor.decode(ids)
        names = {t.id: t.content for t in self.special}
        text, run = [], []
        for i in ids:
            if i in names:
                text += [self.processor.decode(run), names[i]]
                run = []
            else:
                run.append(i)
        return "".join(text + [self.processor.decode(run)])


def extend_tokenizer(base: Tokenizer, eot_token: Optional[str] = None, repurpose_eot: Optional[str] = None,
                     extra_special_tokens: list[str] = (), role_tokens: bool = False) -> Tokenizer:
    """The base tokenizer with an end-of-turn token: `eot_token` (default "<|eot|>") appended as a new
    id, or, with `repurpose_eot`, an existing piece given the role under that name. A base that already
    has an end-of-turn token (a fine-tune, for a second round) keeps it; asking for another one is an
    error. With `role_tokens`, <|SYSTEM|>, <|USER|> and <|ASSISTANT|> are appended to mark each turn's
    role (a base that has them keeps them). `extra_special_tokens` not yet in the tokenizer are
    appended after them."""
    roles = ROLE_TOKENS if role_tokens and not base.roles else {}
    extra = [t for t in [*roles.values(), *extra_special_tokens] if t not in base.special_tokens]
    if base.eot_id is not None:
        eot = next(t for t in base.special if t.id == base.eot_id)
        asked = repurpose_eot if repurpose_eot is not None else eot_token
        if asked is not None and asked not in (eot.content, eot.piece):
            raise BadValue(f"the checkpoint already has an end-of-turn token, {eot.content!r} (id {eot.id}): a second "
                           f"round reuses it; drop --eot_token/--repurpose_eot, or prepare for the original base checkpoint")
        return base.with_special_tokens(append=extra, roles=roles) if extra else base
    eot_token = eot_token or DEFAULT_EOT
    if repurpose_eot is not None:
        return base.with_special_tokens(append=extra, repurpose={repurpose_eot: eot_token}, eot=eot_token, roles=roles)
    return base.with_special_tokens(append=[eot_token, *extra], eot=eot_token, roles=roles)
