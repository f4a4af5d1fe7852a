"""Serve a fine-tune over an OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions` and
`POST /v1/completions` (plain or streamed, with log-probabilities), `POST /tokenize` and `/detokenize`.
Concurrent requests share one continuous batch; replies end on the end-of-turn token. Ctrl-C or
SIGTERM lets the open replies finish, then exits. Several LoRAs of one base are served side by side,
each by its name, rows of different LoRAs in one batch.

    python generate/serve.py --lora_path out/lora
    python generate/serve.py --checkpoint_dir out/full --port 8000 --api_key "$KEY"
    python generate/serve.py --checkpoint_dir checkpoints/base --lora lima=out/lora --lora alpaca=out/alpaca

Needs the serve extra: pip install -e '.[serve]'. See howto/serve.md.
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.errors import BadValue, MissingPackage
from lit_llama.decoder import Decoder, compile_step
from lit_llama.inference import ModelSource, Placement, place
from lit_llama.model import LLaMA
from lit_llama.multi_lora import LoRABank, attach_loras, load_loras, named_dirs
from lit_llama.prompts import system_warning
from lit_llama.tokenizer import Tokenizer


def main(
    source: ModelSource = ModelSource(),
    lora: Optional[list[str]] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    model_name: Optional[str] = None,
    batch_size: int = 8,
    max_seq_length: Optional[int] = None,
    placement: Placement = Placement(),
) -> None:
    """Serve the model until Ctrl-C or SIGTERM.

    Args:
        lora: NAME=DIR serves the finetune/lora.py out dir DIR as the model NAME, beside the base
            (--checkpoint_dir, by default the one DIR names); once per LoRA. The LoRAs share the base's
            weights and one vocabulary (the same special tokens)
        host: the address to listen on; 0.0.0.0 exposes the server to the network (set --api_key)
        port: the port to listen on
        api_key: when set, requests must send "Authorization: Bearer <api_key>" (OpenAI clients do,
            given api_key=...)
        model_name: the model id clients ask for (default: the name of the model's dir); with --lora, the base's
        batch_size: requests decoded side by side; more wait for a free row
        max_seq_length: positions of each row's KV cache, prompt and reply together (default: the
            model's context)
    """
    try:
        import uvicorn

        from lit_llama.engine import Engine
        from lit_llama.serve import create_app
    except ImportError as e:
        raise MissingPackage(f"{e.name} is missing: the server needs pip install -e '.[serve]'") from None
    if batch_size < 1:
        raise BadValue("--batch_size must be at least 1")
    model, tokenizer, name, bank = load(source, lora or [], placement, model_name)
    decoder = Decoder(model, batch_size, max_seq_length, compile_step(model) if placement.compile else None, bank)
    app = create_app(Engine(decoder), tokenizer, name, api_key)
    cache = sum(2 * block.attn.kv_cache.k.nbytes for block in model.transformer.h)  # keys and values, every layer
    names = ", ".join(map(repr, bank.names if bank else [name]))
    print(f"serving {names} at http://{host}:{port}/v1 ({batch_size} rows of {decoder.max_seq_length} positions, "
          f"a KV cache of {cache / 2**30:.2f} GiB; --max_seq_length and --batch_size size it)",
          file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info")


def load(source: ModelSource, lora: list[str], placement: Placement,
         model_name: Optional[str]) -> tuple[LLaMA, Tokenizer, str, Optional[LoRABank]]:
    """The model placed where it runs, its tokenizer and name, and with --lora the bank of its LoRAs."""
    if lora and (source.lora_path or source.adapter_path):
        raise BadValue("--lora serves LoRAs beside a base: give the base as --checkpoint_dir, and a --lora_path "
                       "out dir as one more --lora NAME=DIR")
    named = named_dirs(lora)
    if named:
        model, tokenizer, loras = load_loras(list(named.values()), source.checkpoint_dir)
    else:
        model, tokenizer = source.load()
    name = model_name or Path(source.path or loras[0].hparams["checkpoint_dir"]).resolve().name
    if name in named:
        raise BadValue(f"--lora {name}: the base is served as {name!r}; name the LoRA otherwise, or the base with --model_name")
    if tokenizer.eot_id is None:
        raise BadValue("the tokenizer has no end-of-turn token (a base checkpoint?): serve a fine-tune "
                       "(--lora_path, --adapter_path, --lora, or a full or merged checkpoint)")
    if warning := system_warning(tokenizer):  # said once here, not with every request that has a system message
        print(warning, file=sys.stderr)
    model = place(model, placement.precision, placement.quantize)
    bank = attach_loras(model, [name, *named], loras, tokenizer.base_vocab_size) if named else None
    return model, tokenizer, name, bank


if __name__ == "__main__":
    run(main)
