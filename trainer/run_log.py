"""What a run records, on rank 0 only: TensorBoard scalars and ``metrics.jsonl`` in the run directory.

A resumed run continues the same curves: TensorBoard purges the events logged after the checkpoint it resumes
from (``purge_step``) and metrics.jsonl drops its records past it, so no point is duplicated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


class RunLog:
    def __init__(self, run_dir: Path, *, start_iteration: int, enabled: bool) -> None:
        self.enabled = enabled
        self.tensorboard_dir = run_dir / "tensorboard"
        self.metrics_path = run_dir / "metrics.jsonl"
        self.writer: SummaryWriter | None = None
        if not enabled:
            return
        self._truncate_metrics(after=start_iteration)
        # Events at the resumed iteration itself were logged before its checkpoint: keep them, purge later ones.
        purge = start_iteration + 1 if start_iteration > 0 else None
        self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=purge)

    def _truncate_metrics(self, *, after: int) -> None:
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [line for line in lines if line and json.loads(line)["iteration"] <= after]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def log(self, kind: str, iteration: int, values: dict[str, Any]) -> None:
        """One record: every numeric value becomes the scalar ``kind/name`` (``eval/PROTOCOL/name`` for an
        evaluation) at ``iteration``."""
        if not self.enabled:
            return
        prefix = f"{kind}/{values['protocol']}" if "protocol" in values else kind
        for name, value in values.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(f"{prefix}/{name}", value, iteration)
        with open(self.metrics_path, "a") as file:
            file.write(json.dumps({"kind": kind, "iteration": iteration, **values}) + "\n")

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
