"""The checks of the acceptance run (scripts/gpu_check.py), in the order they run: each takes the work
dir, returns the detail of its line, and raises `Failed` or `Missing`."""

import json
import os
import re
import signal
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

import torch

from lit_llama import device_check
from lit_llama.acceptance import (COMMAND_TIMEOUT, REPO, Failed, Started, Work, finish, last_error,
                                  metrics_rows, require, require_reasons, require_trained, run_script, start,
                                  tokens_per_second, train_args)
from lit_llama.cli import flags
from lit_llama.checkpoint import load_model
from lit_llama.dataset import TokenDataset
from lit_llama.errors import BadValue
from lit_llama.prompts import encode_prompt
from lit_llama.tokenizer import Tokenizer

CheckName = Literal["setup", "lora", "adapter", "full", "qlora", "generate", "attention", "compile", "batch", "chat",
                    "halting", "self_sample", "serve", "multi_lora", "export", "transformers", "ddp", "fsdp"]
SERVER_DRAINED = (0, -signal.SIGTERM)  # after draining, uvicorn exits by the signal it caught
# logits of the export against ours, as a share of the largest logit
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
PROMPTS = [
    "How often should I water a cactus?", "What is a variable in programming?", "Why is the sky blue?",
    "How do plants drink water?", "What makes bread rise?", "How do I boil an egg?", "Why do cats purr?",
    "What is a good name for a dog?", "How far away is the moon?", "Why do leaves change colour?",
    "How do bees make honey?", "What is the capital of France?",
]


def check_setup(work: Work) -> str:
    run_script(work, "scripts/prepare_tiny.py", flags(out_dir=work.fresh("base"), steps=work.plan.pretrain_steps),
               in_process=True)
    run_script(work, "scripts/prepare_lima.py", flags(data_path=REPO / "data" / "lima_sample.jsonl",
                                                      checkpoint_dir=work.base, destination_path=work.fresh("data")),
               in_process=True)
    train, val = (len(TokenDataset.load(work.data / f"{split}.pt")) for split in ("train", "val"))
    return f"{train} train / {val} val samples, EOT id {Tokenizer.from_dir(work.data).eot_id}"


def check_lora(work: Work) -> str:
    """A run stopped by SIGTERM once its first checkpoint is written, then resumed to its last step."""
    steps, every = work.plan.steps, max(1, work.plan.steps // 3)
    out_dir = work.fresh("lora")
    args = train_args(work, out_dir, ["--train.eval_interval", every, "--train.save_interval", 1])
    with start(work, "finetune/lora.py", args) as command:
        deadline, first_checkpoint = time.monotonic() + COMMAND_TIMEOUT, out_dir / "training_state.pth"
        while command.proc.poll() is None and not first_checkpoint.is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        if command.proc.poll() is not None:
            raise Failed(f"finetune/lora.py ended (exit {command.proc.returncode}) before it could be stopped after "
                         f"its first checkpoint: {last_error(command.output())}")
        command.proc.send_signal(signal.SIGTERM)
        stopped = finish(command, expect=(130,))
    if "SIGTERM: saved a checkpoint" not in stopped.output:
        raise Failed("stopped by SIGTERM, finetune/lora.py did not say it saved a checkpoint")
    saved = len(metrics_rows(out_dir))
    if saved >= steps:
        raise Failed(f"SIGTERM stopped the run only at its last step, {saved}: give more --steps")
    resumed = run_script(work, "finetune/lora.py", [*args, "--resume", "true"])
    if f"resuming from step {saved}" not in resumed.output:
        raise Failed(f"the resumed run did not say it resumed from step {saved}")
    validated = [int(row["step"]) for row in metrics_rows(out_dir) if row["val_loss"]]
    expected = [step for step in range(1, steps + 1) if step % every == 0 or step == steps]
    if validated != expected:
        raise Failed(f"validation ran at steps {validated}, not {expected}")
    samples = re.findall(r"; sample .* \[(\S+)\]$", stopped.output + resumed.output, re.M)
    require_reasons(samples, len(expected))
    return f"stopped at step {saved} of {steps}, {require_trained(work, out_dir, 'lit_model_lora.pth')}"


def check_adapter(work: Work) -> str:
    out_dir = work.fresh("adapter")
    run_script(work, "finetune/adapter.py", train_args(work, out_dir), in_process=True)
    return require_trained(work, out_dir, "lit_model_adapter.pth")


def check_full(work: Work) -> str:
    out_dir = work.fresh("full")
    run_script(work, "finetune/full.py", train_args(work, out_dir), in_process=True)
    return require_trained(work, out_dir, "lit_model.pth")


def check_qlora(work: Work) -> str:
    require("torchao", "pip install -e '.[quantize]'")
    out_dir = work.fresh("qlora")
    run_script(work, "finetune/lora.py", train_args(work, out_dir, flags(quantize="nf4")), in_process=True)
    return require_trained(work, out_dir, "lit_model_lora.pth")


def greedy_reply(work: Work, extra: Sequence[Any] = (), samples: int = 1) -> str:
    """`samples` greedy replies to one prompt; the line's tokens/s is the last one's."""
    args = flags(lora_path=work.lora, prompt=PROMPTS[0], temperature=0, max_new_tokens=work.plan.max_new_tokens,
                 num_samples=samples)
    result = run_script(work, "generate/lora.py", [*args, *extra], in_process=True)
    reasons = require_reasons(re.findall(r"^stop reason: (\S+) after \d+ tokens", result.output, re.M), samples)
    return f"{reasons}, {tokens_per_second(result.output):.0f} tok/s"


def check_generate(work: Work) -> str:
    return greedy_reply(work)


def check_compile(work: Work) -> str:
    # torch.compile does not trace through the device check's modes (lit_llama/device_check.py): the compiled
    # step runs off it; the eager step it compiles is checked by the generate check
    simulated = os.environ.pop(device_check.ENV, None)
    try:
        return greedy_reply(work, flags(compile="true"), samples=2)  # the second reply's rate: compiled already
    finally:
        if simulated is not None:
            os.environ[device_check.ENV] = simulated


def check_batch(work: Work) -> str:
    prompts, replies = work.fresh("prompts.jsonl"), work.fresh("replies.jsonl")
    prompts.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in PROMPTS))
    result = run_script(work, "generate/lora.py", flags(lora_path=work.lora, prompts_file=prompts, batch_size=4,
                                                        output_file=replies, max_new_tokens=work.plan.max_new_tokens),
                        in_process=True)
    rows = [json.loads(line) for line in replies.read_text().splitlines()]
    reasons = require_reasons([row["stop_reason"] for row in rows], len(PROMPTS))
    return f"{reasons}, {tokens_per_second(result.output):.0f} tok/s"


def check_chat(work: Work) -> str:
    result = run_script(work, "generate/chat.py", flags(lora_path=work.lora, temperature=0,
                                                        max_new_tokens=work.plan.max_new_tokens),
                        stdin=f"{PROMPTS[0]}\n{PROMPTS[1]}\n", in_process=True)
    return require_reasons(re.findall(r"\[(\S+) after \d+ tokens, read", result.output), 2)


def check_halting(work: Work) -> str:
    report = run_script(work, "scripts/evaluate_halting.py",
                        flags(lora_path=work.lora, data_dir=work.data, max_new_tokens=work.plan.max_new_tokens,
                              output_file=work.fresh("halting.json")), in_process=True).value
    if not report["prompts"]:
        raise Failed("no prompts evaluated")
    return require_reasons([row["stop_reason"] for row in report["rows"]], report["prompts"])


def check_self_sample(work: Work) -> str:
    rows, cache = 4, work.fresh("self_sampled.jsonl")
    summary = run_script(work, "scripts/self_sample.py",
                         flags(lora_path=work.lora, data_path=REPO / "data" / "lima_sample.jsonl",
                               destination_path=cache, max_rows=rows, max_new_tokens=work.plan.max_new_tokens,
                               keep_unfinished="true"), in_process=True).value
    if summary["written"] + summary["empty_reply"] + summary["too_long"] != rows:
        raise Failed(f"of {rows} rows, {summary['written']} replies cached, {summary['empty_reply']} empty, "
                     f"{summary['too_long']} too long")
    cached = [json.loads(line) for line in cache.read_text().splitlines()]
    return require_reasons([row["stop_reason"] for row in cached], summary["written"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(server: Started, url: str) -> None:
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while server.proc.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    if server.proc.poll() is None:
        raise Failed(f"{server.script} did not answer in {COMMAND_TIMEOUT} s")
    raise Failed(f"{server.script} exited {server.proc.returncode}: {last_error(server.output())}")


def check_serve(work: Work) -> str:
    openai = require("openai", "pip install openai")
    require("fastapi", "pip install -e '.[serve]'")
    require("uvicorn", "pip install -e '.[serve]'")
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    with start(work, "generate/serve.py", flags(lora_path=work.lora, port=port, batch_size=4)) as server:
        wait_until_serving(server, url)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=COMMAND_TIMEOUT)
        request = dict(model=client.models.list().data[0].id, messages=[{"role": "user", "content": PROMPTS[0]}],
                       max_tokens=work.plan.max_new_tokens, temperature=0)
        begin = time.perf_counter()
        plain = client.chat.completions.create(**request)
        rate = plain.usage.completion_tokens / (time.perf_counter() - begin)
        replies = [(plain.choices[0].message.content, plain.choices[0].finish_reason)]
        pieces, reason = [], None
        for chunk in client.chat.completions.create(stream=True, **request):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                reason = chunk.choices[0].finish_reason or reason
        replies.append(("".join(pieces), reason))
        server.proc.send_signal(signal.SIGTERM)
        stopped = finish(server, expect=SERVER_DRAINED)
    for kind, (content, reason) in zip(("plain", "streamed"), replies):
        if reason not in ("stop", "length") or not content:
            raise Failed(f"the {kind} reply has finish_reason {reason!r} and {len(content or '')} characters")
    if "Traceback" in stopped.output:
        raise Failed(f"generate/serve.py stopped with a traceback: {last_error(stopped.output)}")
    return f"finish_reason {replies[0][1]}, {rate:.0f} tok/s"


def check_multi_lora(work: Work) -> str:
    """The base and the LoRA under two names on one server: requests for all three share its batch."""
    openai = require("openai", "pip install openai")
    require("fastapi", "pip install -e '.[serve]'")
    require("uvicorn", "pip install -e '.[serve]'")
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    served = flags(checkpoint_dir=work.base, port=port, batch_size=4) + ["--lora", f"a={work.lora}", "--lora", f"b={work.lora}"]
    with start(work, "generate/serve.py", served) as server:
        wait_until_serving(server, url)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=COMMAND_TIMEOUT)
        names = [model.id for model in client.models.list().data]
        begin = time.perf_counter()
        with ThreadPoolExecutor(len(names)) as pool:
            replies = list(pool.map(lambda name: client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=work.plan.max_new_tokens,
                temperature=0), names))
        rate = sum(reply.usage.completion_tokens for reply in replies) / (time.perf_counter() - begin)
        server.proc.send_signal(signal.SIGTERM)
        finish(server, expect=SERVER_DRAINED)
    if names[1:] != ["a", "b"]:
        raise Failed(f"/v1/models lists {names}, not the base, a and b")
    for reply in replies:
        if reply.choices[0].finish_reason not in ("stop", "length") or not reply.choices[0].message.content:
            raise Failed(f"the reply of {reply.model} has finish_reason {reply.choices[0].finish_reason!r}")
    return f"{len(names)} models in one batch, {rate:.0f} tok/s"


def check_export(work: Work) -> str:
    run_script(work, "scripts/merge_lora.py", flags(lora_path=work.lora, out_dir=work.fresh("merged")),
               in_process=True)
    run_script(work, "scripts/convert_lit_checkpoint.py",
               flags(checkpoint_dir=work.merged, output_dir=work.fresh("hf")), in_process=True)
    eos = json.loads((work.hf / "generation_config.json").read_text())["eos_token_id"]
    eot_id = Tokenizer.from_dir(work.merged).eot_id
    if eot_id not in (eos if isinstance(eos, list) else [eos]):
        raise Failed(f"generation_config.json stops on {eos}, not on the EOT id {eot_id}")
    return f"eos ids {eos}"


def check_transformers(work: Work) -> str:
    transformers = require("transformers", "pip install transformers")
    device = torch.device(work.plan.accelerator)
    tokenizer = Tokenizer.from_dir(work.merged)
    ours = load_model(work.merged).to(device).eval()
    dtype = ours.lm_head.weight.dtype
    theirs = transformers.AutoModelForCausalLM.from_pretrained(work.hf, dtype=dtype).to(device).eval()
    eos = theirs.generation_config.eos_token_id
    if tokenizer.eot_id not in (eos if isinstance(eos, list) else [eos]):
        raise Failed(f"transformers' generation config stops on {eos}, not on the EOT id {tokenizer.eot_id}")
    ids = torch.tensor([encode_prompt(tokenizer, [PROMPTS[0]])], device=device)
    with torch.no_grad():
        expected, logits = ours(ids).float(), theirs(ids).logits.float()
    if logits.shape != expected.shape:
        raise Failed(f"transformers' logits have shape {tuple(logits.shape)}, ours {tuple(expected.shape)}")
    difference, largest = (logits - expected).abs().max().item(), expected.abs().max().item()
    if difference > TOLERANCE[dtype] * largest:
        raise Failed(f"logits differ by up to {difference:.3g} (largest {largest:.3g}) in {dtype}")
    return f"logits within {difference:.1e} in {str(dtype).removeprefix('torch.')}"


def check_attention(work: Work) -> str:
    """Each attention path on its fused kernel, forced, so a path the kernel refuses raises instead of
    falling back to math (fp32 (B, heads, T, S) scores): flash the causal one (training, prompts without a
    cache), and the KV cache's masked one the memory-efficient kernel on a GPU (CPU flash on the CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = work.plan.accelerator == "cuda"
    device, dtype = torch.device(work.plan.accelerator), torch.bfloat16 if cuda else torch.float32
    masked = SDPBackend.EFFICIENT_ATTENTION if cuda else SDPBackend.FLASH_ATTENTION
    model = load_model(work.base).to(device=device, dtype=dtype).eval()
    ids = torch.tensor([Tokenizer.from_dir(work.base).encode(PROMPTS[0], bos=True)], device=device)
    T = ids.shape[1]
    with torch.inference_mode():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            whole = model(ids)
        model.set_kv_cache(batch_size=1, max_seq_length=T + 1)
        with sdpa_kernel(masked):
            prompt = model(ids[:, :-1], torch.arange(T - 1, device=device).unsqueeze(0), kv_length=T - 1)
            step = model(ids[:, -1:], torch.tensor([[T - 1]], device=device), kv_length=T)
    cached = torch.cat([prompt, step], dim=1).float()
    difference, largest = (cached - whole.float()).abs().max().item(), whole.float().abs().max().item()
    if difference > TOLERANCE[dtype] * largest:
        raise Failed(f"the cached path's logits differ from the causal path's by up to {difference:.3g}")
    return f"causal: flash; masked: {'memory-efficient' if cuda else 'flash (CPU)'}; {model.config.n_head} query " \
           f"heads over {model.config.n_query_groups} k/v heads"


def parallel_check(strategy: str) -> Callable[[Work], str]:
    """The check of a LoRA fine-tune on 2 devices under `strategy` (ddp or fsdp)."""

    def check(work: Work) -> str:
        out_dir = work.fresh(strategy)
        result = run_script(work, "finetune/lora.py", train_args(work, out_dir, flags(devices=2, strategy=strategy)),
                            processes=2)
        if "trained weights agree across 2 ranks: True" not in result.output:
            raise Failed("the two ranks' trained weights differ")
        return require_trained(work, out_dir, "lit_model_lora.pth")

    return check


@dataclass
class Check:
    """One line of the run."""

    name: CheckName
    what: str  # printed after the name
    run: Callable[[Work], str]  # the line's detail (counts, tokens/s); raises Failed, or Missing
    needs: tuple[CheckName, ...] = ()  # checks whose outputs it reads


CHECKS = [
    Check("setup", "prepare_tiny, prepare_lima", check_setup),
    Check("lora", "bf16: validate, SIGTERM stop, resume", check_lora, ("setup",)),
    Check("adapter", "bf16", check_adapter, ("setup",)),
    Check("full", "bf16", check_full, ("setup",)),
    Check("qlora", "nf4 base, bf16", check_qlora, ("setup",)),
    Check("generate", "eager, greedy", check_generate, ("lora",)),
    Check("attention", "fused kernels, forced", check_attention, ("setup",)),
    Check("compile", "generate --compile true", check_compile, ("lora",)),
    Check("batch", f"{len(PROMPTS)} prompts, continuous batch of 4", check_batch, ("lora",)),
    Check("chat", "two messages", check_chat, ("lora",)),
    Check("halting", "evaluate_halting on the val split", check_halting, ("lora",)),
    Check("self_sample", "4 rows", check_self_sample, ("lora",)),
    Check("serve", "openai client: plain, streamed; SIGTERM", check_serve, ("lora",)),
    Check("multi_lora", "the base and 2 LoRAs in one batch (--lora)", check_multi_lora, ("lora",)),
    Check("export", "merge_lora, convert_lit_checkpoint", check_export, ("lora",)),
    Check("transformers", "the export's logits and eos ids", check_transformers, ("export",)),
    Check("ddp", "lora on 2 devices", parallel_check("ddp"), ("setup",)),
    Check("fsdp", "lora on 2 devices", parallel_check("fsdp"), ("setup",)),
]
MULTI_DEVICE = ("ddp", "fsdp")


def selected(only: Optional[list[str]], devices: int) -> list[Check]:
    """The checks to run, in order: all of them (ddp and fsdp with 2 devices or more), or those in
    `only` and the checks they build on."""
    if only is None:
        return [check for check in CHECKS if devices >= 2 or check.name not in MULTI_DEVICE]
    if devices < 2 and (named := [name for name in only if name in MULTI_DEVICE]):
        raise BadValue(f"--only {','.join(named)}: needs 2 devices, pass --devices 2")
    by_name, wanted = {check.name: check for check in CHECKS}, set()
    pending = list(only)
    while pending:
        name = pending.pop()
        wanted.add(name)
        pending.extend(set(by_name[name].needs) - wanted)
    return [check for check in CHECKS if check.name in wanted]

