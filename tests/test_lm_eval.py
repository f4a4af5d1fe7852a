"""lm-evaluation-harness against generate/serve.py (opt-in: `python -m pytest -m eval tests/test_lm_eval.py`).

A multiple-choice task of our own, in a temporary directory (lm-eval reads local JSON lines through
`dataset_path: json`), scored through the server by lm-eval's `local-completions` model, gives the
log-likelihoods lm-eval's own `hf` model gives on our Hugging Face export of the same checkpoint. A
generation task through `local-chat-completions` gives the replies we decode in process."""

import json
import os
from pathlib import Path

import pytest

from conftest import load_script
from lit_llama.checkpoint import load_model
from lit_llama.generate import generate, resolve_stop_ids
from lit_llama.prompts import encode_prompt
from lit_llama.tokenizer import Tokenizer
from test_serve import start_server

lm_eval = pytest.importorskip("lm_eval", reason="pip install -e '.[eval]'")
pytestmark = pytest.mark.eval

QUESTIONS = [
    {"question": "Where does rain come from?", "choices": [" clouds", " stones", " bread"], "label": 0},
    {"question": "What do plants drink?", "choices": [" water", " fire"], "label": 0},
    {"question": "The sea is", "choices": [" salty", " dry", " square", " loud"], "label": 0},
]
CHOICE_TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
REPLY_TASK = """task: tiny_reply
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["never"]
  max_gen_toks: 8
  temperature: 0
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (root / "tiny_choice.yaml").write_text(CHOICE_TASK.format(data=root / "questions.jsonl"))
    (root / "tiny_reply.yaml").write_text(REPLY_TASK.format(data=root / "questions.jsonl"))
    return root


@pytest.fixture(scope="module")
def exported(eot_checkpoint, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf")
    load_script("scripts/convert_lit_checkpoint.py").main(checkpoint_dir=eot_checkpoint, output_dir=directory)
    return directory


@pytest.fixture(scope="module")
def server(eot_checkpoint):
    process, url = start_server(eot_checkpoint)
    yield url
    process.terminate()
    process.wait(timeout=60)


def evaluate(model: str, model_args: dict, task: str, tasks: Path, **options) -> list[dict]:
    """lm-eval's samples for `task`, each with its responses, in document order."""
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], log_samples=True,
                                      task_manager=TaskManager(include_path=str(tasks)), **options)
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_loglikelihoods_through_the_server_equal_lm_evals_own_on_the_export(server, exported, tasks):
    # both read the export's tokenizer, and put BOS first as the model was trained (lm-eval's API models do not by
    # default, its hf model does for a tokenizer that adds one)
    served = evaluate("local-completions", {"base_url": f"{server}/completions", "model": "eot", "num_concurrent": 1,
                                            "tokenizer_backend": "huggingface", "tokenizer": str(exported),
                                            "add_bos_token": True}, "tiny_choice", tasks)
    local = evaluate("hf", {"pretrained": str(exported), "dtype": "float32", "device": "cpu", "add_bos_token": True},
                     "tiny_choice", tasks)
    assert len(served) == len(local) == len(QUESTIONS)
    for ours, theirs in zip(served, local):
        assert len(ours["resps"]) == len(theirs["resps"]) == len(ours["doc"]["choices"])
        for (mine,), (reference,) in zip(ours["resps"], theirs["resps"]):
            assert mine[0] == pytest.approx(float(reference[0]), abs=1e-4)
            assert mine[1] == reference[1]  # whether the continuation is the greedy one


def test_generation_through_the_chat_endpoint_equals_our_replies(server, eot_checkpoint, tasks):
    samples = evaluate("local-chat-completions", {"base_url": f"{server}/chat/completions", "model": "eot",
                                                  "num_concurrent": 1}, "tiny_reply", tasks, apply_chat_template=True)
    model, tokenizer = load_model(eot_checkpoint).eval(), Tokenizer.from_dir(eot_checkpoint)
    for sample, question in zip(samples, QUESTIONS):
        tokens = generate(model, encode_prompt(tokenizer, [question["question"]]), 8,
                          stop_ids=resolve_stop_ids(tokenizer)).tokens
        assert sample["resps"][0][0] == tokenizer.decode(tokens)


def test_in_process_evaluation_equals_the_servers(server, exported, eot_checkpoint, tasks, tmp_path):
    """scripts/evaluate.py runs the same tasks on our model in process: the same log-likelihoods as through
    the server (plain text after BOS), and with the chat format the same replies as the chat endpoint."""
    evaluate_script = load_script("scripts/evaluate.py").main
    from lit_llama.harness import HarnessModel
    from lit_llama.inference import ModelSource

    model, tokenizer = ModelSource(checkpoint_dir=eot_checkpoint).load()
    local = evaluate(HarnessModel(model, tokenizer, batch_size=2), None, "tiny_choice", tasks)
    served = evaluate("local-completions", {"base_url": f"{server}/completions", "model": "eot", "num_concurrent": 1,
                                            "tokenizer_backend": "huggingface", "tokenizer": str(exported),
                                            "add_bos_token": True}, "tiny_choice", tasks)
    for ours, theirs in zip(local, served):
        for (mine,), (reference,) in zip(ours["resps"], theirs["resps"]):
            assert mine[0] == pytest.approx(reference[0], abs=1e-4) and mine[1] == reference[1]
    results = evaluate_script(tasks=["tiny_choice", "tiny_reply"], out_dir=tmp_path / "eval", include_path=tasks,
                              source=ModelSource(checkpoint_dir=eot_checkpoint), batch_size=2)
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(written["results"]) == {"tiny_choice", "tiny_reply"} == set(results["results"])
    replies = evaluate(HarnessModel(model, tokenizer), None, "tiny_reply", tasks, apply_chat_template=True)
    for sample, question in zip(replies, QUESTIONS):
        tokens = generate(model, encode_prompt(tokenizer, [question["question"]]), 8,
                          stop_ids=resolve_stop_ids(tokenizer)).tokens
        assert sample["resps"][0][0] == tokenizer.decode(tokens)
