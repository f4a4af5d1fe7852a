"""Prepare your own conversations for fine-tuning. A JSONL file whose rows are either

- OpenAI-style messages: {"messages": [{"role": "system", "content": ...}, {"role": "user", ...},
  {"role": "assistant", ...}, ...]}, laid out as `<bos> system <EOT> user <EOT> assistant <EOT> ...`
  (the system message is optional, first only, and never trained); contents are always plain text;
- template-free segments: {"segments": [{"text": ..., "label": false}, {"special": "<|eot|>",
  "label": true}, ...]}, concatenated as written after a bos, label false masked.

    python scripts/prepare_conversations.py --data_path chats.jsonl --checkpoint_dir checkpoints/tiny \\
        --destination_path data/chats
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.data import BadRow, Overlong, message_turns, prepare_data, segments_layout
from lit_llama.prompts import Segment, conversation_segments, special_names
from lit_llama.tokenizer import Tokenizer


def prepare(
    data_path: Path,
    checkpoint_dir: Path = Path("checkpoints/tiny"),
    destination_path: Path = Path("data/conversations"),
    max_seq_length: Optional[int] = None,
    val_split_fraction: float = 0.1,
    seed: int = 42,
    mask_inputs: bool = True,
    segments_bos: bool = True,
    parse_special_in_text: bool = False,
    overlong: Overlong = "drop",
    eot_token: Optional[str] = None,
    repurpose_eot: Optional[str] = None,
    allow_repurposed_in_data: bool = False,
    extra_special_tokens: Optional[list[str]] = None,
    strict: bool = False,
    role_tokens: bool = False,
) -> None:
    """Write train.pt, val.pt, tokenizer.model, special_tokens.json and prepare.json to `destination_path`.

    Args:
        data_path: a JSONL file of {"messages": [...]} and/or {"segments": [...]} rows
        checkpoint_dir: the base checkpoint whose tokenizer gets the end-of-turn token
        destination_path: where the prepared data goes
        max_seq_length: longest sample in tokens (default: the model's block_size)
        val_split_fraction: share of rows held out for validation
        seed: seed of the train/val split
        mask_inputs: messages: train only on assistant turns (and their end-of-turn token); the system
            message is never trained. Segments follow their own labels
        segments_bos: put the bos token before each segments row (LLaMA models expect it first); false
            keeps exactly the segments as written
        parse_special_in_text: segments only: turn special token names found inside "text" (e.g.
            "<|eot|>", "</s>") into their ids. Off by default: text stays text. Messages never are parsed
        overlong: what to do with a row longer than max_seq_length: drop it, or cut_turns (keep it up to
            its last assistant turn, or labelled run of segments, that fits)
        eot_token: the end-of-turn token's name (default <|eot|>), appended to the vocabulary as a new id;
            a checkpoint that already has one (for a second round of fine-tuning) keeps its own
        repurpose_eot: give the end-of-turn role to an existing piece instead, by its exact text or id:
            a rare ordinary piece ("▁zebra") or a reserved control piece ("[control_20]"). It is renamed
            to the end-of-turn name, so no tool finds it in text; the vocabulary keeps its size
        allow_repurposed_in_data: prepare even when the data contains the repurposed piece (its text is
            then encoded with other pieces)
        extra_special_tokens: more special tokens to append after the end-of-turn token, for segments
            to place (e.g. role tokens)
        strict: fail (exit code 2) when any row is dropped, instead of only counting it
        role_tokens: mark each turn with a role token, <|SYSTEM|>, <|USER|> or <|ASSISTANT|>, appended to the
            vocabulary (StableLM\'s); generation, chat and the export then format prompts with them
    """

    settings = {"format": "conversations", "mask_inputs": mask_inputs, "segments_bos": segments_bos,
                "parse_special_in_text": parse_special_in_text, "system_text": False}

    def layout(row: dict, tokenizer: Tokenizer) -> list[Segment]:
        if "messages" in row:
            system, turns = message_turns(row)
            settings["system_text"] |= system is not None
            return conversation_segments(tokenizer, turns, mask_inputs, system)
        if "segments" in row:
            bos_id = tokenizer.bos_id if segments_bos else None
            return segments_layout(row, special_names(tokenizer), parse_special_in_text, bos_id)
        raise BadRow("neither 'messages' nor 'segments'")

    prepare_data(
        data_path, layout, checkpoint_dir=checkpoint_dir, destination_path=destination_path,
        max_seq_length=max_seq_length, val_split_fraction=val_split_fraction, seed=seed, overlong=overlong,
        eot_token=eot_token, repurpose_eot=repurpose_eot, allow_repurposed_in_data=allow_repurposed_in_data,
        extra_special_tokens=extra_special_tokens, strict=strict, role_tokens=role_tokens,
        settings=settings)


if __name__ == "__main__":
    run(prepare)
