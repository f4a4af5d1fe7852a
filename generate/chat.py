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
from lit_llama.generate import Chat, Sampling, resolve_stop_ids, stop_reason
from lit_llama.inference import Precision, load_for_inference, peak_memory, place
from lit_llama.quantize import Quantize


def main(
    lora_path: Optional[Path] = None,
    adapter_path: Optional[Path] = None,
    checkpoint_dir: Optional[Path] = None,
    system: Optional[str] = None,
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: float = 1.0,
    seed: int = 1234,
    stop_on_eos: bool = True,
    stop_tokens: tuple[str, ...] = (),
    max_seq_length: Optional[int] = None,
    precision: Optional[Precision] = None,
    quantize: Optional[Quantize] = None,
    compile: bool = False,
) -> None:
    """Chat on the terminal: each line you type is a user turn, the reply streams back.

    Args:
        lora_path: a finetune/lora.py out dir
        adapter_path: a finetune/adapter.py out dir
        checkpoint_dir: a checkpoint dir with an end-of-turn token (full fine-tune, merged LoRA), or the
            base checkpoint of --lora_path/--adapter_path (default: the one the out dir names)
        system: a system text before the conversation (when the fine-tune was trained with one)
        max_new_tokens: most tokens of one reply
        temperature: sampling temperature; 0 picks the most likely token every step
        top_k: sample among the k most likely tokens only
        top_p: sample among the fewest most likely tokens that hold this much of the probability (1: all)
        seed: seed of the sampling
        stop_on_eos: end a reply on EOS as well as on the end-of-turn token
        stop_tokens: more tokens that end a reply: special-token text, exact piece ("▁Human") or id
            (digits that are a piece name the piece)
        max_seq_length: the context kept (default: the model's); the oldest exchanges are dropped, whole,
            when a message and its reply would not fit
        precision: 32-true, bf16-true or 16-true (default: bf16 on a GPU that computes it natively, fp16
            on an older GPU, fp32 on the CPU)
        quantize: nf4 stores the block weights in 4 bits (about a quarter of bf16's memory; needs torchao)
        compile: compile the one-token decoding step with torch.compile (the first reply waits for it)
    """
    model, tokenizer = load_for_inference(checkpoint_dir, lora_path, adapter_path)
    model = place(model, precision, quantize)
    chat = Chat(model, tokenizer, system=system, max_new_tokens=max_new_tokens, max_seq_length=max_seq_length,
                sampling=Sampling(temperature, top_k, top_p), stop_ids=resolve_stop_ids(tokenizer, stop_on_eos, stop_tokens),
                seed=seed, compile=compile)
    print("/reset starts over, /exit ends", file=sys.stderr)
    while True:
        try:
            message = input(">> ")
        except EOFError:
            break
        if message.strip() == "/exit":
            break
        if message.strip() == "/reset":
            chat.reset()
            print("(new conversation)", file=sys.stderr)
            continue
        if not message.strip():
            continue
        try:
            for text in chat.send(message):
                print(text, end="", flush=True)
        except UsageError as e:  # a message too long for the context: say so, keep chatting
            print(f"error: {e}", file=sys.stderr)
            continue
        print(flush=True)
        note = f" | dropped the oldest {chat.dropped} turns to fit the context" if chat.dropped else ""
        print(f"[{stop_reason(chat.last, tokenizer)} after {len(chat.last.tokens)} tokens, read {chat.decoder.prefilled} "
              f"new prompt tokens | {peak_memory(model.lm_head.weight.device)}{note}]", file=sys.stderr)
    chat.close()


if __name__ == "__main__":
    run(main)
