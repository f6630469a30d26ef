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
