"""The server under load: generate/serve.py against llama.cpp's OpenAI-compatible server (`llama_cpp.server`,
from llama-cpp-python's `server` extra) on the same model, at the same precision and threads.

The model has the seed's random weights at `--size`, saved as our checkpoint dir. llama.cpp's
convert_hf_to_gguf.py makes a GGUF of its Hugging Face export (scripts/convert_lit_checkpoint.py's
`export_hf_checkpoint`), so both servers hold the same weights, tokenizer and end-of-turn id.

Each server runs alone, started fresh and warmed with one request. Then 1, 8 and 32 concurrent
streaming clients (openai's async client, `/v1/completions`, greedy) send the same 64 LIMA-like
prompts, each with its own `max_tokens` (batch_decode.py's workload); a client sends its next prompt
when its reply ends. Reported for each: time to first token (p50, p99), reply tokens/s over the
whole run, the inter-token latency p99 (the gap between a reply's streamed chunks), errors, and replies
complete (ended by their limit or a stop id). Tokens are counted as the streamed chunks that carry
text: both servers send one per token.

    python benchmarks/serve_load.py --size 120M --llama_cpp_convert .../vendor/llama.cpp/convert_hf_to_gguf.py
"""

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch

from batch_decode import workload
from common import ROOT, build_ours, environment, model_config, ratio, table
from decode import DTYPES, padded_tokenizer
from lit_llama.acceptance import Started
from lit_llama.acceptance_checks import free_port, wait_until_serving
from lit_llama.checkpoint import save_checkpoint_dir
from lit_llama.cli import run
from lit_llama.export import export_hf_checkpoint
from lit_llama.tokenizer import Tokenizer

CLIENTS = (1, 8, 32)
SERVED = "served"  # the model name both servers answer to


@dataclass
class Reply:
    start: float
    chunks: list[float] = field(default_factory=list)  # when each chunk with text arrived
    finish: Optional[str] = None


def build(size: str, dtype: torch.dtype, converter: Path, work: Path) -> tuple[Path, Path]:
    """Our checkpoint dir and the GGUF of its Hugging Face export, of one random model."""
    config = model_config(size)
    tokenizer = padded_tokenizer(config.vocab_size)
    save_checkpoint_dir(build_ours(config, torch.device("cpu"), dtype), tokenizer, work / "ours")
    export_hf_checkpoint(work / "ours", work / "hf")
    gguf = work / "model.gguf"
    outtype = {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]
    subprocess.run([sys.executable, str(converter), str(work / "hf"), "--outfile", str(gguf), "--outtype", outtype],
                   check=True, capture_output=True)
    return work / "ours", gguf


def prompts_of(n: int, block_size: int) -> tuple[list[str], list[int]]:
    """The workload's prompt lengths and reply limits, the prompts as text of the test tokenizer's own pieces
    (the padding pieces would read back as other ids)."""
    ids, limits = workload(n, block_size)
    fixture = Tokenizer((ROOT / "tests" / "fixtures" / "tokenizer.model").read_bytes())
    generator = torch.Generator().manual_seed(0)
    texts = [fixture.decode(torch.randint(3, fixture.vocab_size, (len(p) - 1,), generator=generator).tolist())
             for p in ids]
    return texts, limits


@contextmanager
def server(name: str, command: list[str], port: int, threads: int, log: Path) -> Iterator[str]:
    """The server `name` started with `command`, answering: its base URL. Ended on exit."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    with Started(name, proc, log, 0) as started:
        wait_until_serving(started, url)
        yield url


async def one_reply(client, prompt: str, limit: int) -> Reply:
    reply = Reply(time.perf_counter())
    stream = await client.completions.create(model=SERVED, prompt=prompt, max_tokens=limit, temperature=0,
                                             stream=True)
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.text:
                reply.chunks.append(time.perf_counter())
            reply.finish = choice.finish_reason or reply.finish
    return reply


async def drive(url: str, prompts: list[str], limits: list[int], clients: int) -> tuple[list[Reply], int, float]:
    """`clients` clients sending the prompts in turn: the replies, the errors, and the seconds it all took."""
    from openai import AsyncOpenAI

    waiting = list(range(len(prompts)))
    replies, errors = [], 0

    async def one_client(client: AsyncOpenAI) -> None:
        nonlocal errors
        while waiting:
            i = waiting.pop(0)
            try:
                replies.append(await one_reply(client, prompts[i], limits[i]))
            except Exception as error:  # counted and shown: a benchmark that stops at the first error says less
                errors += 1
                print(f"request {i}: {error!r}", file=sys.stderr)

    async with AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=1800) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one_client(client) for _ in range(clients)))
        return replies, errors, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return torch.quantile(torch.tensor(values, dtype=torch.float64), q).item() if values else float("nan")


def summary(replies: list[Reply], errors: int, seconds: float) -> dict:
    first = [r.chunks[0] - r.start for r in replies if r.chunks]
    gaps = [b - a for r in replies for a, b in zip(r.chunks, r.chunks[1:])]
    tokens = sum(len(r.chunks) for r in replies)
    return dict(ttft_p50=percentile(first, 0.5), ttft_p99=percentile(first, 0.99), tokens=tokens,
                tokens_per_s=tokens / seconds, itl_p99=percentile(gaps, 0.99), errors=errors,
                complete=sum(r.finish in ("length", "stop") for r in replies))


def measure(url: str, prompts: list[str], limits: list[int]) -> dict[int, dict]:
    asyncio.run(drive(url, prompts[:1], [8], 1))  # warm-up (and the compiled step's compilation)
    results = {}
    for clients in CLIENTS:
        results[clients] = summary(*asyncio.run(drive(url, prompts, limits, clients)))
        print(f"  {clients} clients: {results[clients]}", file=sys.stderr)
    return results


def main(*, size: str = "120M", dtype: Literal["float32", "bfloat16"] = "float32", prompts: int = 64,
         threads: int = 2, batch_size: int = 16, compile: bool = False,
         llama_cpp_convert: Optional[Path] = None) -> None:
    """Drive generate/serve.py and llama_cpp.server with 1, 8 and 32 streaming clients.

    Args:
        size: 30M or 120M
        dtype: the weights' precision on both sides
        prompts: LIMA-like prompts, each with its own reply limit
        threads: torch's threads in our server, llama.cpp's in its
        batch_size: our server's rows (--batch_size); llama.cpp's server decodes one request at a time
        compile: our server with --compile
        llama_cpp_convert: llama.cpp's convert_hf_to_gguf.py (default: $LLAMA_CPP_CONVERT)
    """
    converter = llama_cpp_convert or os.environ.get("LLAMA_CPP_CONVERT")
    if converter is None:
        raise SystemExit("give llama.cpp's convert_hf_to_gguf.py as --llama_cpp_convert or $LLAMA_CPP_CONVERT")
    work = Path(tempfile.mkdtemp())
    torch_dtype = DTYPES[dtype]
    checkpoint, gguf = build(size, torch_dtype, Path(converter), work)
    texts, limits = prompts_of(prompts, model_config(size).block_size)
    precision = {"float32": "32-true", "bfloat16": "bf16-true"}[dtype]
    port = free_port()
    ours = [sys.executable, "generate/serve.py", "--checkpoint_dir", str(checkpoint), "--model_name", SERVED,
            "--port", str(port), "--batch_size", str(batch_size), "--precision", precision, "--compile", str(compile).lower()]
    theirs = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", SERVED, "--port", str(port),
              "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(model_config(size).block_size),
              "--interrupt_requests", "false"]  # by default a new request cuts the one in progress short
    results = {}
    for name, command in (("ours", ours), ("llama.cpp", theirs)):
        print(f"{name}:", file=sys.stderr)
        with server(name, command, port, threads, work / f"{name}.log") as url:
            results[name] = measure(url, texts, limits)
    rows = []
    for clients in CLIENTS:
        for name in results:
            r, cpp = results[name][clients], results["llama.cpp"][clients]
            rows.append([str(clients), name, f"{r['ttft_p50'] * 1e3:.0f}", f"{r['ttft_p99'] * 1e3:.0f}",
                         f"{r['tokens_per_s']:.1f}", ratio(r["tokens_per_s"], cpp["tokens_per_s"]),
                         f"{r['itl_p99'] * 1e3:.0f}", str(r["tokens"]), str(r["errors"]), f"{r['complete']}/{prompts}"])
    table(f"the server under load, {size}, {dtype}, {threads} threads, {prompts} prompts, ours with --batch_size "
          f"{batch_size}{' --compile true' if compile else ''}; {environment()}",
          ["clients", "server", "TTFT p50 (ms)", "TTFT p99 (ms)", "reply tokens/s", "vs llama.cpp",
           "inter-token p99 (ms)", "reply tokens", "errors", "complete"], rows)


if __name__ == "__main__":
    run(main)
