"""Where the tests find the project: the checkout, its quickstart config and the `residual` command of the Python
that runs the tests. Importable from every test module, as pytest puts tests/ (the root conftest's folder) on
sys.path."""

import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
RESIDUAL = str(Path(sys.executable).parent / "residual")
