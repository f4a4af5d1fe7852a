"""What every script's command line shares: flags from the typed signature, one-line errors."""

import difflib
import inspect
import os
import re
import sys
from dataclasses import fields
from typing import Any, Callable, NoReturn, Optional, Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

from lit_llama import device_check
from lit_llama.errors import UsageError

DEBUG_ENV = "LIT_LLAMA_DEBUG"


class FlagGroup:
    """Base of a dataclass of settings that travel together and are typed as top-level flags: a parameter
    `layout: RunLayout = RunLayout()` gives `--devices`, `--strategy`, ... (not `--layout.devices`), each
    described once, in the group's docstring. Other dataclasses stay nested (`--lora.r`)."""


def flag_groups(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The parameters of `fn` typed as a `FlagGroup`, by name."""
    return {name: p for name, p in inspect.signature(fn).parameters.items()
            if isinstance(p.annotation, type) and issubclass(p.annotation, FlagGroup)}


def flags(**values: Any) -> list[str]:
    """A command line from keywords: `flags(size="30M", warm=True, train=dict(seed=1))` is
    `--size 30M --warm true --train.seed 1`."""
    words = []
    for name, value in values.items():
        if isinstance(value, dict):
            words += flags(**{f"{name}.{key}": nested for key, nested in value.items()})
        else:
            words += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return words


class Parser(ArgumentParser):
    """jsonargparse's parser, whose errors (unknown flag, bad value) end in one line naming the flag,
    instead of the usage and a multi-line report. With --debug, jsonargparse's own report is kept."""

    debug = False
    args: tuple[str, ...] = ()  # the command line as typed

    def parse_args(self, args: Optional[Sequence[str]] = None, *rest: Any, **kwargs: Any) -> Any:
        lists = {flag[:-1] for flag in self._option_string_actions if flag.endswith("+")}  # jsonargparse's appending form
        return super().parse_args(appended(list(sys.argv[1:] if args is None else args), lists), *rest, **kwargs)

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if self.debug or not self.exit_on_error:  # parsers used internally raise, and the caller handles it
            super().error(message, ex)
        print(f"error: {parse_error_line(message, self.args, list(self._option_string_actions))}", file=sys.stderr)
        self.exit(2)


def type_name(expected: str) -> str:
    """ "<class 'int'>" -> "int", "typing.Literal['drop', 'cut_turns']" -> "one of drop, cut_turns"."""
    if literal := re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", expected):
        return "one of " + ", ".join(v.strip().strip("'\"") for v in literal[1].split(","))
    name = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", expected)
    return {"NoneType": "null", "list": "a list such as [a,b]", "tuple": "a list such as [a,b]", "dict": "a mapping",
            "bool": "true or false"}.get(name, name)


def parse_error_line(message: str, args: Sequence[str] = (), flags: Sequence[str] = ()) -> str:
    """jsonargparse's report of a bad command line, as one line that starts with the flag at fault. `args`
    (the command line) names a missing --config file as typed; `flags` suggest the one an unknown flag meant."""
    lines = [line.strip(" -") for line in message.strip().splitlines() if line.strip(" -")]
    if key := re.match(r'Parser key "([^"]+)":\s*', message):
        flag, detail = f"--{key[1]}", message[key.end():]
        expected = re.findall(r"Expected a (.+?)(?:\. Got value: .*)?$", detail, re.M)
        given = re.search(r"(?:Got value|Given value): (.*)$", detail, re.M)
        if expected and given:
            return f"{flag}: expected {' or '.join(type_name(e) for e in expected)}, got {given[1]!r}"
        if file := re.search(r"File does not exist: '(.*)'", detail):
            typed = [p for p in config_files(args) if os.path.abspath(p) == os.path.abspath(file[1])]
            return f"{flag} {typed[0] if typed else file[1]} not found"
        detail = [line.strip(" -") for line in detail.splitlines()]  # nested reports repeat the key: once is enough
        return f"{flag}: {' '.join(line for line in detail if line and not line.startswith('Parser key'))}"
    if argument := re.match(r"argument (\S+): expected one argument", message):
        return f"{argument[1]} needs a value"
    if required := re.match(r"the following arguments are required: (.*)", message):
        names = [f"--{name.strip()}" for name in required[1].split(",")]
        return f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} required (--help lists the flags)"
    if required := re.match(r'Key "([^"]+)" is required', message):
        return f"--{required[1]} is required (--help lists the flags)"
    if option := re.match(r"Option '([^']+)' is not accepted", message):
        return f"{option[1]!r} in the --config file is not a flag of this script (--help lists them)"
    if unknown := re.match(r"unrecognized arguments: (.*)", message):
        typed = [arg.split("=")[0][2:] for arg in unknown[1].split() if arg.startswith("--")]
        names = [flag[2:] for flag in flags if flag.startswith("--")]
        guess = difflib.get_close_matches(typed[0], names, n=1, cutoff=0.7) if typed else []
        hint = f"did you mean --{guess[0]}? " if guess else ""
        return f"{message.strip()} ({hint}--help lists the flags)"
    return " ".join(lines)


def error_line(error: UsageError) -> str:
    """The one line a user error ends in: its message, or, for one made like an OS error (errno, cause,
    file) with no message of ours, the file and its cause."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.filename}: {error.strerror}"
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def config_files(args: Sequence[str]) -> list[str]:
    """The paths given to --config (as `--config path` or `--config=path`)."""
    paths = [value for flag, value in zip(args, args[1:]) if flag == "--config"]
    return paths + [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]


def build_parser(fn: Callable[..., Any]) -> Parser:
    """Each parameter of `fn` a flag, described by its docstring, then --config and --debug."""
    # no abbreviations: "--checkpoint" is an unknown flag, not a guess at --checkpoint_dir
    parser = Parser(description=(inspect.getdoc(fn) or "").split("\n\n")[0].strip() or None, allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="Path to a configuration file.")
    parser.add_argument("--debug", action="store_true",
                        help=f"on an error, show the whole traceback instead of one line (as {DEBUG_ENV}=1 does)")
    groups = flag_groups(fn)
    parser.add_function_arguments(fn, as_group=False, as_positional=False, fail_untyped=True, sub_configs=True,
                                  skip=set(groups))
    for param in groups.values():
        parser.add_class_arguments(param.annotation, nested_key=None, fail_untyped=True, sub_configs=True)
        if param.default is not inspect.Parameter.empty:  # this script's defaults for the group
            parser.set_defaults({f.name: getattr(param.default, f.name) for f in fields(param.default)})
    return parser


def appended(args: list[str], lists: set[str]) -> list[str]:
    """A list flag may be given once per item: `--lora a=x --lora b=y` is jsonargparse's `--lora+ a=x --lora+ b=y`.
    A value in brackets is the whole list, as before: `--lora [a=x,b=y]`."""
    out = []
    for i, arg in enumerate(args):
        flag, sep, value = arg.partition("=")
        given = value if sep else (args[i + 1] if i + 1 < len(args) else "")
        if flag in lists and not given.startswith("["):
            arg = f"{flag}+{sep}{value}"
        out.append(arg)
    return out


def grouped(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The parsed top-level flags of each `FlagGroup` parameter of `fn`, packed into its dataclass."""
    for name, param in flag_groups(fn).items():
        group = param.annotation
        kwargs[name] = group(**{f.name: kwargs.pop(f.name) for f in fields(group) if f.init})
    return kwargs


def run(fn: Callable[..., Any], args: Optional[list[str]] = None) -> Any:
    """Expose `fn` as a command: each parameter a flag (`--help` shows its docstring), `--config file.yaml`
    reads many at once. A user error (a bad flag, or a `UsageError` such as a missing file or a bad value)
    ends in one line on stderr and exit code 2; Ctrl-C ends with exit code 130. Any other exception is a
    bug, here or in a library, and ends with its traceback (exit code 1). `--debug` (or LIT_LLAMA_DEBUG=1)
    shows the traceback of a user error too."""
    args = sys.argv[1:] if args is None else list(args)
    parser = build_parser(fn)
    parser.debug = "--debug" in args or bool(os.environ.get(DEBUG_ENV))
    parser.args = tuple(args)
    try:
        config = parser.parse_args(args)
        debug = config.pop("debug")  # popped whether or not it is on: it is no argument of `fn`
        parser.debug = parser.debug or debug
        config.pop("config", None)
        kwargs = grouped(fn, dict(**parser.instantiate(config)))
        if os.environ.get(device_check.ENV):  # tests: the command on a simulated accelerator
            with device_check.DeviceCheck():
                return fn(**kwargs)
        return fn(**kwargs)
    except UsageError as e:
        if parser.debug:
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if parser.debug:
            raise
        print("stopped (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
