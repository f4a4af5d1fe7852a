"""The conversation format, defined once for training data and for inference prompts.

    <bos> user <EOT> assistant <EOT> user <EOT> assistant <EOT> ...
    <bos> system <EOT> user <EOT> assistant <EOT> ...          (with a system text)
    <bos> <|SYSTEM|> system <EOT> <|USER|> user <EOT> <|ASSISTANT|> assistant <EOT> ...
                                                               (with role tokens, opt-in when preparing)

Each turn is encoded on its own and closed by the end-of-turn id, inserted by id (never parsed from
text). In training labels the system text, the user turns and their EOT are masked; every assistant
token and the EOT that ends it are learned, which is how the model learns to stop. An inference
prompt is the same encoding of a conversation that ends with a user turn, so the model continues with
the assistant's.

Every input format is first laid out as `Segment`s (ordinary text, or one special id placed by id;
each a training target or not) and `encode_segments` turns layouts into ids, a batch at a time. The
conversation formats, Alpaca and the template-free segments format all go through it.
"""

import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal, Optional, Union

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from lit_llama.errors import BadValue
from lit_llama.tokenizer import Tokenizer

PromptStyle = Literal["plain", "alpaca"]

# the classic Stanford Alpaca template, used as the user turn with --prompt_style alpaca
ALPACA_INTRO = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_INTRO_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                           "context. Write a response that appropriately completes the request.")


@dataclass(frozen=True)
class Segment:
    text: str = ""  # ordinary text: never encodes to a special id
    special_id: Optional[int] = None  # or one special id, placed by id (then `text` is unused)
    label: bool = False  # a training target
    ends: Optional[Literal["turn", "reply"]] = None  # closes a turn; a "reply" is one a sample may be cut after


@dataclass
class EncodedConversation:
    ids: list[int]
    loss_mask: list[bool]  # True where the id is a training target
    turn_ends: list[int]  # turn_ends[i]: index just past the EOT of turn i (where a cut keeps whole turns)
    reply_ends: list[int]  # index just past each assistant reply: the lengths a sample may be cut to


def require_eot(tokenizer: Tokenizer) -> int:
    if tokenizer.eot_id is None:
        raise BadValue("the tokenizer has no end-of-turn token: prepare the data with scripts/prepare_lima.py")
    return tokenizer.eot_id


def conversation_segments(tokenizer: Tokenizer, turns: list[str], mask_inputs: bool = True,
                          system: Optional[str] = None) -> list[Segment]:
    """The layout of alternating user/assistant `turns` (user first), after an optional system text.
    The system text is always masked: it is an instruction to follow, not text to imitate."""
    eot = require_eot(tokenizer)
    segments = [Segment(special_id=tokenizer.bos_id)]
    if system is not None:
        segments += [*role_marker(tokenizer, "system"), Segment(system), Segment(special_id=eot)]
    for i, text in enumerate(turns):
        is_assistant = i % 2 == 1
        label = is_assistant or not mask_inputs
        segments += [*role_marker(tokenizer, "assistant" if is_assistant else "user"), Segment(text, label=label),
                     Segment(special_id=eot, label=label, ends="reply" if is_assistant else "turn")]
    return segments


def role_marker(tokenizer: Tokenizer, role: str) -> list[Segment]:
    """The role token that opens a `role` turn, when the tokenizer has role tokens; never trained (the
    assistant's is part of the prompt the reply follows)."""
    return [Segment(special_id=tokenizer.roles[role])] if tokenizer.roles else []


def system_warning(tokenizer: Tokenizer) -> Optional[str]:
    """Why a system text may mislead this model, if it may: without role tokens the format has no
    role markers, so a system text it never saw in training shifts which turn it reads as its own."""
    if tokenizer.roles or tokenizer.system_text is not False:
        return None
    return ("warning: this model was fine-tuned without system texts and without role tokens: a system text "
            "shifts which turn it reads as its own (prepare data with system messages, or with --role_tokens true)")


def encode_conversation(tokenizer: Tokenizer, turns: list[str], mask_inputs: bool = True,
                        system: Optional[str] = None) -> EncodedConversation:
    """Encode alternating user/assistant `turns` (user first), after an optional system text."""
    return encode_segments(tokenizer, [conversation_segments(tokenizer, turns, mask_inputs, system)])[0]


def encode_prompt(tokenizer: Tokenizer, turns: list[str], system: Optional[str] = None) -> list[int]:
    """Ids of a conversation that ends with a user turn, ready for the assistant's reply."""
    if len(turns) % 2 != 1:
        raise ValueError(f"a prompt needs an odd number of turns ending with the user's, got {len(turns)}")
    opening = [tokenizer.roles["assistant"]] if tokenizer.roles else []  # the reply's role token
    return encode_conversation(tokenizer, turns, system=system).ids + opening


def first_exchange(tokenizer: Tokenizer, ids: list[int], loss_mask: list[bool]) -> Optional[tuple[list[int], list[int]]]:
    """A prepared sample's first reply and the prompt it follows, as `encode_prompt` lays that prompt out:
    `<bos> [system <EOT>] user <EOT> [<|ASSISTANT|>]`, whether user turns were trained or not. A
    conversation has a system text when its turns (its EOTs) are odd in number; the reply follows the
    user's EOT and, with role tokens, the assistant's role token. A sample of another layout (the
    segments format) replies with its first trained run after an untrained token. The reply ends
    before its EOT. None when nothing but the first token is untrained."""
    eots = [i for i, token in enumerate(ids) if token == tokenizer.eot_id]
    start = None
    if len(eots) >= 2:
        start = eots[len(eots) % 2] + 1
        start += ids[start : start + 1] == [tokenizer.roles.get("assistant")]
    if start is None or start >= len(ids) or not loss_mask[start]:
        start = next((i for i in range(1, len(ids)) if loss_mask[i] and not loss_mask[i - 1]), None)
    if start is None:
        return None
    end = next((i for i in range(start, len(ids)) if ids[i] == tokenizer.eot_id or not loss_mask[i]), len(ids))
    return ids[:start], ids[start:end]


def alpaca_user_turn(instruction: str, input_text: str = "", style: PromptStyle = "plain") -> str:
    """The user turn of an Alpaca row: the instruction, then the input after a blank line when there is
    one; with style "alpaca", the classic template around them (ending in "### Response:")."""
    has_input = bool(input_text.strip())
    if style == "plain":
        return f"{instruction}\n\n{input_text}" if has_input else instruction
    if style != "alpaca":
        raise BadValue(f"--prompt_style must be plain or alpaca, got {style!r}")
    if has_input:
        return (f"{ALPACA_INTRO_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n"
                f"### Input:\n{input_text}\n\n### Response:")
    return f"{ALPACA_INTRO}\n\n### Instruction:\n{instruction}\n\n### Response:"


def special_names(tokenizer: Tokenizer) -> dict[str, int]:
    """The names a segments file may place special tokens by: the tokenizer's special tokens (the
    end-of-turn token and any extra ones, by content) and its bos and eos pieces (LLaMA's "<s>", "</s>")."""
    names = {tokenizer.processor.id_to_piece(i): i for i in (tokenizer.bos_id, tokenizer.eos_id) if i >= 0}
    return names | tokenizer.special_tokens


def split_special(text: str, names: dict[str, int]) -> list[Union[str, int]]:
    """`text` cut at every special token name in it: the text between them, and each name's id."""
    if not names:
        return [text]
    pattern = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))  # longest name wins
    parts = re.split(f"({pattern})", text)
    # re.split with one group alternates text, name, text, ...; empty text between two names goes
    return [names[p] if i % 2 else p for i, p in enumerate(parts) if i % 2 or p]


def mark_label_runs(segments: list[Segment]) -> list[Segment]:
    """For a template-free layout: each run of segments with the same label is a turn, and each
    trained run a reply (a sample may be cut after it)."""
    return [replace(s, ends=("reply" if s.label else "turn")) if i + 1 == len(segments) or segments[i + 1].label != s.label else s
            for i, s in enumerate(segments)]


@lru_cache(maxsize=4)
def continuation_processor(model_proto: bytes) -> spm.SentencePieceProcessor:
    """The tokenizer without its dummy prefix: text that continues text is encoded without the leading
    space sentencepiece puts at the start of every input (and which would otherwise appear between them)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def encode_segments(tokenizer: Tokenizer, layouts: list[list[Segment]]) -> list[EncodedConversation]:
    """Encode each layout: special ids as they are, text with the tokenizer (never to a special id).
    Text after a special id or at the start is encoded as a fresh input, like every turn of a
    conversation; text right after text continues it, so adjacent text segments read as written.
    All texts of all layouts are encoded in two batch calls, which sentencepiece spreads over the cores."""
    texts: dict[bool, list[str]] = {False: [], True: []}  # continues text? -> texts
    plans = []  # per layout, per segment: a special id, or (continues, index into texts[continues])
    for segments in layouts:
        plan, after_text = [], False
        for s in segments:
            if s.special_id is None:
                plan.append((after_text, len(texts[after_text])))
                texts[after_text].append(s.text)
            else:
                plan.append(s.special_id)
            after_text = s.special_id is None
        plans.append(plan)
    encoded = {False: tokenizer.processor.encode(texts[False]),
               True: continuation_processor(tokenizer.model_proto).encode(texts[True])}

    samples = []
    for segments, plan in zip(layouts, plans):
        ids, loss_mask, turn_ends, reply_ends = [], [], [], []
        for s, step in zip(segments, plan):
            piece = [step] if isinstance(step, int) else encoded[step[0]][step[1]]
            ids += piece
            loss_mask += [s.label] * len(piece)
            if s.ends is not None:
                turn_ends.append(len(ids))
                if s.ends == "reply":
                    reply_ends.append(len(ids))
        samples.append(EncodedConversation(ids, loss_mask, turn_ends, reply_ends))
    return samples
