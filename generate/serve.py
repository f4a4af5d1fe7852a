"""Serve a fine-tune over an OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions`
(plain or streamed). Concurrent requests share one continuous batch; replies end on the end-of-turn
token. Ctrl-C or SIGTERM lets the open replies finish, then exits.

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
from lit_llama.generate import Decoder, compile_step
from lit_llama.inference import Precision, load_for_inference, place
from lit_llama.quantize import Quantize
from lit_llama.prompts import system_warning


def main(
    lora_path: Optional[Path] = None,
    adapter_path: Optional[Path] = None,
    checkpoint_dir: Optional[Path] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    model_name: Optional[str] = None,
    batch_size: int = 8,
    max_seq_length: Optional[int] = None,
    precision: Optional[Precision] = None,
    quantize: Optional[Quantize] = None,
    compile: bool = False,
) -> None:
    """Serve the model until Ctrl-C or SIGTERM.

    Args:
        lora_path: a finetune/lora.py out dir
        adapter_path: a finetune/adapter.py out dir
        checkpoint_dir: a full fine-tune or merged checkpoint, or the base checkpoint of --lora_path or
            --adapter_path (default: the one the out dir was trained from)
        host: the address to listen on; 0.0.0.0 exposes the server to the network (set --api_key)
        port: the port to listen on
        api_key: when set, requests must send "Authorization: Bearer <api_key>" (OpenAI clients do,
            given api_key=...)
        model_name: the model id clients ask for (default: the name of the model's dir)
        batch_size: requests decoded side by side; more wait for a free row
        max_seq_length: positions of each row's KV cache, prompt and reply together (default: the
            model's context)
        precision: 32-true, bf16-true or 16-true (default: bf16 on a GPU that computes it natively, fp16
            on an older GPU, fp32 on the CPU)
        quantize: nf4 stores the block weights in 4 bits (about a quarter of bf16's memory; needs torchao)
        compile: compile the one-token decoding step with torch.compile (the first request waits for it)
    """
    try:
        import uvicorn

        from lit_llama.serve import Engine, create_app
    except ImportError as e:
        raise MissingPackage(f"{e.name} is missing: the server needs pip install -e '.[serve]'") from None
    if batch_size < 1:
        raise BadValue("--batch_size must be at least 1")
    model, tokenizer = load_for_inference(checkpoint_dir, lora_path, adapter_path)
    if tokenizer.eot_id is None:
        raise BadValue("the tokenizer has no end-of-turn token (a base checkpoint?): serve a fine-tune "
                       "(--lora_path, --adapter_path, or a full or merged checkpoint)")
    if warning := system_warning(tokenizer):  # said once here, not with every request that has a system message
        print(warning, file=sys.stderr)
    model = place(model, precision, quantize)
    decoder = Decoder(model, batch_size, max_seq_length, compile_step(model) if compile else None)
    name = model_name or Path(lora_path or adapter_path or checkpoint_dir).resolve().name
    app = create_app(Engine(decoder), tokenizer, name, api_key)
    cache = sum(2 * block.attn.kv_cache.k.nbytes for block in model.transformer.h)  # keys and values, every layer
    print(f"serving {name!r} at http://{host}:{port}/v1 ({batch_size} rows of {decoder.max_seq_length} positions, "
          f"a KV cache of {cache / 2**30:.2f} GiB; --max_seq_length and --batch_size size it)",
          file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info")


if __name__ == "__main__":
    run(main)
