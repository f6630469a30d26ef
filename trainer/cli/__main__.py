"""``python -m trainer.cli``: the `residual` command."""

import sys

from trainer.cli import main

sys.exit(main())
