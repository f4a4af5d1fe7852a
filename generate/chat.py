"""Chat with a fine-tune in the training format, `<bos> user <EOT> assistant <EOT> ...`. Replies
stream as they are decoded; the KV cache is kept across turns, so a turn reads only the new message.

    python generate/chat.py --lora_path out/lora
    python generate/chat.py --checkpoint_dir out/full --temperature 0.7

Type a message and Enter. /reset starts a new conversation, /exit (or Ctrl-D) ends.
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.errors import UsageError
from lit_llama.generate import Sampling, Stopping, stop_reason
from lit_llama.inference import REPLY_SAMPLING, ModelSource, Placement, peak_memory, place
from lit_llama.streaming import Chat


def main(
    source: ModelSource = ModelSource(),
    system: Optional[str] = None,
    sampling: Sampling = REPLY_SAMPLING,
    stopping: Stopping = Stopping(),
    seed: int = 1234,
    max_seq_length: Optional[int] = None,
    placement: Placement = Placement(),
) -> None:
    """Chat on the terminal: each line you type is a user turn, the reply streams back.

    Args:
        system: a system text before the conversation (when the fine-tune was trained with one)
        seed: seed of the sampling
        max_seq_length: the context kept (default: the model's); the oldest exchanges are dropped, whole,
            when a message and its reply would not fit
    """
    model, tokenizer = source.load()
    model = place(model, placement.precision, placement.quantize)
    chat = Chat(model, tokenizer, system=system, max_new_tokens=stopping.max_new_tokens, max_seq_length=max_seq_length,
                sampling=sampling, stop_ids=stopping.stop_ids(tokenizer), seed=seed, compile=placement.compile)
    for warning in chat.warnings:
        print(warning, file=sys.stderr)
    print("/reset starts over, /exit ends", file=sys.stderr)
    while (message := read_message()) is not None:
        if message.strip() == "/reset":
            chat.reset()
            print("(new conversation)", file=sys.stderr)
        elif message.strip():
            answer(chat, message)
    chat.close()


def read_message() -> Optional[str]:
    """The next line typed; None at /exit or Ctrl-D."""
    try:
        message = input(">> ")
    except EOFError:
        return None
    return None if message.strip() == "/exit" else message


def answer(chat: Chat, message: str) -> None:
    """The reply to `message` streamed to stdout, then why it stopped and what it read on stderr."""
    try:
        for text in chat.send(message):
            print(text, end="", flush=True)
    except UsageError as e:  # a message too long for the context: say so, keep chatting
        print(f"error: {e}", file=sys.stderr)
        return
    print(flush=True)
    note = f" | dropped the oldest {chat.dropped} turns to fit the context" if chat.dropped else ""
    print(f"[{stop_reason(chat.last, chat.tokenizer)} after {len(chat.last.tokens)} tokens, read "
          f"{chat.decoder.prefilled} new prompt tokens | {peak_memory(chat.decoder.device)}{note}]", file=sys.stderr)


if __name__ == "__main__":
    run(main)
