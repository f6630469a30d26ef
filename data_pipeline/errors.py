"""The one exception type for mistakes a user can make (a bad config value, a missing folder, a bad file).

It lives at the bottom of the import graph (the CLI -> cluster -> trainer -> data_pipeline; tests/test_layering.py)
and imports nothing of the project, so that every package raises the same type; the entry points (``trainer.entry``,
the CLI) print its message without a traceback and exit with status 2 (trainer.user_errors).
"""

from pathlib import Path


class UserError(Exception):
    pass


def read_text(path: str | Path, what: str = "file") -> str:
    """A text file the project reads (a config, a sweep, an index, a list of names) as UTF-8, or one UserError that
    names it and its fault: missing, unreadable, a folder, or not UTF-8 text."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{what} {str(path)!r}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
            f"save it as UTF-8"
        ) from None
    except FileNotFoundError:
        raise UserError(f"{what} {str(path)!r} does not exist") from None
    except OSError as error:
        raise UserError(f"{what} {str(path)!r} cannot be read ({error.strerror})") from None


def outside_the_classes(classes: int, source: object) -> str:
    """How every data set says a label is not one of its classes (it would fail the first step with "Target 12 is
    out of bounds"): "outside the 10 classes (0-9) of SOURCE"."""
    return f"outside the {classes} classes (0-{classes - 1}) of {source}"


def from_worker_traceback(text: str) -> UserError | None:
    """The UserError a loader's worker process raised, from the text its pool hands back instead of the exception
    (DataLoader and DALI both carry the worker's formatted traceback, whose last line is "module.Class: message")."""
    name, _, message = text.rstrip().rpartition("\n")[2].partition(": ")
    return UserError(message) if name in (f"{__name__}.UserError", "data_pipeline.damaged.CorruptImage") else None


def require(condition: bool, key: str, value: object, why: str) -> None:
    """Raise a ``UserError`` naming the config key and its value unless ``condition`` holds."""
    if not condition:
        raise UserError(f"{key}={value!r}: {why}")


def require_one_of(key: str, value: object, choices: tuple[object, ...]) -> None:
    require(value in choices, key, value, f"must be one of {', '.join(map(str, choices))}")
