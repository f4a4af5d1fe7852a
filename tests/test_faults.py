"""A fine-tune SIGKILLed anywhere, in the middle of a checkpoint write above all: the latest complete
checkpoint always loads, and `--resume true` ends with the weights of a run that was never killed.

Runs go through tests/fault_runner.py: forks of one process that imported torch and lightning once,
each running `python finetune/lora.py ...` as that command line would (a fresh Python costs seconds
per run, a fork milliseconds). The reference also runs once as a plain `python finetune/lora.py`,
so what the forks do is checked against the real command.

The same kills hit the sharded training state of fsdp (one process: the same writer as on many). By
default each kill point of both writers runs once, plus two kills at random times. The soak, a long
loop of random kills, is opt-in (it prints the seed and a tally of where the kills landed):

    python -m pytest -m soak tests/test_faults.py          # 30 random kills
    python -m pytest tests/test_faults.py --soak 200       # 200; add --fault-seed S to replay a loop
"""

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import lightning as L
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import REPO
from fault_runner import PHASES, Runner
from lit_llama.checkpoint import HPARAMS_FILE, load_finetuned, load_state_dict
from lit_llama.outdir import RESUME_DIR, OutDir
from lit_llama.sharded import REST, latest_state

STEPS = 4
FLAGS = ["--train.learning_rate", "1e-2", "--train.max_iters", str(STEPS), "--train.warmup_iters", "1",
         "--train.global_batch_size", "2", "--train.micro_batch_size", "2", "--train.save_interval", "1",
         "--train.eval_interval", "2", "--train.eval_iters", "1"]  # a checkpoint every step, a validation mid-way
WEIGHTS, STATE = "lit_model_lora.pth", "training_state.pth"
CI_SEED = 7


@dataclass
class Reference:
    """The uninterrupted run: its final weights, what each step's checkpoint holds, and how long it takes."""

    final: dict
    weights: dict = field(default_factory=dict)  # step -> trained weights
    state_model: dict = field(default_factory=dict)  # step -> the model part of training_state.pth
    seconds: float = 0.0


class Runs:
    """Fine-tunes of one base model and data set, run through the fault runner, each with its own log."""

    def __init__(self, runner: Runner, tiny_checkpoint: Path, lima_data: Path, logs: Path, layout: tuple = ()) -> None:
        self.runner, self.logs, self.count = runner, logs, 0
        self.base = ["finetune/lora.py", "--data_dir", lima_data, "--checkpoint_dir", tiny_checkpoint, *layout]
        logs.mkdir(parents=True, exist_ok=True)

    def argv(self, out_dir: Path, resume: bool = False) -> list:
        return [*self.base, "--out_dir", out_dir, *FLAGS, *(["--resume", "true"] if resume else [])]

    def run(self, out_dir: Path, resume: bool = False, **how) -> tuple[int, str]:
        self.count += 1
        return self.runner.run(self.argv(out_dir, resume), self.logs / f"{self.count}.log", **how)


@pytest.fixture(scope="module")
def runner():
    runner = Runner()  # starts importing now, while the fixtures below still build
    yield runner
    runner.close()


def make_reference(runner: Runner, tiny_checkpoint: Path, lima_data: Path, root: Path, layout: tuple = ()) -> Reference:
    runs = Runs(runner, tiny_checkpoint, lima_data, root / "logs", layout)
    # one thread, as the forks run: summation order, and so the last bits of the weights, follow the thread count
    plain = subprocess.run([sys.executable, *map(str, runs.argv(root / "plain"))], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})  # while the runner starts
    assert plain.returncode == 0, plain.stdout
    start = time.perf_counter()
    returncode, output = runs.run(root / "forked", snapshot=root / "steps")
    seconds = time.perf_counter() - start
    assert returncode == 0, output
    ref = Reference(final=load_state_dict(root / "plain" / WEIGHTS), seconds=seconds)
    assert_same(load_state_dict(root / "forked" / WEIGHTS), ref.final, "a forked run ends like `python finetune/lora.py`")
    for step in range(1, STEPS + 1):
        ref.weights[step] = load_state_dict(root / "steps" / f"{step}.{WEIGHTS}")
        state = root / "steps" / f"{step}.{STATE}"
        ref.state_model[step] = (torch.load(state, weights_only=True) if state.exists()
                                 else whole_sharded_state(root / "steps" / f"{step}.{RESUME_DIR}"))["model"]
    assert_same(ref.weights[STEPS], ref.final, "the last checkpoint holds the final weights")
    return ref


@pytest.fixture(scope="module")
def reference(runner, tiny_checkpoint, lima_data, tmp_path_factory) -> Reference:
    return make_reference(runner, tiny_checkpoint, lima_data, tmp_path_factory.mktemp("reference"))


def whole_sharded_state(checkpoint: Path) -> dict:
    """A sharded training state (sharded.py) read whole: the model and optimizer parts, and the rest."""
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(checkpoint, Path(tmp) / "state.pth")
        state = torch.load(Path(tmp) / "state.pth", weights_only=True)
    return {**state, **torch.load(checkpoint / REST, weights_only=True)}


def training_state(out_dir: Path) -> Optional[dict]:
    """The training state `--resume` reads, whole, whichever writer wrote it (None: none yet)."""
    if (out_dir / STATE).exists():
        return torch.load(out_dir / STATE, weights_only=True)  # a half-written one would raise here
    checkpoint = latest_state(out_dir / RESUME_DIR)
    return None if checkpoint is None else whole_sharded_state(checkpoint)


@pytest.fixture
def runs(runner, tiny_checkpoint, lima_data, tmp_path) -> Runs:
    return Runs(runner, tiny_checkpoint, lima_data, tmp_path / "logs")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def assert_same(a: dict, b: dict, why: str) -> None:
    assert a.keys() == b.keys(), why
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=lambda m: f"{why}: {name}: {m}")


def check_after_kill(out_dir: Path, ref: Reference, why: str) -> int:
    """What a kill left: every checkpoint file under its real name loads and holds exactly what the
    uninterrupted run had at one of its steps, the weights file is the training state's checkpoint or
    the next one, and the whole out dir loads for inference. Returns the training state's step (0: none)."""
    step = 0
    state = training_state(out_dir)
    if state is not None:
        step = state["step"]
        assert 1 <= step <= STEPS and {"optimizer", "rng"} <= state.keys(), why
        assert_same(state["model"], ref.state_model[step], f"{why}: {STATE} of step {step}")
    if (out_dir / WEIGHTS).exists():
        weights = load_state_dict(out_dir / WEIGHTS)
        matches = [s for s, w in ref.weights.items() if same(weights, w)]
        assert matches, f"{why}: {WEIGHTS} holds the weights of no step of the uninterrupted run"
        assert matches[-1] in (step, step + 1), f"{why}: {WEIGHTS} is of step {matches[-1]}, {STATE} of step {step}"
        load_finetuned(out_dir)  # what generate/lora.py and merge_lora.py do
    else:
        assert step <= 1, f"{why}: {STATE} of step {step} but no {WEIGHTS}"
    return step


def resume_to_the_end(runs: Runs, out_dir: Path, step: int, ref: Reference, why: str) -> None:
    """`--resume true` after a kill. With no training state yet it refuses in one line that says what to
    do, and the run started again from scratch ends the same."""
    returncode, output = runs.run(out_dir, resume=True)
    if step == 0:
        assert returncode == 2, f"{why}\n{output}"
        last = output.strip().splitlines()[-1]
        assert last.startswith(f"error: --resume: {out_dir / STATE} not found") and "run again without --resume" in last, \
            f"{why}\n{output}"
        returncode, output = runs.run(out_dir)
    elif step == STEPS:  # killed after the last checkpoint
        assert "the run is finished, nothing left to train" in output, f"{why}\n{output}"
    else:
        assert f"resuming from step {step} of" in output, f"{why}\n{output}"
    assert returncode == 0, f"{why}\n{output}"
    check_finished(out_dir, ref, why)


def check_finished(out_dir: Path, ref: Reference, why: str) -> None:
    assert_same(load_state_dict(out_dir / WEIGHTS), ref.final, f"{why}: final weights")
    assert training_state(out_dir)["step"] == STEPS, why
    steps = [line.split(",")[0] for line in (out_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [str(i) for i in range(1, STEPS + 1)], f"{why}: metrics.csv has steps {steps}"
    load_finetuned(out_dir)


def fault(file: str, phase: str, at: int) -> dict:
    return {"file": file, "phase": phase, "at": at}


@pytest.mark.parametrize("file", [STATE, WEIGHTS])
@pytest.mark.parametrize("phase", PHASES)
def test_a_kill_at_any_stage_of_a_checkpoint_write_loses_nothing(runs, reference, tmp_path, file, phase):
    """Killed while writing the second checkpoint: half of a file written, the file complete but not
    renamed, renamed (for the weights: before the training state is)."""
    out_dir, why = tmp_path / "out", f"killed at {file} {phase} of the 2nd checkpoint"
    returncode, output = runs.run(out_dir, fault=fault(file, phase, 2))
    assert returncode == -9, f"{why}: the kill point was never reached\n{output}"
    step = check_after_kill(out_dir, reference, why)
    assert step == (2 if (file, phase) == (STATE, "renamed") else 1), why  # the state counts once renamed
    resume_to_the_end(runs, out_dir, step, reference, why)


@pytest.mark.parametrize("file, phase", [(STATE, "partial"), (WEIGHTS, "renamed")],
                         ids=["before-any-checkpoint-file", "weights-but-no-training-state"])
def test_a_kill_before_the_first_checkpoint_is_complete(runs, reference, tmp_path, file, phase):
    """Nothing to resume: --resume says so and what to do, and the run started again ends the same."""
    out_dir, why = tmp_path / "out", f"killed at {file} {phase} of the 1st checkpoint"
    returncode, output = runs.run(out_dir, fault=fault(file, phase, 1))
    assert returncode == -9, f"{why}: the kill point was never reached\n{output}"
    assert check_after_kill(out_dir, reference, why) == 0
    resume_to_the_end(runs, out_dir, 0, reference, why)


def test_kills_of_resumed_runs_in_a_chain(runs, reference, tmp_path):
    """Killed, resumed and killed again, twice, then resumed to the end: each resume picks up the latest
    complete checkpoint, whichever run wrote it."""
    out_dir, why, step = tmp_path / "out", "chain", 0
    for file, phase, at, expected in [(WEIGHTS, "partial", 2, 1),  # fresh run: in the checkpoint of step 2
                                      (STATE, "complete", 2, 2),  # resumed from 1: in the checkpoint of step 3
                                      (WEIGHTS, "renamed", 1, 2)]:  # resumed from 2: between the files of step 3
        why += f", killed at {file} {phase} of checkpoint {at}"
        returncode, output = runs.run(out_dir, resume=step > 0, fault=fault(file, phase, at))
        assert returncode == -9, f"{why}: the kill point was never reached\n{output}"
        step = check_after_kill(out_dir, reference, why)
        assert step == expected, why
    resume_to_the_end(runs, out_dir, step, reference, why)


def test_a_kill_after_the_final_checkpoint_resumes_to_a_finished_run(runs, reference, tmp_path):
    """Killed after the last checkpoint (while the loss plot is drawn, say): --resume has nothing left to
    train and must leave the finished out dir as it is."""
    out_dir, why = tmp_path / "out", "killed once the final checkpoint was written"
    returncode, output = runs.run(out_dir, fault=fault(STATE, "renamed", STEPS))
    assert returncode == -9, f"{why}: the kill point was never reached\n{output}"
    assert check_after_kill(out_dir, reference, why) == STEPS
    resume_to_the_end(runs, out_dir, STEPS, reference, why)


# The sharded writer (fsdp, here on one process): DCP's file per rank and its .metadata, the rest (step,
# random states) beside them, then the `latest` pointer. Files DCP writes in place have no rename stage.
SHARDED = ("--strategy", "fsdp", "--devices", "1")
SHARDED_STAGES = [("__0_0.distcp", "partial"), ("__0_0.distcp", "complete"), (".metadata", "partial"),
                  (".metadata", "complete"), *((file, phase) for file in ("rest.pth", "latest") for phase in PHASES)]


@pytest.fixture(scope="module")
def sharded_reference(runner, tiny_checkpoint, lima_data, tmp_path_factory) -> Reference:
    return make_reference(runner, tiny_checkpoint, lima_data, tmp_path_factory.mktemp("sharded"), SHARDED)


@pytest.mark.parametrize("file, phase", SHARDED_STAGES)
def test_a_kill_at_any_stage_of_a_sharded_checkpoint_write_loses_nothing(runner, tiny_checkpoint, lima_data,
                                                                         sharded_reference, tmp_path, file, phase):
    """The same for the sharded training state: until `latest` names the new checkpoint, the previous
    one is the state; a partial one is never read, and the next save replaces it."""
    runs = Runs(runner, tiny_checkpoint, lima_data, tmp_path / "logs", SHARDED)
    out_dir, why = tmp_path / "out", f"killed at {file} {phase} of the 2nd sharded checkpoint"
    returncode, output = runs.run(out_dir, fault=fault(file, phase, 2))
    assert returncode == -9, f"{why}: the kill point was never reached\n{output}"
    step = check_after_kill(out_dir, sharded_reference, why)
    assert step == (2 if (file, phase) == ("latest", "renamed") else 1), why
    resume_to_the_end(runs, out_dir, step, sharded_reference, why)
    # nothing left of the partial write: the last checkpoint and the pointer to it
    assert sorted(p.name for p in (out_dir / RESUME_DIR).iterdir()) == ["latest", f"step-{STEPS:06d}"], why


@pytest.fixture(scope="module")
def checkpointed_at_step_2(runner, reference, tiny_checkpoint, lima_data, tmp_path_factory) -> Path:
    """An out dir whose run was killed just after its 2nd checkpoint."""
    root = tmp_path_factory.mktemp("killed")
    runs = Runs(runner, tiny_checkpoint, lima_data, root / "logs")
    returncode, output = runs.run(root / "out", fault=fault(STATE, "renamed", 2))
    assert returncode == -9, output
    return root / "out"


@pytest.mark.parametrize("file", [HPARAMS_FILE, "model_config.json", "tokenizer.model", "special_tokens.json",
                                  "metrics.csv"])
def test_a_resume_killed_while_it_rewrites_the_out_dir_files_loses_nothing(runs, reference, checkpointed_at_step_2,
                                                                           tmp_path, file):
    """A resumed run writes the files that describe the out dir again before it trains: a kill in the
    middle of one must leave the out dir loadable (the checkpoint of step 2 is still there)."""
    out_dir, why = tmp_path / "out", f"resume killed half-way through rewriting {file}"
    shutil.copytree(checkpointed_at_step_2, out_dir)
    returncode, output = runs.run(out_dir, resume=True, fault=fault(file, "partial", 1))
    assert returncode == -9, f"{why}: the kill point was never reached\n{output}"
    assert check_after_kill(out_dir, reference, why) == 2
    resume_to_the_end(runs, out_dir, 2, reference, why)


@dataclass
class Tally:
    kills: int = 0
    injected: int = 0  # of the kills, those at a random stage of a random file write, not at a random time
    in_write: int = 0  # kills that left a temporary file of their run behind: inside a write, before its rename
    runs: int = 0
    missed: int = 0  # runs that ended before their kill came
    by_step: dict = field(default_factory=dict)  # training state's step after the kill -> kills

    def __str__(self) -> str:
        steps = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_step.items()))
        return (f"{self.kills} SIGKILLs ({self.kills - self.injected} at random times, {self.injected} at random write "
                f"stages; {self.in_write} inside a file write) over {self.runs} runs ({self.missed} ended before their "
                f"kill came); kills by the step of the training state they left (0: none yet): {steps}")


def random_kills(runs: Runs, out_root: Path, ref: Reference, kills: int, seed: int, tally: Tally,
                 injected_share: float = 0.0) -> None:
    """SIGKILL runs at uniformly random times from their start (loading, training steps, checkpoint
    writes, the end) or, for `injected_share` of the kills, at a random stage of a random checkpoint
    write. In chains of up to 3 kills: a fresh run killed, then what a user runs next (a resume, or a
    fresh run when nothing was saved yet) killed again, and so on; then the last one runs to the end and
    is compared. Every kill is followed by the checks of `check_after_kill`."""
    rng = random.Random(seed)
    chain = 0
    while tally.kills < kills:
        chain += 1
        out_dir, step, history, finished = out_root / f"chain{chain}", 0, [], False
        for _ in range(rng.randint(1, min(3, kills - tally.kills))):
            how: dict = {"kill_after": rng.uniform(0, ref.seconds)}
            if rng.random() < injected_share:
                how = {"fault": fault(rng.choice([STATE, WEIGHTS]), rng.choice(PHASES), rng.randint(1, STEPS))}
                history.append("at {file} {phase} of checkpoint {at}".format(**how["fault"]))
            else:
                history.append(f"at {how['kill_after']:.3f}s")
            why = f"seed {seed}, chain {chain}: killed {', '.join(history)} ({ref.seconds:.2f}s a run)"
            started = time.time()
            returncode, output = runs.run(out_dir, resume=step > 0, **how)
            tally.runs += 1
            if returncode != -9:
                assert returncode == 0, f"{why}\n{output}"
                tally.missed += 1
                finished = True
                break
            tally.kills += 1
            tally.injected += "fault" in how
            tally.in_write += any(tmp.stat().st_mtime >= started for tmp in out_dir.glob("*.tmp"))
            before, step = step, check_after_kill(out_dir, ref, why)
            assert step >= before, f"{why}: the training state went back from step {before} to {step}"
            tally.by_step[step] = tally.by_step.get(step, 0) + 1
        if finished:
            check_finished(out_dir, ref, why)
        else:
            resume_to_the_end(runs, out_dir, step, ref, why)
            tally.runs += 1 + (step == 0)


def test_random_kills(runs, reference, tmp_path, request):
    """Two kills at random times (seeded: the seed is in every message; --fault-seed S replays it)."""
    seed = request.config.getoption("--fault-seed") or CI_SEED
    tally = Tally()
    random_kills(runs, tmp_path, reference, kills=2, seed=seed, tally=tally)
    assert tally.kills == 2


@pytest.mark.soak
def test_soak_random_kills(runs, reference, tmp_path, request, capsys):
    """The long loop: 30 kills (--soak N: N), three in four at random times, the rest at random stages of
    random checkpoint writes; a new seed each time (printed, with the tally) unless --fault-seed S."""
    kills = request.config.getoption("--soak") or 30
    seed = request.config.getoption("--fault-seed") or random.randrange(2**31)
    tally, start, outcome = Tally(), time.perf_counter(), "failed after"
    try:
        random_kills(runs, tmp_path, reference, kills=kills, seed=seed, tally=tally, injected_share=0.25)
        outcome = "every checkpoint left loaded, every run ended on the reference weights:"
    finally:
        with capsys.disabled():
            print(f"\nsoak, seed {seed}: {outcome} {tally}; {time.perf_counter() - start:.0f}s")
    assert tally.kills == kills


def test_checkpoint_files_reach_the_disk_before_they_are_renamed(tmp_path, monkeypatch):
    """What a SIGKILL can't show (the page cache outlives the process) and a power cut would: each file of
    a checkpoint is flushed to disk before the rename makes it the checkpoint, and the directory after."""
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("rename", os.stat(src).st_ino, Path(dst).name)),
                                                         replace(src, dst))[1])
    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = torch.nn.Linear(4, 4)
    out = OutDir(tmp_path, "lora", trained={"weight"}, base_dtypes={})
    out.save(fabric, model, torch.optim.AdamW(model.parameters()), step=1, skipped_steps=0)
    directory = tmp_path.stat().st_ino
    renames = [(i, event) for i, event in enumerate(events) if event[0] == "rename"]
    assert [name for _, (_, _, name) in renames] == [WEIGHTS, STATE]  # the training state last
    for i, (_, inode, name) in renames:
        assert ("fsync", inode) in events[:i], f"{name} renamed before it was flushed to disk"
        assert events[i + 1] == ("fsync", directory), f"the rename to {name} not flushed to disk"
    assert torch.load(tmp_path / STATE, weights_only=True)["step"] == 1
