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

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.prepare import PrepareDirs, Samples, VocabChange, prepare_data
from lit_llama.prompts import PromptStyle, conversation_segments
from lit_llama.records import alpaca_turns


def prepare(
    data_path: Path,
    dirs: PrepareDirs = PrepareDirs(destination_path=Path("data/alpaca")),
    prompt_style: PromptStyle = "plain",
    samples: Samples = Samples(val_split_fraction=0.05),
    vocab: VocabChange = VocabChange(),
) -> None:
    """Prepare Alpaca-format rows for fine-tuning, into `destination_path`.

    Args:
        data_path: a JSON file holding an array of {"instruction", "input", "output"} objects (as the
            published alpaca_data.json), or a JSONL file of them; "input" may be empty or missing
        prompt_style: plain (instruction and input as the user turn), or alpaca (the classic Alpaca
            template around them, ending in "### Response:")
    """
    prepare_data(
        data_path=data_path, dirs=dirs, samples=samples, vocab=vocab,
        layout=lambda record, tokenizer: conversation_segments(tokenizer, alpaca_turns(record, prompt_style),
                                                               samples.mask_inputs),
        settings={"format": "alpaca", "prompt_style": prompt_style})


if __name__ == "__main__":
    run(prepare)
