"""What every script's command line shares: flags from the typed signature, one-line errors."""

import os
import sys
from typing import Any, Callable

from jsonargparse import CLI


def run(fn: Callable[..., Any]) -> Any:
    """Expose `fn` as a command: each parameter a flag (`--help` shows its docstring), `--config file.yaml`
    reads many at once. A user error (a missing file, a bad value) ends in one line and exit code 2;
    set LIT_LLAMA_DEBUG=1 for the traceback."""
    try:
        return CLI(fn, as_positional=False)
    except (OSError, ValueError) as e:
        if os.environ.get("LIT_LLAMA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
