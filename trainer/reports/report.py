"""``residual report RUN_DIR ...``: the paper's figures and table for one's own runs, and how fast each got there.

The figures follow Fig. 4 and Fig. 6: error (%) against iterations, training error thin, validation error bold,
one colour per run; plain and residual nets side by side when both are present (the degradation figure). A second
figure plots the validation error against wall-clock hours and device-hours (hours x ranks): recipes compare on
time, as FFCV, MLPerf and airbench compare them. The tables give each run's final errors beside the paper's for the
same model and protocol (reference/resnet-paper.md), and the time each run took to reach a target top-1 (by default
the best top-1 that every run reached), counting the EMA's evaluations as well as the raw weights'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib as mpl
import yaml
from matplotlib.figure import Figure

from data_pipeline.errors import UserError, read_text
from data_pipeline.published import title as dataset_title
from trainer.reports.comparison import PAPERS, paper_figure, published_note
from trainer.training.run_log import read_metrics


@dataclass
class RunHistory:
    name: str
    model: str
    shortcut: str | None
    dataset: str
    protocol: str  # of the evaluations during training
    train_error: list[tuple[int, float]] = field(default_factory=list)  # (iteration, %)
    val_error: list[tuple[int, float]] = field(default_factory=list)
    finals: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # protocol: (iteration, top-1, top-5)
    timed: list[tuple[int, float, float, float]] = field(
        default_factory=list
    )  # (iteration, hours, device-hours, top-1 %)


def read_run_config(path: Path) -> dict[str, Any]:
    """A run's config.yaml (the config as it trained), or one line saying why it cannot be read."""
    try:
        config = yaml.safe_load(read_text(path, "run config"))
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML, half-written? ({str(error).splitlines()[0]})") from None
    sections = ("model", "train", "eval")
    if not isinstance(config, dict) or not all(isinstance(config.get(key), dict) for key in sections):
        raise UserError(
            f"{path}: empty or half-written (needs the sections {', '.join(sections)}): the run wrote it at its "
            f"start; starting the run again writes it whole"
        )
    return config


def read_dataset(path: Path) -> str:
    try:
        return json.loads(read_text(path, "run record"))["dataset"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(
            f"{path}: not the run's data set record (half-written?); remove it to compare with nothing"
        ) from None


def read_run(run_dir: Path) -> RunHistory:
    """A run directory's config.yaml and metrics.jsonl."""
    config_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not config_path.is_file() or not metrics_path.is_file():
        raise UserError(f"{run_dir}: not a run directory (needs config.yaml and metrics.jsonl)")
    config = read_run_config(config_path)
    model = config["model"]["name"]
    recorded = run_dir / "dataset.json"  # runs before it was recorded: "unrecorded", compared with nothing
    dataset = read_dataset(recorded) if recorded.is_file() else "unrecorded"
    history = RunHistory(
        config["train"]["run_name"], model, config["model"].get("shortcut"), dataset, config["eval"]["protocol"]
    )
    for record in read_metrics(metrics_path):
        iteration = record["iteration"]
        if record["kind"] == "train" and "top1_error" in record:
            history.train_error.append((iteration, 100 * record["top1_error"]))
        elif record["kind"] == "eval":
            top1, top5 = 100 * record["top1_error"], 100 * record["top5_error"]
            if record["protocol"] == history.protocol:
                history.val_error.append((iteration, top1))
            if record["protocol"] in (history.protocol, f"{history.protocol}-ema") and "hours" in record:
                ema = record["protocol"].endswith("-ema")
                history.timed.append((iteration, record["hours"], record["device_hours"], 100 * record["top1"], ema))
            history.finals[record["protocol"]] = (iteration, top1, top5)
    return history


def time_to_accuracy(run: RunHistory, target: float) -> tuple[int, float, float] | None:
    """The first evaluation (raw or EMA weights) at ``target`` top-1 % or above: (iteration, hours, device-hours)."""
    return next(((it, hours, device) for it, hours, device, top1, _ in run.timed if top1 >= target), None)


def common_target(runs: list[RunHistory]) -> float | None:
    """The best top-1 % that every run reached (None if some run has no timed evaluation)."""
    bests = [max((point[3] for point in run.timed), default=None) for run in runs]
    return None if None in bests else min(bests)


def plot(runs: list[RunHistory], out: Path) -> list[Path]:
    """One PNG per data set; plain nets on the left and residual nets on the right when a set has both."""
    written = []
    colours = mpl.rcParams["axes.prop_cycle"].by_key()["color"]
    for dataset in sorted({run.dataset for run in runs}):
        chosen = [run for run in runs if run.dataset == dataset]
        groups = [
            ("plain", [r for r in chosen if r.model.startswith("plain")]),
            ("ResNet", [r for r in chosen if not r.model.startswith("plain")]),
        ]
        groups = [(title, members) for title, members in groups if members]
        figure = Figure(figsize=(6 * len(groups), 4.2))  # no pyplot: no GUI backend, no global state
        axes = figure.subplots(1, len(groups), sharey=True, squeeze=False)
        for axis, (title, members) in zip(axes[0], groups, strict=True):
            for index, run in enumerate(members):
                colour = colours[index % len(colours)]
                if run.train_error:
                    axis.plot(*zip(*run.train_error, strict=True), color=colour, linewidth=0.8, alpha=0.8)
                if run.val_error:
                    axis.plot(*zip(*run.val_error, strict=True), color=colour, linewidth=2.4, label=label(run, runs))
            axis.set_title(f"{title} ({dataset_title(dataset)})")
            axis.set_xlabel("iterations")
            axis.ticklabel_format(axis="x", style="sci", scilimits=(0, 4))
            axis.grid(alpha=0.3)
            axis.legend(loc="upper right", fontsize=9)
        axes[0][0].set_ylabel("error (%)")
        figure.text(
            0.5, -0.02, "thin: training error (running, top-1); bold: validation error (top-1)", ha="center", fontsize=9
        )
        figure.tight_layout()
        path = out / f"errors-{dataset}.png"
        figure.savefig(path, dpi=120, bbox_inches="tight")
        written.append(path)
    return written


def plot_time(runs: list[RunHistory], out: Path) -> list[Path]:
    """Validation error against wall-clock hours and device-hours, one PNG per data set (runs that logged time)."""
    written = []
    for dataset in sorted({run.dataset for run in runs if run.timed}):
        chosen = [run for run in runs if run.dataset == dataset and run.timed]
        figure = Figure(figsize=(12, 4.2))
        axes = figure.subplots(1, 2, sharey=True)
        colours = mpl.rcParams["axes.prop_cycle"].by_key()["color"]
        for axis, column, unit in ((axes[0], 1, "wall-clock hours"), (axes[1], 2, "device-hours (hours x ranks)")):
            for index, run in enumerate(chosen):
                for ema in (False, True):
                    points = [(point[column], 100 - point[3]) for point in run.timed if point[4] == ema]
                    style = {"linestyle": "--" if ema else "-", "color": colours[index % len(colours)]}
                    if points:
                        name = label(run, runs) + (" EMA" if ema else "")
                        axis.plot(*zip(*points, strict=True), marker=".", linewidth=1.6, label=name, **style)
            axis.set_xlabel(unit)
            axis.grid(alpha=0.3)
            axis.legend(loc="upper right", fontsize=9)
        axes[0].set_ylabel("validation error (%, top-1; dashed: EMA weights)")
        figure.tight_layout()
        path = out / f"time-{dataset}.png"
        figure.savefig(path, dpi=120, bbox_inches="tight")
        written.append(path)
    return written


def time_table(runs: list[RunHistory], targets: list[float] | None) -> str:
    """Markdown: each run's time to each of ``targets`` top-1 % (default: the best top-1 that every run reached),
    as wall-clock minutes and iteration, and the best top-1 it reached, with when."""
    targets = targets or ([common] if (common := common_target(runs)) is not None else None)
    if targets is None:
        return "No time-to-accuracy: some run's evaluations carry no time (runs before this version log none)."
    heads = " | ".join(f"to {target:.2f}%" for target in targets)
    lines = [
        "Time to top-1 (wall-clock minutes, iteration; device-hours where several devices trained):",
        "",
        f"| run | model | {heads} | best top-1 |",
        f"|---|---|{'---:|' * len(targets)}---:|",
    ]
    for run in runs:
        cells = [reached_cell(run, time_to_accuracy(run, target)) for target in targets]
        best = max(run.timed, key=lambda point: point[3], default=None)
        best_cell = "-" if best is None else f"{best[3]:.2f}% at {60 * best[1]:.1f} min (it. {best[0]})"
        lines.append(f"| {run.name} | {run.model} | {' | '.join(cells)} | {best_cell} |")
    return "\n".join(lines)


def reached_cell(run: RunHistory, reached: tuple[int, float, float] | None) -> str:
    if reached is None:
        return "not reached"
    iteration, hours, device_hours = reached
    devices = f", {device_hours:.3f} device-h" if device_hours > hours * 1.001 else ""
    return f"{60 * hours:.1f} min (it. {iteration}{devices})"


def label(run: RunHistory, runs: list[RunHistory]) -> str:
    """The model's name, as in the paper's legends; with the run's name where two runs train the same model."""
    return run.model if sum(other.model == run.model for other in runs) == 1 else f"{run.model} ({run.name})"


def table(runs: list[RunHistory]) -> str:
    """Markdown: each run's data set and final errors per protocol beside the paper's, where the run trained on
    the paper's data set for its model; below, what each other data set's runs compare with."""
    lines = [
        "| run | data set | model | protocol | iterations | top-1 err % | top-5 err % | paper top-1 err % | "
        "paper top-5 err % |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]

    def number(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    for run in runs:
        for protocol, (iteration, top1, top5) in run.finals.items():
            paper = paper_figure(run.dataset, run.model, protocol, run.shortcut) or (None, None)
            lines.append(
                f"| {run.name} | {dataset_title(run.dataset)} | {run.model} | {protocol} | {iteration} | {top1:.2f} | "
                f"{top5:.2f} | {number(paper[0])} | {number(paper[1])} |"
            )
    notes = [published_note(dataset) for dataset in sorted({run.dataset for run in runs}) if dataset not in PAPERS]
    return "\n".join([*lines, "", *(f"- {note}" for note in notes)]) if notes else "\n".join(lines)


def write_report(run_dirs: list[Path], out: Path, targets: list[float] | None = None) -> list[Path]:
    """``targets``: the top-1 %s whose time to reach the time table gives (default: the best all runs reached)."""
    runs = [read_run(run_dir) for run_dir in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    figures = [*plot(runs, out), *plot_time(runs, out)]
    images = "\n".join(f"![{path.stem}]({path.name})" for path in figures)
    markdown = out / "report.md"
    markdown.write_text(
        f"# Report\n\n{images}\n\n{table(runs)}\n\n{time_table(runs, targets)}\n\n"
        f"Runs: {', '.join(map(str, run_dirs))}\n"
    )
    return [*figures, markdown]
