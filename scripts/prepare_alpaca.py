"""Prepare Alpaca-format data (rows of "instruction", "input", "output") for fine-tuning: each row
becomes one user turn (the instruction, then the input after a blank line when there is one) and one
assistant turn (the output), each closed by the end-of-turn token:

    <bos> instruction\\n\\ninput <EOT> output <EOT>

`--prompt_style alpaca` puts the classic Alpaca template around the instruction and input instead
("Below is an instruction that describes a task... ### Response:"), still EOT-terminated.

    python scripts/prepare_alpaca.py --data_path alpaca_data.json --checkpoint_dir checkpoints/tiny \\
        --destination_path data/alpaca
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.data import Overlong, alpaca_turns, prepare_data
from lit_llama.prompts import PromptStyle, conversation_segments


def prepare(
    data_path: Path,
    checkpoint_dir: Path = Path("checkpoints/tiny"),
    destination_path: Path = Path("data/alpaca"),
    prompt_style: PromptStyle = "plain",
    max_seq_length: Optional[int] = None,
    val_split_fraction: float = 0.05,
    seed: int = 42,
    mask_inputs: bool = True,
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
        data_path: a JSON file holding an array of {"instruction", "input", "output"} objects (as the
            published alpaca_data.json), or a JSONL file of them; "input" may be empty or missing
        checkpoint_dir: the base checkpoint whose tokenizer gets the end-of-turn token
        destination_path: where the prepared data goes
        prompt_style: plain (instruction and input as the user turn), or alpaca (the classic Alpaca
            template around them, ending in "### Response:")
        max_seq_length: longest sample in tokens (default: the model's block_size)
        val_split_fraction: share of rows held out for validation
        seed: seed of the train/val split
        mask_inputs: train only on the output (and its end-of-turn token), not on the prompt
        overlong: what to do with a row longer than max_seq_length: drop it (cut_turns drops it too, as
            a row is a single exchange)
        eot_token: the end-of-turn token's name (default <|eot|>), appended to the vocabulary as a new id;
            a checkpoint that already has one (for a second round of fine-tuning) keeps its own
        repurpose_eot: give the end-of-turn role to an existing piece instead, by its exact text or id:
            a rare ordinary piece ("▁zebra") or a reserved control piece ("[control_20]"). It is renamed
            to the end-of-turn name, so no tool finds it in text; the vocabulary keeps its size
        allow_repurposed_in_data: prepare even when the data contains the repurposed piece (its text is
            then encoded with other pieces)
        extra_special_tokens: more special tokens to append after the end-of-turn token
        strict: fail (exit code 2) when any row is dropped, instead of only counting it
        role_tokens: mark each turn with a role token, <|SYSTEM|>, <|USER|> or <|ASSISTANT|>, appended to the
            vocabulary (StableLM\'s); generation, chat and the export then format prompts with them
    """
    prepare_data(
        data_path, lambda row, tokenizer: conversation_segments(tokenizer, alpaca_turns(row, prompt_style), mask_inputs),
        checkpoint_dir=checkpoint_dir, destination_path=destination_path, max_seq_length=max_seq_length,
        val_split_fraction=val_split_fraction, seed=seed, overlong=overlong, eot_token=eot_token,
        repurpose_eot=repurpose_eot, allow_repurposed_in_data=allow_repurposed_in_data,
        extra_special_tokens=extra_special_tokens, strict=strict, role_tokens=role_tokens,
        settings={"format": "alpaca", "prompt_style": prompt_style, "mask_inputs": mask_inputs, "system_text": False})


if __name__ == "__main__":
    run(prepare)
