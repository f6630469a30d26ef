"""The one exception type for mistakes a user can make (a bad config value, a missing folder, a bad file).

It lives at the bottom of the import graph (the CLI -> cluster -> trainer -> data_pipeline; tests/test_layering.py)
and imports nothing, so that every package raises the same type; the entry points (``trainer.run``, the CLI) print
its message without a traceback and exit with status 2.
"""


class UserError(Exception):
    pass


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
