"""Run lm-evaluation-harness tasks on a fine-tune directly, with no conversion: multiple-choice tasks
score each choice's log-likelihood in batches, generation tasks decode on the continuous batch until
the end-of-turn token. lm-eval's results JSON goes to `--out_dir`.

    python scripts/evaluate.py --lora_path out/lora --tasks '[hellaswag, arc_easy]' --out_dir out/eval
    python scripts/evaluate.py --checkpoint_dir out/full --tasks '[my_task]' --include_path my_tasks/ --limit 50

Needs the eval extra: pip install -e '.[eval]'. See howto/evaluate.md; lm-eval downloads a task's
data from the Hugging Face hub unless the task reads local files.
"""

import sys
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.errors import BadValue, MissingPackage
from lit_llama.files import write_json
from lit_llama.inference import Dtype, ModelSource, place


def main(
    tasks: list[str],
    out_dir: Path,
    *,
    source: ModelSource = ModelSource(),
    include_path: Optional[Path] = None,
    num_fewshot: Optional[int] = None,
    limit: Optional[int] = None,
    apply_chat_template: bool = True,
    batch_size: int = 8,
    seed: int = 1234,
    dtype: Dtype = Dtype(),
) -> dict:
    """Evaluate the model on lm-eval tasks and write results.json into out_dir.

    Args:
        tasks: lm-eval task or group names, e.g. '[arc_easy, hellaswag]'
        out_dir: where results.json goes (lm-eval's results: each task's metrics, its config and versions)
        include_path: a dir of task YAML files of your own, beside lm-eval's
        num_fewshot: examples before each question (default: each task's own)
        limit: evaluate the first this many documents of each task only
        apply_chat_template: give each task's prompt as a user turn in the training format (as the model
            was fine-tuned to read it); false scores plain text after BOS, as for a base model
        batch_size: sequences scored, or replies decoded, side by side
        seed: the seed lm-eval shuffles few-shot examples with
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from lit_llama.harness import HarnessModel
    except ImportError as e:
        raise MissingPackage(f"{e.name} is missing: evaluation needs pip install -e '.[eval]'") from None
    if batch_size < 1:
        raise BadValue("--batch_size must be at least 1")
    model, tokenizer = source.load()
    if apply_chat_template and tokenizer.eot_id is None:
        raise BadValue("the tokenizer has no end-of-turn token (a base checkpoint?): add --apply_chat_template false")
    model = place(model, dtype.precision)
    name = Path(source.path).resolve().name
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    results = lm_eval.simple_evaluate(model=HarnessModel(model, tokenizer, batch_size, name), tasks=tasks,
                                      num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                      apply_chat_template=apply_chat_template, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    results = {key: value for key, value in results.items() if key != "samples"}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json(results, Path(out_dir) / "results.json")
    print(lm_eval.utils.make_table(results))
    print(f"wrote {Path(out_dir) / 'results.json'}")
    return results


if __name__ == "__main__":
    run(main)
