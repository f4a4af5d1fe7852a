"""Run scripts many times and kill them, fast: a server process imports torch and lightning once and
forks a child per run (starting Python with them takes seconds; a fork takes milliseconds).

A child runs a script the way `python finetune/lora.py --flag ...` does (as `__main__`, with that
argv, in the repo root) and writes its output to a log file. The server can SIGKILL it after a
delay (a kill from outside, at a random time); or the child SIGKILLs itself at a chosen point of a
file write (`install_fault`); or it keeps a copy of each checkpoint it writes (`install_snapshot`).

    python tests/fault_runner.py     # then one JSON request per line on stdin:
    {"argv": ["finetune/lora.py", ...], "log": PATH, "kill_after": SECONDS | null,
     "fault": {"file": NAME, "phase": PHASE, "at": N} | null, "snapshot": DIR | null}
    -> {"pid": PID}                   once forked
    -> {"pid": PID, "returncode": RC} when it ended (-9: killed)
"""

import json
import os
import queue
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]

# where a process can die while it writes a file of the out dir: "partial" cuts the file at half its
# bytes (as a kill in the middle of writing it leaves it), "complete" kills once it is written, and
# "renamed" once it has been renamed over the real name. A temporary file counts as the file it becomes.
PHASES = ("partial", "complete", "renamed")


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class WatchedFile:
    """A file open for writing that says when it is closed, that is when its write is over."""

    def __init__(self, f, path, on_close) -> None:
        self._f, self._path, self._on_close = f, path, on_close

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self) -> "WatchedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
            self._on_close(self._path)


def install_fault(file: str, phase: str, at: int) -> None:
    """SIGKILL this process the `at`-th time (from 1) it reaches `phase` of writing `file` (or a
    temporary file named after it): writes by torch.save, Fabric.save and open() (which Path.write_text,
    json and csv writes go through), renames by os.replace."""
    import builtins
    import io

    import torch
    from lightning.fabric import Fabric

    assert phase in PHASES, phase
    count, quiet = 0, False  # quiet: inside a save whose inner writes are not the file's own

    def reached() -> bool:
        nonlocal count
        count += 1
        return count == at

    def written(path) -> None:
        if phase != "renamed" and not quiet and Path(path).name.startswith(file) and reached():
            if phase == "partial":
                os.truncate(path, os.path.getsize(path) // 2)
            kill_self()

    torch_save, fabric_save, open_, os_replace = torch.save, Fabric.save, builtins.open, os.replace

    def save(obj, f, *args, **kwargs):
        nonlocal quiet
        outer, quiet = quiet, True
        try:
            torch_save(obj, f, *args, **kwargs)
        finally:
            quiet = outer
        if isinstance(f, (str, os.PathLike)):
            written(f)

    def fabric_save_(self, path, *args, **kwargs):
        nonlocal quiet
        quiet = True
        try:
            result = fabric_save(self, path, *args, **kwargs)
        finally:
            quiet = False
        written(path)
        return result

    def open_file(path, mode="r", *args, **kwargs):
        f = open_(path, mode, *args, **kwargs)
        if isinstance(path, (str, os.PathLike)) and ("w" in mode or "x" in mode) and Path(path).name.startswith(file):
            return WatchedFile(f, path, written)
        return f

    def replace(src, dst, *args, **kwargs):
        os_replace(src, dst, *args, **kwargs)
        if phase == "renamed" and Path(dst).name == file and reached():
            kill_self()

    torch.save, Fabric.save, builtins.open, io.open, os.replace = save, fabric_save_, open_file, open_file, replace


def install_snapshot(directory: Path) -> None:
    """After each checkpoint, keep a copy of its files as <step>.<file name> in `directory` (a sharded
    training state: its directory, as <step>.training_state)."""
    from lit_llama.outdir import OutDir
    from lit_llama.sharded import latest_state

    save = OutDir.save

    def save_and_copy(self, fabric, model, optimizer, step, *rest):
        save(self, fabric, model, optimizer, step, *rest)
        shutil.copyfile(self.weights, Path(directory) / f"{step}.{self.weights.name}")
        if self.state.exists():
            shutil.copyfile(self.state, Path(directory) / f"{step}.{self.state.name}")
        else:
            shutil.copytree(latest_state(self.state_dir), Path(directory) / f"{step}.{self.state_dir.name}")

    Path(directory).mkdir(parents=True, exist_ok=True)
    OutDir.save = save_and_copy


def child(request: dict) -> None:
    """In the forked process: run the script, never return."""
    import torch

    code = 1
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False, buffering=1)
        sys.stderr = open(2, "w", closefd=False, buffering=1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # one thread: runs share the machine with the test process and whatever else runs, and an OpenMP
        # pool spinning for cores that are busy elsewhere slows a run tenfold. The reference fixture runs
        # its plain command on one thread too: the last bits of a sum follow the thread count
        torch.set_num_threads(1)
        if request.get("fault"):
            install_fault(**request["fault"])
        if request.get("snapshot"):
            install_snapshot(request["snapshot"])
        sys.argv = list(request["argv"])
        runpy.run_path(str(REPO / sys.argv[0]), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    # what the finetune scripts import: paid once here, shared by every child
    import lightning  # noqa: F401
    import torch  # noqa: F401

    import lit_llama.cli  # noqa: F401
    import lit_llama.finetune  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in iter(sys.stdin.readline, ""):
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        print(json.dumps({"pid": pid}), flush=True)
        deadline = None if request.get("kill_after") is None else time.monotonic() + request["kill_after"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG if deadline is not None else 0)
            if done:
                break
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)  # still running (a zombie can't be mistaken: it isn't reaped yet)
                deadline = None
            else:
                time.sleep(0.001)
        print(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}), flush=True)


class Runner:
    """The test side: start the server, then `run` scripts through it, one at a time."""

    def __init__(self) -> None:
        # a session of its own: `close` ends the server and a child still running with it
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.ready = False
        self.answers: queue.Queue = queue.Queue()
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        for line in self.proc.stdout:
            self.answers.put(line)
        self.answers.put("")

    def _read(self, timeout: float) -> dict:
        try:
            line = self.answers.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise TimeoutError(f"no answer from the fault runner in {timeout} s") from None
        if not line:
            raise RuntimeError(f"the fault runner ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def wait_ready(self, timeout: float = 300) -> None:
        if not self.ready:
            assert self._read(timeout) == {"ready": True}
            self.ready = True

    def run(self, argv: list, log: Path, kill_after: Optional[float] = None, fault: Optional[dict] = None,
            snapshot: Optional[Path] = None, timeout: float = 300) -> tuple[int, str]:
        """Run `python *argv` in a fork; returns its exit code (-9: killed) and its output."""
        self.wait_ready()
        request = {"argv": [str(a) for a in argv], "log": str(log), "kill_after": kill_after, "fault": fault,
                   "snapshot": str(snapshot) if snapshot else None}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        self._read(timeout)
        returncode = self._read(timeout)["returncode"]
        return returncode, Path(log).read_text(errors="replace")

    def close(self) -> None:
        """Between runs the server holds nothing that needs a clean exit (which takes a second or two)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc.stdin.close()


if __name__ == "__main__":
    serve()
