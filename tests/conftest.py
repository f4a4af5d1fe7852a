import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(REPO))

from lit_llama.tokenizer import DEFAULT_EOT, Tokenizer  # noqa: E402


def load_script(relative_path: str) -> ModuleType:
    """Import a script (e.g. "finetune/lora.py") as a module, to call its main function directly."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem + "_" + path.parent.name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # jsonargparse looks functions' signatures up through their module
    spec.loader.exec_module(module)
    return module


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
def lima_data(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped LIMA sample prepared with scripts/prepare_lima.py for the tiny checkpoint."""
    destination = tmp_path_factory.mktemp("data") / "lima"
    load_script("scripts/prepare_lima.py").prepare(
        data_path=REPO / "data" / "lima_sample.jsonl", checkpoint_dir=tiny_checkpoint, destination_path=destination)
    return destination


SOAK_HOW = "python -m pytest -m soak tests/test_faults.py (30 kills), or --soak N"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", type=int, default=None, metavar="N",
                     help="run the soak tests (marked soak) with N random kills")
    parser.addoption("--fault-seed", type=int, default=None, metavar="S",
                     help="seed of the random kill times in tests/test_faults.py, to replay a failure")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"soak: long fault-injection loops, skipped unless asked for: {SOAK_HOW}")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    words = config.getoption("markexpr").replace("(", " ").replace(")", " ").split()
    if config.getoption("--soak") or ("soak" in words and "not" not in words):
        return
    skip = pytest.mark.skip(reason=f"soak test: {SOAK_HOW}")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
