"""Rewrite config files whose keys moved to the section that owns them (trainer.config.RENAMED_KEYS), in place,
keeping every comment: ``python tools/migrate_config.py FILE [FILE ...]``; prints each key it moved.

A nested key (``train:`` then ``  eval_every: 5``) moves to its new section, which is made at the end of the file
when the file has none; a dotted name anywhere else (a sweep's overrides, a comment) is renamed where it stands."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import RENAMED_KEYS  # noqa: E402

SECTION = re.compile(r"^(\w+):\s*(#.*)?$")
ENTRY = re.compile(r"^  (\w+):(.*)$")


def migrate(text: str) -> tuple[str, list[str]]:
    for old, new in RENAMED_KEYS.items():
        text = re.sub(rf"\b{re.escape(old)}\b", new, text)
    lines, moved, kept, section = text.splitlines(), {}, [], None
    for line in lines:
        if match := SECTION.match(line):
            section = match.group(1)
        elif (match := ENTRY.match(line)) and f"{section}.{match.group(1)}" in RENAMED_KEYS:
            new_section, new_key = RENAMED_KEYS[f"{section}.{match.group(1)}"].split(".")
            moved.setdefault(new_section, []).append(f"  {new_key}:{match.group(2)}")
            continue
        kept.append(line)
    for new_section, entries in moved.items():
        starts = [i for i, line in enumerate(kept) if SECTION.match(line) and line.startswith(f"{new_section}:")]
        if not starts:
            kept += [f"{new_section}:", *entries]
            continue
        end = starts[0] + 1
        while end < len(kept) and (kept[end].startswith(" ") or not kept[end].strip()):
            end += 1
        kept[end:end] = entries
    changes = [f"{section}: {entry.strip()}" for section, entries in moved.items() for entry in entries]
    return "\n".join(kept) + "\n", changes


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    for name in paths:
        path = Path(name)
        before = path.read_text()
        after, changes = migrate(before)
        if after != before:
            path.write_text(after)
            print(f"{path}: " + ("; ".join(changes) or "renamed dotted keys"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
