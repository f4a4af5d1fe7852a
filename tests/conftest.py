import csv
import functools
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pytest

# The suite runs on the CPU, also on a machine with a GPU (and its subprocesses with it): its references
# are fp32 CPU runs compared tightly (batched equal to alone, a resumed run equal to the uninterrupted
# one at 1e-6), which bf16 on a GPU would not reproduce. scripts/gpu_check.py is the GPU's acceptance run.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(REPO))

from lit_llama.checkpoint import load_model, save_checkpoint_dir  # noqa: E402
from lit_llama.prepare import PrepareDirs  # noqa: E402
from lit_llama.tokenizer import DEFAULT_EOT, Tokenizer, extend_tokenizer  # noqa: E402
from lit_llama.vocab import add_special_tokens  # noqa: E402


def load_script(relative_path: str) -> ModuleType:
    """Import a script (e.g. "finetune/lora.py") as a module, to call its main function directly."""
    path = REPO / relative_path
    if str(path.parent) not in sys.path:  # as `python path` does, the script's neighbours (benchmarks' common.py)
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem + "_" + path.parent.name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # jsonargparse looks functions' signatures up through their module
    spec.loader.exec_module(module)
    return module


@functools.cache
def script_entry(relative_path: str) -> Callable[..., Any]:
    """The function a script's `__main__` block hands to `run(...)`, from the script imported as a module."""
    module = load_script(relative_path)
    entry = re.search(r"^\s+run\((\w+)\)", (REPO / relative_path).read_text(), re.M)[1]
    return getattr(module, entry)


def val_losses(out_dir: Path) -> list[float]:
    """The validation losses a run wrote to its metrics.csv, in order."""
    with open(out_dir / "metrics.csv", newline="") as f:
        return [float(row["val_loss"]) for row in csv.DictReader(f) if row["val_loss"]]


@pytest.fixture(scope="session")
def base_tokenizer() -> Tokenizer:
    """The tiny tokenizer, as scripts/prepare_tiny.py trains it from data/tiny/corpus.txt (vocab 1024)."""
    return Tokenizer((FIXTURES / "tokenizer.model").read_bytes())


@pytest.fixture(scope="session")
def tokenizer(base_tokenizer: Tokenizer) -> Tokenizer:
    return base_tokenizer.with_special_tokens([DEFAULT_EOT], eot=DEFAULT_EOT)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny base checkpoint made by scripts/prepare_tiny.py, with a short pretraining."""
    out_dir = tmp_path_factory.mktemp("checkpoints") / "tiny"
    load_script("scripts/prepare_tiny.py").main(out_dir=out_dir, steps=200)
    return out_dir


@pytest.fixture(scope="session")
def eot_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base model with an (untrained) EOT row, as a plain checkpoint dir."""
    tokenizer = extend_tokenizer(Tokenizer.from_dir(tiny_checkpoint))
    model = load_model(tiny_checkpoint)
    add_special_tokens(model, tokenizer)
    directory = tmp_path_factory.mktemp("checkpoints") / "eot"
    save_checkpoint_dir(model, tokenizer, directory)
    return directory


@pytest.fixture(scope="session")
def lima_data(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped LIMA sample prepared with scripts/prepare_lima.py for the tiny checkpoint."""
    destination = tmp_path_factory.mktemp("data") / "lima"
    load_script("scripts/prepare_lima.py").prepare(
        data_path=REPO / "data" / "lima_sample.jsonl", dirs=PrepareDirs(tiny_checkpoint, destination))
    return destination


# opt-in markers: name -> how to run them
OPT_IN = {
    "soak": "long fault-injection loops: python -m pytest -m soak tests/test_faults.py (30 kills), or --soak N",
    "docs": "every command of README.md and howto/*.md, run in a copy of the repo: python -m pytest -m docs "
            "tests/test_docs.py (about 7 minutes)",
    "engines": "other engines on an export: LLAMA_CPP_CONVERT=.../convert_hf_to_gguf.py python -m pytest -m engines "
               "tests/test_engines.py (needs llama-cpp-python)",
    "eval": "lm-evaluation-harness against generate/serve.py and on the HF export: python -m pytest -m eval "
            "tests/test_lm_eval.py (needs pip install -e '.[eval]')",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", type=int, default=None, metavar="N",
                     help="run the soak tests (marked soak) with N random kills")
    parser.addoption("--fault-seed", type=int, default=None, metavar="S",
                     help="seed of the random kill times in tests/test_faults.py, to replay a failure")


def pytest_configure(config: pytest.Config) -> None:
    for marker, how in OPT_IN.items():
        config.addinivalue_line("markers", f"{marker}: skipped unless asked for; {how}")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    words = config.getoption("markexpr").replace("(", " ").replace(")", " ").split()
    asked = {marker for marker in OPT_IN if marker in words and "not" not in words}
    if config.getoption("--soak"):
        asked.add("soak")
    for item in items:
        for marker in OPT_IN.keys() - asked:
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=f"opt-in: {OPT_IN[marker]}"))
