"""The whole path on the embedded tiny model, through the same scripts a user runs:

    1. scripts/prepare_tiny.py   tokenizer + tiny base model pretrained on shipped text (knows EOS, not EOT)
    2. scripts/prepare_lima.py   shipped LIMA-format sample -> EOT-terminated train/val data
    3. finetune/lora.py          LoRA + the EOT rows
    4. generate/lora.py          a reply that ends when the model emits EOT

    python scripts/demo.py
"""

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def step(title: str, command: list[str], stderr: Optional[int] = None) -> str:
    """Run `command` (a script and its flags) as a user would, printed so it can be pasted; its stderr is
    returned (and passed through) when `stderr` is subprocess.PIPE."""
    script, *args = command
    print(f"\n== {title}\n$ {shlex.join(['python', os.path.relpath(REPO / script), *args])}", flush=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / script), *args], stderr=stderr, text=True)
    if result.stderr:
        print(result.stderr, end="", file=sys.stderr, flush=True)
    if result.returncode:  # the step said why on the line above
        print(f"error: {script} ended with exit code {result.returncode}; the demo stops here", file=sys.stderr)
        raise SystemExit(result.returncode)
    print(f"({time.perf_counter() - start:.0f}s)", flush=True)
    return result.stderr or ""


def main(work_dir: Path = Path("out/demo")) -> None:
    """Run the four steps of README's path, with its default flags, writing everything under `work_dir`.
    Ends with exit code 1 if the reply does not stop on the end-of-turn token.

    Args:
        work_dir: where the checkpoint, data and fine-tune go
    """
    from lit_llama.files import check_writable

    check_writable(work_dir, 0, "--work_dir")
    start = time.perf_counter()
    base, data, lora = work_dir / "checkpoints" / "tiny", work_dir / "data" / "lima", work_dir / "lora"
    step("1/4 build the tiny base model", ["scripts/prepare_tiny.py", "--out_dir", str(base)])
    step("2/4 prepare the LIMA-format sample with an end-of-turn token",
         ["scripts/prepare_lima.py", "--data_path", os.path.relpath(REPO / "data" / "lima_sample.jsonl"),
          "--checkpoint_dir", str(base), "--destination_path", str(data)])
    step("3/4 fine-tune with LoRA",
         ["finetune/lora.py", "--data_dir", str(data), "--checkpoint_dir", str(base), "--out_dir", str(lora)])
    report = step("4/4 generate until the end-of-turn token",
                  ["generate/lora.py", "--lora_path", str(lora), "--prompt", "How often should I water a cactus?",
                   "--temperature", "0"], stderr=subprocess.PIPE)
    if "stop reason: eot" not in report:
        print("error: the reply did not end on the end-of-turn token (see the stop reason above)", file=sys.stderr)
        raise SystemExit(1)
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s: the reply ended on the end-of-turn token")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from lit_llama.cli import run

    run(main)
