"""Other engines on an exported fine-tune (opt-in: `python -m pytest -m engines tests/test_engines.py`).

llama.cpp: its own converter (`convert_hf_to_gguf.py`, from llama-cpp-python's sdist, at
$LLAMA_CPP_CONVERT) reads our HF export, and llama.cpp's completion API stops on the EOT with the
greedy tokens we decode. Its LoRA converter (`convert_lora_to_gguf.py`, beside the other) reads the
PEFT adapter scripts/export_peft.py writes, and llama.cpp runs it on the base's GGUF with our greedy
tokens. Needs `pip install llama-cpp-python` (a source build, minutes).
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import pytest

from conftest import REPO, load_script
from lit_llama.checkpoint import load_finetuned, load_model
from lit_llama.finetune import DataArgs, RunLayout
from lit_llama.generate import generate, stop_reason
from lit_llama.lora import LoRAConfig
from lit_llama.prepare import PrepareDirs, VocabChange
from lit_llama.prompts import encode_prompt
from lit_llama.tokenizer import Tokenizer
from lit_llama.training import TrainArgs

pytestmark = pytest.mark.engines


@pytest.fixture(scope="module")
def gguf(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A LoRA fine-tune that halts, merged, exported to HF, converted to GGUF by llama.cpp's converter."""
    root = tmp_path_factory.mktemp("engines")
    prompts = halting_lora(tiny_checkpoint, root, VocabChange())
    load_script("scripts/merge_lora.py").main(lora_path=root / "lora", out_dir=root / "merged")
    load_script("scripts/convert_lit_checkpoint.py").main(checkpoint_dir=root / "merged", output_dir=root / "hf")
    convert("convert_hf_to_gguf.py", root / "hf", "--outfile", root / "model.gguf")
    return root / "merged", root / "model.gguf", prompts


def convert(script: str, *args: object) -> None:
    """Run one of llama.cpp's converters, found beside $LLAMA_CPP_CONVERT, writing f32."""
    converter = os.environ.get("LLAMA_CPP_CONVERT")
    if not converter or not Path(converter).is_file():
        pytest.fail("set LLAMA_CPP_CONVERT to llama.cpp's convert_hf_to_gguf.py (in llama-cpp-python's sdist: "
                    "pip download llama-cpp-python --no-deps --no-binary :all:, vendor/llama.cpp/)")
    done = subprocess.run([sys.executable, str(Path(converter).with_name(script)), *map(str, args), "--outtype", "f32"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def halting_lora(checkpoint: Path, root: Path, vocab: VocabChange) -> list[str]:
    """A LoRA fine-tune (root/lora) on 8 short LIMA samples, long enough to end its replies on the EOT; their prompts."""
    rows = [json.loads(line) for line in (REPO / "data" / "lima_sample.jsonl").open()]
    short = [r for r in rows if len(r["conversations"]) == 2 and len(r["conversations"][1].split()) < 25][:8]
    (root / "short.jsonl").write_text("\n".join(json.dumps(r) for r in short))
    load_script("scripts/prepare_lima.py").prepare(data_path=root / "short.jsonl", dirs=PrepareDirs(checkpoint, root / "data"),
                                                   vocab=vocab)
    load_script("finetune/lora.py").setup(
        data=DataArgs(root / "data", checkpoint_dir=checkpoint), layout=RunLayout(root / "lora"),
        lora=LoRAConfig(mlp=True, projection=True),
        train=TrainArgs(learning_rate=3e-3, max_iters=200, warmup_iters=10, global_batch_size=4, micro_batch_size=4,
                        eval_interval=200, eval_iters=1))
    return [r["conversations"][0] for r in short]


def llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("pip install llama-cpp-python (a source build, minutes)")
    return llama_cpp


def greedy(llm: Any, ids: list[int], limit: int, stop_ids: Sequence[int]) -> list[int]:
    """llama.cpp's greedy tokens after `ids`, up to and with the first of `stop_ids`."""
    tokens = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        tokens.append(token)
        if token in stop_ids or len(tokens) == limit:
            return tokens
    return tokens


def test_llama_cpp_stops_on_the_eot_with_our_greedy_tokens(gguf):
    merged, path, prompts = gguf
    tokenizer, model = Tokenizer.from_dir(merged), load_model(merged).eval()
    llm = llama_cpp().Llama(model_path=str(path), n_ctx=256, verbose=False, n_threads=2)
    assert llm.token_eos() == tokenizer.eot_id  # the converter took config.json's eos
    for prompt in prompts:
        ids = encode_prompt(tokenizer, [prompt])
        ours = generate(model, ids, 100, stop_ids=tuple(tokenizer.stop_ids))
        assert stop_reason(ours, tokenizer) == "eot"
        completion = llm.create_completion(ids, max_tokens=100, temperature=0.0, top_k=1)["choices"][0]
        assert completion["finish_reason"] == "stop", prompt
        assert greedy(llm, ids, 100, [llm.token_eos()]) == ours.tokens + [tokenizer.eot_id], prompt


def test_llama_cpp_runs_the_exported_lora_on_the_base_with_our_greedy_tokens(tiny_checkpoint, tmp_path):
    """A LoRA with a repurposed EOT, written as a PEFT adapter (its EOT rows a rank-1 update of embed_tokens
    and lm_head), converted by llama.cpp's convert_lora_to_gguf.py and run on the base's GGUF: llama.cpp
    decodes our greedy tokens and, told the EOT ends a turn, stops on it."""
    prompts = halting_lora(tiny_checkpoint, tmp_path, VocabChange(repurpose_eot="▁twenty"))
    load_script("scripts/convert_lit_checkpoint.py").main(checkpoint_dir=tiny_checkpoint, output_dir=tmp_path / "hf")
    convert("convert_hf_to_gguf.py", tmp_path / "hf", "--outfile", tmp_path / "base.gguf")
    load_script("scripts/export_peft.py").main(lora_path=tmp_path / "lora", output_dir=tmp_path / "adapter")
    convert("convert_lora_to_gguf.py", tmp_path / "adapter", "--base", tmp_path / "hf", "--outfile", tmp_path / "lora.gguf")
    model, tokenizer = load_finetuned(tmp_path / "lora")
    # the base's GGUF ends generation on the base's EOS; a user names the EOT as llama.cpp's --override-kv does
    llm = llama_cpp().Llama(model_path=str(tmp_path / "base.gguf"), lora_path=str(tmp_path / "lora.gguf"), n_ctx=256,
                            n_threads=2, verbose=False, kv_overrides={"tokenizer.ggml.eos_token_id": tokenizer.eot_id})
    halted = 0
    for prompt in prompts:
        ids = encode_prompt(tokenizer, [prompt])
        ours = generate(model.eval(), ids, 100, stop_ids=tuple(tokenizer.stop_ids))
        halted += stop_reason(ours, tokenizer) == "eot"
        theirs = greedy(llm, ids, 100, tokenizer.stop_ids)
        assert theirs == ours.tokens + ([ours.stop_id] if ours.stop_id is not None else []), prompt
        completion = llm.create_completion(ids, max_tokens=100, temperature=0.0, top_k=1)["choices"][0]
        assert completion["finish_reason"] == ("stop" if ours.stop_id is not None else "length"), prompt
    assert halted >= len(prompts) // 2  # the test is about stopping on the EOT: most replies must
