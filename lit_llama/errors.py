"""The errors this project raises for what a user gave it: a flag, a path, a file's contents.

A command (lit_llama/cli.py) ends on one of them with its message in one line and exit code 2; any
other exception is a bug (here or in a library) and shows its traceback. Each kind is also the
built-in error callers expect, so `except ValueError` or `except FileNotFoundError` still catch it.
"""


class UsageError(Exception):
    """Something the user gave can't be used; the command ends with the message in one line and exit
    code 2. The message names the flag or file and says what to do."""


class BadValue(UsageError, ValueError):
    """A flag's value, or a file's contents, that can't be used."""


class MissingFile(UsageError, FileNotFoundError):
    """A file or dir the command needs that is not there: a path the user gave, a file it should hold,
    or a file that could not be downloaded."""


class BadPath(UsageError, OSError):
    """A path that exists but can't be used: not writable, no room, a file where a directory is wanted
    or a directory where a file is wanted."""


class MissingPackage(UsageError, ImportError):
    """An optional package that a flag needs is not installed."""


def file_error(error: OSError, name: str) -> UsageError:
    """`error`, raised opening or reading a file the user gave, as the user error that ends the command
    in the line "`name`: cause" (`name`: the file, or its flag and the file as typed)."""
    kind = MissingFile if isinstance(error, FileNotFoundError) else BadPath
    return kind(error.errno, error.strerror or str(error), name)
