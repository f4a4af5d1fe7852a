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

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.prepare import PrepareDirs, Samples, VocabChange, prepare_data
from lit_llama.prompts import Segment, conversation_segments, special_names
from lit_llama.records import BadRecord, message_turns, segments_layout
from lit_llama.tokenizer import Tokenizer


def prepare(
    data_path: Path,
    dirs: PrepareDirs = PrepareDirs(destination_path=Path("data/conversations")),
    samples: Samples = Samples(),
    segments_bos: bool = True,
    parse_special_in_text: bool = False,
    vocab: VocabChange = VocabChange(),
) -> None:
    """Prepare messages and segments rows for fine-tuning, into `destination_path`.

    Args:
        data_path: a JSONL file of {"messages": [...]} and/or {"segments": [...]} rows
        segments_bos: put the bos token before each segments row (LLaMA models expect it first); false
            keeps exactly the segments as written
        parse_special_in_text: segments only: turn special token names found inside "text" (e.g.
            "<|eot|>", "</s>") into their ids. Off by default: text stays text. Messages never are parsed
    """
    settings = {"format": "conversations", "segments_bos": segments_bos, "parse_special_in_text": parse_special_in_text,
                "system_text": False}

    def layout(record: dict, tokenizer: Tokenizer) -> list[Segment]:
        if "messages" in record:
            system, turns = message_turns(record)
            settings["system_text"] |= system is not None
            return conversation_segments(tokenizer, turns, samples.mask_inputs, system)
        if "segments" in record:
            bos_id = tokenizer.bos_id if segments_bos else None
            return segments_layout(record, special_names(tokenizer), parse_special_in_text, bos_id)
        raise BadRecord("neither 'messages' nor 'segments'")

    prepare_data(data_path=data_path, layout=layout, dirs=dirs, samples=samples, vocab=vocab, settings=settings)


if __name__ == "__main__":
    run(prepare)
