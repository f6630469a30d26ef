"""The docs name tests as the proof of what they promise (docs/faults.md's matrix): each named test exists."""

import re

from checkout import ROOT

NAMED_TEST = re.compile(r"(tests/[\w/]+\.py)::(test_\w+)")


def test_every_test_the_docs_name_exists():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {(page.name, *match.groups()) for page in pages for match in NAMED_TEST.finditer(page.read_text())}
    assert len(named) > 40
    missing = [
        f"{page}: {path}::{test}"
        for page, path, test in sorted(named)
        if not (ROOT / path).is_file() or not re.search(rf"^def {test}\(", (ROOT / path).read_text(), re.M)
    ]
    assert not missing, missing


def command_names() -> list[str]:
    """Every command as typed: "train", "data synth", "bench gpu", ..."""
    from trainer.cli import build_parser, command_usages

    return [
        re.match(r"residual ((?:[a-z-]+ ?)+?) (?:\[|[a-z]|\(|$)", usage + " ").group(1)
        for usage in command_usages(build_parser())
    ]


def test_every_command_and_config_section_is_documented():
    """The README or a page under docs/ names every `residual` command and every config section, so that the
    docs cannot fall behind the command line and the config."""
    from dataclasses import fields

    from trainer.config import Config

    text = "\n".join(page.read_text() for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    commands = command_names()
    assert len(commands) > 20 and "data get" in commands and "bench imagenet-size" in commands
    assert [name for name in commands if f"residual {name}" not in text] == []
    sections = [field.name for field in fields(Config)]
    assert [name for name in sections if not re.search(rf"\b{name}\.[a-z_]+", text)] == []


def test_residual_help_lists_every_command_as_its_parser_has_it(capsys):
    import pytest

    from trainer.cli import build_parser, main

    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    for name in command_names():
        with pytest.raises(SystemExit):
            main([*name.split(), "--help"])
        usage = " ".join(capsys.readouterr().out.split("\n\n")[0].split())[len("usage: ") :]
        assert f"  {usage}\n" in shown, name
    assert len(build_parser().epilog.splitlines()) == len(command_names()) + 1


def test_every_cell_of_the_fault_matrix_names_its_test():
    rows = [line for line in (ROOT / "docs" / "faults.md").read_text().splitlines() if line.startswith("| ")]
    cells = [row for row in rows if not row.startswith(("| file |", "| resource |", "| phase |", "| ---"))]
    assert len(cells) > 30
    assert [row[:80] for row in cells if not NAMED_TEST.search(row)] == []
