"""Other engines on an exported fine-tune (opt-in: `python -m pytest -m engines tests/test_engines.py`).

llama.cpp: its own converter (`convert_hf_to_gguf.py`, from llama-cpp-python's sdist, at
$LLAMA_CPP_CONVERT) reads our HF export, and llama.cpp's completion API stops on the EOT with the
greedy tokens we decode. Needs `pip install llama-cpp-python` (a source build, minutes).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, load_script
from lit_llama.checkpoint import load_model
from lit_llama.finetune import DataArgs, RunLayout
from lit_llama.generate import generate, stop_reason
from lit_llama.lora import LoRAConfig
from lit_llama.prepare import PrepareDirs
from lit_llama.prompts import encode_prompt
from lit_llama.tokenizer import Tokenizer
from lit_llama.training import TrainArgs

pytestmark = pytest.mark.engines


@pytest.fixture(scope="module")
def gguf(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A LoRA fine-tune that halts, merged, exported to HF, converted to GGUF by llama.cpp's converter."""
    converter = os.environ.get("LLAMA_CPP_CONVERT")
    if not converter or not Path(converter).is_file():
        pytest.fail("set LLAMA_CPP_CONVERT to llama.cpp's convert_hf_to_gguf.py (in llama-cpp-python's sdist: "
                    "pip download llama-cpp-python --no-deps --no-binary :all:, vendor/llama.cpp/)")
    root = tmp_path_factory.mktemp("engines")
    rows = [json.loads(line) for line in (REPO / "data" / "lima_sample.jsonl").open()]
    short = [r for r in rows if len(r["conversations"]) == 2 and len(r["conversations"][1].split()) < 25][:8]
    (root / "short.jsonl").write_text("\n".join(json.dumps(r) for r in short))
    load_script("scripts/prepare_lima.py").prepare(data_path=root / "short.jsonl", dirs=PrepareDirs(tiny_checkpoint, root / "data"))
    load_script("finetune/lora.py").setup(
        data=DataArgs(root / "data", checkpoint_dir=tiny_checkpoint), layout=RunLayout(root / "lora"),
        lora=LoRAConfig(mlp=True, projection=True),
        train=TrainArgs(learning_rate=3e-3, max_iters=200, warmup_iters=10, global_batch_size=4, micro_batch_size=4,
                        eval_interval=200, eval_iters=1))
    load_script("scripts/merge_lora.py").main(lora_path=root / "lora", out_dir=root / "merged")
    load_script("scripts/convert_lit_checkpoint.py").main(checkpoint_dir=root / "merged", output_dir=root / "hf")
    subprocess.run([sys.executable, converter, str(root / "hf"), "--outfile", str(root / "model.gguf"), "--outtype", "f32"],
                   check=True, capture_output=True)
    return root / "merged", root / "model.gguf", [r["conversations"][0] for r in short]


def test_llama_cpp_stops_on_the_eot_with_our_greedy_tokens(gguf):
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("pip install llama-cpp-python (a source build, minutes)")
    merged, path, prompts = gguf
    tokenizer, model = Tokenizer.from_dir(merged), load_model(merged).eval()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, n_threads=2)
    assert llm.token_eos() == tokenizer.eot_id  # the converter took config.json's eos
    for prompt in prompts:
        ids = encode_prompt(tokenizer, [prompt])
        ours = generate(model, ids, 100, stop_ids=tuple(tokenizer.stop_ids))
        assert stop_reason(ours, tokenizer) == "eot"
        completion = llm.create_completion(ids, max_tokens=100, temperature=0.0, top_k=1)["choices"][0]
        assert completion["finish_reason"] == "stop", prompt
        theirs = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            theirs.append(token)
            if token == llm.token_eos() or len(theirs) == 100:
                break
        assert theirs == ours.tokens + [tokenizer.eot_id], prompt
