"""Greedy decoding at batch 1 with a KV cache: ours (eager, and with compiled one-token steps) against
transformers' `generate` with its default (dynamic) cache and its static cache, and against llama.cpp
(through llama-cpp-python) when its converter is given, on the same weights, precision and prompt. No
stop ids on any side: every run decodes exactly `new_tokens` tokens.

llama.cpp reads a GGUF that its own `convert_hf_to_gguf.py` (in llama-cpp-python's sdist, under
vendor/llama.cpp/) makes of the transformers model, at f32 or bf16 like ours. The tokenizer in it is
the tiny test tokenizer padded with unused pieces to 32,000, plus the EOT: the benchmark feeds ids.

Prefill is timed as a run that decodes one token; decoding is what `new_tokens` tokens add to it:
(new_tokens - 1) / (t(new_tokens) - t(1)).

    python benchmarks/decode.py --size 30M
    python benchmarks/decode.py --size 120M --dtype bfloat16 --llama_cpp_convert .../convert_hf_to_gguf.py
    python benchmarks/decode.py --size 7B --device cuda --new_tokens 256   # on a GPU
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

from common import (BASE_VOCAB, ROOT, build_hf, build_ours, clock, default_dtype, environment, gpu_peaks, median,
                    flags, model_config, ratio, read_bandwidth, report, run_worker, setup, table, timed)
from lit_llama.cli import run
from lit_llama.decoder import Decoder, compile_step
from lit_llama.generate import Request, generate
from lit_llama.generate import decode as decode_request
from lit_llama.model import LLaMAConfig
from lit_llama.tokenizer import DEFAULT_EOT, Tokenizer

Impl = Literal["ours", "ours-compiled", "hf", "hf-static", "llama.cpp"]
IMPLS = {"ours": "ours, eager", "ours-compiled": "ours, compiled steps", "hf": "transformers generate, default cache",
         "hf-static": "transformers generate, static cache", "llama.cpp": "llama.cpp (llama-cpp-python)"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def padded_tokenizer(vocab_size: int) -> Tokenizer:
    """The tiny test tokenizer with unused pieces appended up to LLaMA's 32,000, then the EOT."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((ROOT / "tests" / "fixtures" / "tokenizer.model").read_bytes())
    for i in range(len(proto.pieces), vocab_size - 1):
        proto.pieces.add(piece=f"<unused{i}>", score=-1e4, type=proto.SentencePiece.USER_DEFINED)
    return Tokenizer(proto.SerializeToString()).with_special_tokens([DEFAULT_EOT], eot=DEFAULT_EOT)


def llama_cpp_decoder(config: LLaMAConfig, dtype: torch.dtype, threads: int,
                      converter: Path) -> Callable[[list[int], int], None]:
    """llama.cpp on a GGUF its converter made of the transformers model with our weights."""
    import llama_cpp
    import numpy as np

    directory = Path(tempfile.mkdtemp())
    build_hf(config, torch.device("cpu"), dtype).save_pretrained(directory)
    (directory / "tokenizer.model").write_bytes(padded_tokenizer(config.vocab_size).model_proto)
    gguf = directory / "model.gguf"
    outtype = {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]
    subprocess.run([sys.executable, str(converter), str(directory), "--outfile", str(gguf), "--outtype", outtype],
                   check=True, capture_output=True)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=config.block_size, n_batch=config.block_size, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    vocab = llm.n_vocab()

    def next_id() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    def decode(prompt: list[int], n: int) -> None:
        llm.reset()
        llm.eval(prompt)
        for _ in range(n - 1):
            llm.eval([next_id()])
        next_id()

    return decode


def decoder(impl: str, size: str, device: torch.device, dtype: torch.dtype, threads: int,
            converter: Optional[Path]) -> tuple[Callable[[list[int], int], None], int]:
    """A function decoding n tokens after a prompt, and the bytes of weights one step reads."""
    config = model_config(size)
    embedding = config.padded_vocab_size * config.n_embd  # a lookup: one row is read
    if impl == "llama.cpp":
        weights = sum(p.numel() for p in build_ours(config, torch.device("meta"), dtype).parameters()) - embedding
        return llama_cpp_decoder(config, dtype, threads, converter), weights * dtype.itemsize
    if impl.startswith("ours"):
        model = build_ours(config, device, dtype).eval()
        if impl == "ours":
            def decode(prompt: list[int], n: int) -> None:
                assert len(generate(model, prompt, n).tokens) == n
        else:
            # compiled once, for one cache of block_size positions: every run reads its prompt afresh into it
            decoder = Decoder(model, 1, config.block_size, compile_step(model))

            @torch.inference_mode()
            def decode(prompt: list[int], n: int) -> None:
                decoder.reset()
                assert len(list(decode_request(decoder, Request(prompt, n)))) == n
    else:
        model = build_hf(config, device, dtype).eval()
        model.generation_config.eos_token_id = None  # decode every token asked for
        model.generation_config.pad_token_id = 0
        cache = {"cache_implementation": "static"} if impl == "hf-static" else {}

        @torch.inference_mode()
        def decode(prompt: list[int], n: int) -> None:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **cache)
            assert out.shape[1] == len(prompt) + n
    weights = (sum(p.numel() for p in model.parameters()) - embedding) * dtype.itemsize
    return decode, weights


def worker(*, impl: str, size: str, prompt_len: int, new_tokens: int, runs: int, threads: int, device: str,
           dtype: torch.dtype, converter: Optional[Path]) -> dict:
    device = setup(threads, device)
    decode, weights = decoder(impl, size, device, dtype, threads, converter)
    prompt = torch.randint(3, BASE_VOCAB, (prompt_len,)).tolist()
    start = clock(device)
    decode(prompt, new_tokens)  # warm-up; compiles the compiled variants
    first = clock(device) - start
    prefill = median(timed(lambda: decode(prompt, 1), device, 1, runs))
    total = median(timed(lambda: decode(prompt, new_tokens), device, 0, runs))
    tokens_per_s = (new_tokens - 1) / (total - prefill)
    result = dict(impl=impl, first_run=first, prefill=prefill, tokens_per_s=tokens_per_s, read=weights * tokens_per_s)
    peaks = gpu_peaks(device)
    if peaks:
        result["bandwidth"] = weights * tokens_per_s / peaks[1]
    return result


def main(*, size: str = "30M", prompt_len: int = 128, new_tokens: int = 64, runs: int = 3, threads: int = 2,
         device: str = "cpu", dtype: Optional[Literal["float32", "bfloat16"]] = None,
         llama_cpp_convert: Optional[Path] = None, impl: Optional[Impl] = None) -> None:
    """Time greedy decoding of ours, of transformers' generate and of llama.cpp, each variant in its own process.

    Args:
        size: 30M, 120M (CPU) or 7B (GPU)
        prompt_len: tokens of the prompt
        new_tokens: tokens decoded per run
        runs: timed runs; the median counts
        threads: torch threads (and llama.cpp's), the same in every process
        device: cpu or cuda
        dtype: float32 or bfloat16 weights (default: bfloat16 on a GPU, float32 on the CPU)
        llama_cpp_convert: llama.cpp's convert_hf_to_gguf.py (default: $LLAMA_CPP_CONVERT); without it
            llama.cpp is left out
        impl: run one variant in this process and print its result as JSON
    """
    torch_dtype = DTYPES[dtype] if dtype else default_dtype(torch.device(device))
    converter = llama_cpp_convert or (Path(os.environ["LLAMA_CPP_CONVERT"]) if "LLAMA_CPP_CONVERT" in os.environ else None)
    if impl is not None:
        report(worker(impl=impl, size=size, prompt_len=prompt_len, new_tokens=new_tokens, runs=runs, threads=threads,
                      device=device, dtype=torch_dtype, converter=converter))
        return
    dtype_name = str(torch_dtype).removeprefix("torch.")
    args = flags(size=size, prompt_len=prompt_len, new_tokens=new_tokens, runs=runs, threads=threads, device=device,
                 dtype=dtype_name)
    if converter is not None:
        args += flags(llama_cpp_convert=converter)
    impls = [name for name in IMPLS if name != "llama.cpp" or (converter is not None and device == "cpu")]
    results = {name: run_worker("decode.py", [*args, "--impl", name]) for name in impls}
    machine = read_bandwidth(threads) if device == "cpu" else None
    hf, cpp = results["hf"], results.get("llama.cpp")
    rows = []
    for name, r in results.items():
        row = [IMPLS[name], f"{r['prefill'] * 1e3:.1f}", f"{r['tokens_per_s']:.1f}",
               ratio(r["tokens_per_s"], hf["tokens_per_s"])]
        if cpp:
            row.append(ratio(r["tokens_per_s"], cpp["tokens_per_s"]))
        row += [f"{r['read'] / 1e9:.1f}", f"{r['first_run']:.1f}"]
        if "bandwidth" in r:
            row.append(f"{r['bandwidth']:.0%}")
        rows.append(row)
    columns = ["", "prefill (ms)", "decode tokens/s", "vs transformers default"] + (["vs llama.cpp"] if cpp else [])
    columns += ["weights read (GB/s)", "first run incl. compile (s)"]
    if "bandwidth" in hf:
        columns.append("of peak bandwidth")
    measured = f"; the machine reads {machine / 1e9:.1f} GB/s (torch sum over 1 GB, {threads} threads)" if machine else ""
    table(f"greedy decoding, batch 1, {size}, {dtype_name}, prompt {prompt_len} + {new_tokens} new tokens, {device}, "
          f"{threads} threads{measured}; {environment()}", columns, rows)


if __name__ == "__main__":
    run(main)
