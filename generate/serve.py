"""Serve a fine-tune over an OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions` and
`POST /v1/completions` (plain or streamed, with log-probabilities), `POST /tokenize` and `/detokenize`.
Concurrent requests share one continuous batch; replies end on the end-of-turn token. Ctrl-C or
SIGTERM lets the open replies finish, then exits.

    python generate/serve.py --lora_path out/lora
    python generate/serve.py --checkpoint_dir out/full --port 8000 --api_key "$KEY"

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
from lit_llama.prompts import system_warning


def main(
    source: ModelSource = ModelSource(),
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
        host: the address to listen on; 0.0.0.0 exposes the server to the network (set --api_key)
        port: the port to listen on
        api_key: when set, requests must send "Authorization: Bearer <api_key>" (OpenAI clients do,
            given api_key=...)
        model_name: the model id clients ask for (default: the name of the model's dir)
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
    model, tokenizer = source.load()
    if tokenizer.eot_id is None:
        raise BadValue("the tokenizer has no end-of-turn token (a base checkpoint?): serve a fine-tune "
                       "(--lora_path, --adapter_path, or a full or merged checkpoint)")
    if warning := system_warning(tokenizer):  # said once here, not with every request that has a system message
        print(warning, file=sys.stderr)
    model = place(model, placement.precision, placement.quantize)
    decoder = Decoder(model, batch_size, max_seq_length, compile_step(model) if placement.compile else None)
    name = model_name or Path(source.path).resolve().name
    app = create_app(Engine(decoder), tokenizer, name, api_key)
    cache = sum(2 * block.attn.kv_cache.k.nbytes for block in model.transformer.h)  # keys and values, every layer
    print(f"serving {name!r} at http://{host}:{port}/v1 ({batch_size} rows of {decoder.max_seq_length} positions, "
          f"a KV cache of {cache / 2**30:.2f} GiB; --max_seq_length and --batch_size size it)",
          file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info")


if __name__ == "__main__":
    run(main)
