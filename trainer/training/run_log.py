"""What a run records, on rank 0 only: TensorBoard scalars and ``metrics.jsonl`` in the run directory.

TensorBoard, for the operators who watch it: ``train/`` (loss, running top-1/top-5, lr, gradient norm, fp16 loss
scale and skipped steps), ``speed/`` (global images/s, per-rank step time min/median/max and the slowest rank,
the share of the step spent waiting for data, peak memory per rank, model FLOP utilization on GPUs),
``eval/PROTOCOL/`` (top-1/top-5 and their errors); a custom-scalars layout that groups them as Training, Speed,
Evaluation and Health; the resolved config as text; the first augmented batch as an image; and, when the run
ends, its hyperparameters with the final metrics (the HParams tab compares the runs of a sweep).

A resumed run continues the same curves: TensorBoard purges the events logged after the checkpoint it resumes
from (``purge_step``) and metrics.jsonl drops its records past it, so no point is duplicated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_pipeline.errors import UserError
from data_pipeline.published import title

if TYPE_CHECKING:
    import torch
    from torch.utils.tensorboard import SummaryWriter

METRICS_FILE = "metrics.jsonl"

# The custom-scalars tab: what answers "is it learning, is it fast, is anything stuck" on one screen. Each chart
# plots the tags its regular expressions match.
LAYOUT = {
    "Training": {
        "loss": ["Multiline", ["train/loss"]],
        "running top-1 / top-5": ["Multiline", ["train/top1$", "train/top5$"]],
        "learning rate": ["Multiline", ["train/lr"]],
    },
    "Evaluation": {
        "top-1 / top-5 error": ["Multiline", [r"eval/.*/top1_error", r"eval/.*/top5_error"]],
        "top-1 / top-5": ["Multiline", [r"eval/.*/top1$", r"eval/.*/top5$"]],
        "top-1 per class (the confusion matrix: Images, eval/PROTOCOL/confusion)": ["Multiline", [r"eval/.*/class/"]],
    },
    "Speed": {
        "images/s (all ranks)": ["Multiline", ["speed/images_per_second"]],
        "step seconds per rank: min / median / max": ["Multiline", [r"speed/step_seconds_.*"]],
        "waiting for data (share of the step)": ["Multiline", ["speed/data_wait_fraction"]],
        "peak memory per rank (GB)": ["Multiline", [r"speed/peak_memory_gb/.*"]],
        "model FLOP utilization": ["Multiline", ["speed/mfu"]],
    },
    "Health": {
        "gradient norm": ["Multiline", ["train/grad_norm"]],
        "slowest rank": ["Multiline", ["speed/slowest_rank"]],
        "skipped steps (non-finite loss, fp16 overflow)": ["Multiline", [r"train/.*skipped_steps"]],
        "fp16 loss scale": ["Multiline", ["train/loss_scale"]],
    },
}


class RunLog:
    def __init__(self, run_dir: Path, *, start_iteration: int, enabled: bool) -> None:
        self.enabled, self.run_dir = enabled, run_dir
        self.tensorboard_dir = run_dir / "tensorboard"
        self.metrics_path = run_dir / METRICS_FILE
        self.writer: SummaryWriter | None = None
        self.evaluated: set[tuple[int, str]] = set()  # (iteration, protocol) of the evaluations logged
        if not enabled:
            return
        self._truncate_metrics(after=start_iteration)
        from torch.utils.tensorboard import SummaryWriter

        # Events at the resumed iteration itself were logged before its checkpoint (or, an evaluation, once after
        # it): keep them, purge later ones.
        purge = start_iteration + 1 if start_iteration > 0 else None
        self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=purge)
        self.writer.add_custom_scalars(LAYOUT)

    def _truncate_metrics(self, *, after: int) -> None:
        if not self.metrics_path.exists():
            return
        kept = [record for record in read_metrics(self.metrics_path) if record["iteration"] <= after]
        self.evaluated = {(record["iteration"], record["protocol"]) for record in kept if record["kind"] == "eval"}
        write_whole(self.metrics_path, "".join(json.dumps(record) + "\n" for record in kept))

    def log(self, kind: str, iteration: int, values: dict[str, Any]) -> None:
        """One record: every numeric value becomes the scalar ``kind/name`` (``eval/PROTOCOL/name`` for an
        evaluation) at ``iteration``."""
        if not self.enabled:
            return
        prefix = f"{kind}/{values['protocol']}" if "protocol" in values else kind
        for name, value in values.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(f"{prefix}/{name}", value, iteration)
        if kind == "eval":
            self.evaluated.add((iteration, values["protocol"]))
        with open(self.metrics_path, "a") as file:
            file.write(json.dumps({"kind": kind, "iteration": iteration, **values}) + "\n")

    def per_class(self, iteration: int, protocol: str, result: Any, classes: list[str]) -> None:
        """An evaluation class by class: top-1 of each as ``eval/PROTOCOL/class/NAME``, and the confusion matrix as
        the image ``eval/PROTOCOL/confusion`` (trainer.eval.eval_report draws it)."""
        if not self.enabled:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        from trainer.eval.eval_report import confusion_plot

        for name, (correct1, _, count) in zip(classes, result.per_class, strict=True):
            if count:
                self.writer.add_scalar(f"eval/{protocol}/class/{name}", correct1 / count, iteration)
        canvas = FigureCanvasAgg(confusion_plot(result, classes))  # drawn without pyplot: no GUI, no global state
        canvas.draw()
        pixels = np.asarray(canvas.buffer_rgba())[..., :3]
        self.writer.add_image(f"eval/{protocol}/confusion", pixels, iteration, dataformats="HWC")

    def has_eval(self, iteration: int, protocol: str) -> bool:
        return (iteration, protocol) in self.evaluated

    def record_run(self, config_yaml: str, facts: dict[str, Any], choices: list[str], dataset: str) -> None:
        """The run directory's record of this start: config.yaml (resolved), env.json (the machine), dataset.json
        (which data set it trains on: data_pipeline.published.identify), and the config with the automatic choices
        as TensorBoard text."""
        self.dataset = dataset
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_whole(self.run_dir / "config.yaml", config_yaml)
        write_whole(self.run_dir / "env.json", json.dumps(facts, indent=2) + "\n")
        write_whole(self.run_dir / "dataset.json", json.dumps({"dataset": dataset, "title": title(dataset)}) + "\n")
        self.text("config", "```\n" + config_yaml + "```\n\n" + "\n\n".join(choices))

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, text)

    def batch_image(self, iteration: int, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> None:
        """Up to 32 images of a batch as the model gets them, denormalized: a broken pipeline shows at once."""
        if not self.enabled:
            return
        import torch
        from torchvision.utils import make_grid

        images = images[:32].detach().float().cpu()
        images = images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        self.writer.add_image("data/first_augmented_batch", make_grid(images.clamp(0, 1), nrow=8), iteration)

    def hparams(self, iteration: int, config: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's config (flattened: ``optim.lr``, ...) and final metrics for the HParams tab, in this run's own
        directory (torch's ``add_hparams`` would open a sub-run)."""
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams

        values = {
            key: value if isinstance(value, int | float | str | bool) else str(value)
            for key, value in flatten(config).items()
        }
        experiment, start, end = hparams(values, metrics)
        for summary in (experiment, start, end):
            self.writer.file_writer.add_summary(summary)
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_whole(path: Path, text: str) -> None:
    """``text`` into ``path`` under a temporary name, then renamed: a crash or a full disk mid-write leaves the file
    as it was (a half-written config.yaml would be read as the run's)."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; none if it does not exist. A last line without its newline is a record
    being written, or cut by a crash mid-write: it is left out. Any other line that is not a record is an error."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")  # the last item: "" after a whole last line, else the partial one
    records = []
    for number, line in enumerate(lines[:-1], start=1):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}, line {number}: not a JSON record ({line[:60]!r})") from None
    return records


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
