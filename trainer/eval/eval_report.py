"""What a top-1 hides: the evaluation report of `residual eval CHECKPOINT --report DIR` (and of a training's
final evaluation with ``eval.report=true``). One self-contained HTML page, its PNG figures and a CSV beside it, no
server and no network:

- the run's identity (model, checkpoint, iteration, data set and root, protocol, precision, commit, date) and its
  top-1/top-5 with the images counted;
- top-1 per class, worst first (of more than 50 classes the worst and best 25; every class in classes.csv);
- the confusion matrix (of more than 50 classes, the 50 with the most errors) and the most confused pairs, each
  with a strip of its misclassified images: the image, its true class, the predicted one and the confidence;
- calibration: the expected calibration error over 15 equal bins of the top-1 softmax confidence, and the
  reliability diagram;
- of two checkpoints evaluated on the same images, the per-class change and the flips (right in one, wrong in the
  other), with McNemar's exact test of the top-1 difference.

Everything comes from the evaluation's counts and its per-image (label, top-1 class, confidence) records
(trainer.eval.evaluate), never from logits; the report is written after the evaluation.
"""

from __future__ import annotations

import csv
import html
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.utils.data import Dataset

from data_pipeline.errors import UserError
from trainer.eval.counts import CALIBRATION_BINS, EvalResult, calibration_error
from trainer.machine.environment import code_commit

TABLE_ROWS = 25  # worst and best classes shown of a long list
MATRIX_CLASSES = 50  # the confusion matrix drawn whole up to this many classes
PAIRS = 8  # most confused pairs, each with a strip of images
STRIP = 8  # images per strip


@dataclass
class Evaluated:
    """One checkpoint's evaluation as the report reads it. ``image``: the validation image at a data set index
    (uint8 C x H x W), for the strips; None where the records do not map onto the data set's order."""

    result: EvalResult
    classes: list[str]
    identity: dict[str, str]
    image: Callable[[int], torch.Tensor] | None = None

    @classmethod
    def of(cls, result: EvalResult, dataset: Dataset, **identity: object) -> Evaluated:
        """``identity``: model, checkpoint, iteration, weights, data set, protocol, precision; the commit of this
        code and the date are added. The strips show the data set's images where the records are all of them, in
        its order (none was left out as undecodable)."""
        named = {key.replace("_", " "): str(value) for key, value in identity.items()}
        named |= {"commit": code_commit(), "date": time.strftime("%Y-%m-%d %H:%M")}
        in_order = result.predictions is not None and len(result.predictions) == len(dataset)
        return cls(result, list(dataset.classes), named, (lambda index: dataset[index][0]) if in_order else None)


def class_rows(result: EvalResult, classes: list[str]) -> list[tuple[str, int, int, float]]:
    """(class, top-1 correct, images, top-1) of each class with images, worst first (ties by name)."""
    rows = [(name, c1, n, c1 / n) for name, (c1, _, n) in zip(classes, result.per_class, strict=True) if n]
    return sorted(rows, key=lambda row: (row[3], row[0]))


def confused_pairs(confusion: torch.Tensor, classes: list[str], limit: int) -> list[tuple[int, int, int]]:
    """(true class, predicted class, images) of the most frequent confusions, most first (ties in class order)."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    flat = off.flatten()
    where = flat.nonzero().flatten()
    counts, order = flat[where].sort(descending=True, stable=True)
    width = len(classes)
    return [
        (index // width, index % width, count)
        for count, index in zip(counts.tolist(), where[order].tolist(), strict=True)
    ][:limit]


def mcnemar(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value for ``only_a`` images right in A alone and ``only_b`` in B alone: the
    binomial test of the smaller count among the flips at p = 1/2."""
    flips = only_a + only_b
    if flips == 0:
        return 1.0
    low = min(only_a, only_b)
    log_half = flips * math.log(0.5)
    tail = sum(
        math.exp(math.lgamma(flips + 1) - math.lgamma(k + 1) - math.lgamma(flips - k + 1) + log_half)
        for k in range(low + 1)
    )
    return min(1.0, 2 * tail)


def save(figure: Figure, path: Path) -> str:
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path.name


def confusion_plot(result: EvalResult, classes: list[str]) -> Figure:
    """Each row (true class) as fractions of its images; of many classes, those with the most errors."""
    confusion = result.confusion.double()
    errors = confusion.sum(dim=1) - confusion.diag()
    shown = errors.topk(min(MATRIX_CLASSES, len(classes))).indices.sort().values
    matrix = confusion[shown][:, shown]
    matrix = matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    size = 3 + 0.32 * len(shown)
    figure = Figure(figsize=(size + 1, size))
    axes = figure.subplots()
    image = axes.imshow(matrix.numpy(), cmap="Blues", vmin=0, vmax=1)
    names = [classes[i] for i in shown.tolist()]
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.set_xlabel("predicted (top-1)")
    axes.set_ylabel("true class")
    if len(names) <= 12:
        for row in range(len(names)):
            for column in range(len(names)):
                value = matrix[row, column].item()
                if round(100 * value) >= 1:
                    colour = "white" if value > 0.5 else "black"
                    axes.text(column, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=axes, fraction=0.04, label="fraction of the true class's images")
    title = (
        "confusion matrix"
        if len(names) == len(classes)
        else f"confusion matrix of the {len(names)} classes with the most errors"
    )
    axes.set_title(title)
    return figure


def confusion_figure(result: EvalResult, classes: list[str], path: Path) -> str:
    return save(confusion_plot(result, classes), path)


def reliability_figure(result: EvalResult, path: Path) -> str:
    images, confidence, correct = result.calibration.T.numpy()
    centres = (np.arange(CALIBRATION_BINS) + 0.5) / CALIBRATION_BINS
    used = images > 0
    figure = Figure(figsize=(4.6, 4.4))
    axes = figure.subplots()
    axes.bar(
        centres[used],
        (correct[used] / images[used]),
        width=1 / CALIBRATION_BINS,
        edgecolor="black",
        color="#4c72b0",
        label="accuracy",
    )
    axes.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axes.plot(centres[used], (confidence[used] / images[used]), "o", color="#dd8452", label="mean confidence")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("top-1 softmax confidence")
    axes.set_ylabel("top-1 accuracy")
    axes.set_title(f"reliability ({CALIBRATION_BINS} bins), ECE {100 * calibration_error(result.calibration):.2f}%")
    axes.legend(loc="upper left", fontsize=8)
    return save(figure, path)


def strip_figure(run: Evaluated, true: int, predicted: int, path: Path) -> str | None:
    """Up to STRIP images of ``true`` taken for ``predicted``, most confident first."""
    records = run.result.predictions
    chosen = ((records[:, 0] == true) & (records[:, 1] == predicted)).nonzero().flatten()
    chosen = chosen[records[chosen, 2].argsort(descending=True)][:STRIP].tolist()
    if not chosen or run.image is None:
        return None
    figure = Figure(figsize=(1.5 * len(chosen), 2.1))
    for place, index in enumerate(chosen):
        axes = figure.add_subplot(1, len(chosen), place + 1)
        image = run.image(index)
        axes.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if image.shape[0] == 1 else None)
        axes.set_axis_off()
        axes.set_title(f"#{index}\n{100 * records[index, 2].item():.0f}%", fontsize=8)
    figure.suptitle(f"true {run.classes[true]}, predicted {run.classes[predicted]}", fontsize=9)
    return save(figure, path)


def table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def class_section(run: Evaluated, out: Path) -> str:
    rows = class_rows(run.result, run.classes)
    with open(out / "classes.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["class", "top1_correct", "images", "top1"])
        writer.writerows([name, correct, count, f"{top1:.6f}"] for name, correct, count, top1 in rows)
    with open(out / "confusion.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["true \\ predicted", *run.classes])
        writer.writerows([name, *row] for name, row in zip(run.classes, run.result.confusion.tolist(), strict=True))
    shown = [[name, correct, count, percent(top1)] for name, correct, count, top1 in rows]
    header = ["class", "top-1 correct", "images", "top-1"]
    if len(shown) <= 2 * TABLE_ROWS:
        tables = table(header, shown)
    else:
        tables = (
            f"<h3>The worst {TABLE_ROWS}</h3>{table(header, shown[:TABLE_ROWS])}"
            f"<h3>The best {TABLE_ROWS}</h3>{table(header, shown[-TABLE_ROWS:][::-1])}"
        )
    links = '<a href="classes.csv">classes.csv</a>; the confusion matrix: <a href="confusion.csv">confusion.csv</a>'
    return f"<h2>Top-1 per class, worst first</h2>{tables}<p>Every class: {links}.</p>"


def pairs_section(run: Evaluated, out: Path) -> str:
    pairs = confused_pairs(run.result.confusion, run.classes, PAIRS)
    per_class = run.result.confusion.sum(dim=1)
    rows = [[run.classes[t], run.classes[p], n, percent(n / max(1, per_class[t].item()))] for t, p, n in pairs]
    parts = [
        "<h2>The most confused pairs</h2>",
        table(["true class", "predicted", "images", "of the true class"], rows),
    ]
    if run.result.predictions is None or run.image is None:
        parts.append("<p>No image strips: the per-image records do not follow the data set's order here.</p>")
        return "".join(parts)
    for number, (true, predicted, _) in enumerate(pairs, start=1):
        name = strip_figure(run, true, predicted, out / f"pair-{number}.png")
        if name:
            alt = f"{run.classes[true]} taken for {run.classes[predicted]}"
            parts.append(f'<img src="{name}" alt="{html.escape(alt)}">')
    return "".join(parts)


def summary_section(run: Evaluated) -> str:
    result = run.result
    identity = table(["", ""], [[key, value] for key, value in run.identity.items()])
    counts = table(
        ["top-1", "top-5", "images", "ECE (15 bins)"],
        [[percent(result.top1), percent(result.top5), result.count, percent(calibration_error(result.calibration))]],
    )
    return f"{identity}<h2>Accuracy</h2>{counts}"


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}th{background:#f0f0f0}img{display:block;margin:.5em 0;
max-width:100%}"""


def page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def write_eval_report(out: Path, run: Evaluated) -> Path:
    """The report of one evaluation into the folder ``out``; the page's path."""
    out.mkdir(parents=True, exist_ok=True)
    body = [
        summary_section(run),
        "<h2>Calibration</h2>",
        f'<img src="{reliability_figure(run.result, out / "reliability.png")}" alt="reliability diagram">',
        class_section(run, out),
        "<h2>Confusion</h2>",
        f'<img src="{confusion_figure(run.result, run.classes, out / "confusion.png")}" alt="confusion matrix">',
        pairs_section(run, out),
    ]
    path = out / "index.html"
    path.write_text(page(f"Evaluation of {run.identity.get('model', '')}", "".join(body)))
    return path


@dataclass(frozen=True)
class Comparison:
    """Of two evaluations of the same images: per class, the top-1 of each and the flips."""

    rows: list[tuple[str, int, float, float, int, int]]  # class, images, top-1 A, top-1 B, right in A alone, in B
    only_a: int
    only_b: int

    @property
    def p_value(self) -> float:
        return mcnemar(self.only_a, self.only_b)


def compare(a: EvalResult, b: EvalResult, classes: list[str]) -> Comparison:
    records_a, records_b = a.predictions, b.predictions
    if records_a.shape != records_b.shape or not torch.equal(records_a[:, 0], records_b[:, 0]):
        raise UserError("the two checkpoints were not evaluated on the same images in the same order")
    right_a, right_b = records_a[:, 1] == records_a[:, 0], records_b[:, 1] == records_b[:, 0]
    labels = records_a[:, 0].long()
    alone_a = torch.bincount(labels[right_a & ~right_b], minlength=len(classes))
    alone_b = torch.bincount(labels[right_b & ~right_a], minlength=len(classes))
    rows = [
        (name, n, c1a / n, c1b / n, int(alone_a[i]), int(alone_b[i]))
        for i, (name, (c1a, _, n), (c1b, _, _)) in enumerate(zip(classes, a.per_class, b.per_class, strict=True))
        if n
    ]
    return Comparison(sorted(rows, key=lambda row: row[3] - row[2]), int(alone_a.sum()), int(alone_b.sum()))


def write_comparison_report(out: Path, a: Evaluated, b: Evaluated) -> Path:
    """Two checkpoints on the same images: each one's report in A/ and B/, and the page of the differences."""
    write_eval_report(out / "A", a)
    write_eval_report(out / "B", b)
    comparison = compare(a.result, b.result, a.classes)
    identity = table(
        ["", "A", "B"],
        [[key, a.identity.get(key, ""), b.identity.get(key, "")] for key in a.identity]
        + [["top-1", percent(a.result.top1), percent(b.result.top1)]],
    )
    verdict = (
        f"<p>Flips: {comparison.only_a} images right in A alone, {comparison.only_b} in B alone. McNemar's exact test "
        f"of the top-1 difference ({100 * (b.result.top1 - a.result.top1):+.2f} points): p = {comparison.p_value:.3g}"
        f"{' (significant at 0.05)' if comparison.p_value < 0.05 else ' (not significant at 0.05: within noise)'}.</p>"
    )
    rows = [
        [name, n, percent(top1_a), percent(top1_b), f"{100 * (top1_b - top1_a):+.2f}", alone_a, alone_b]
        for name, n, top1_a, top1_b, alone_a, alone_b in comparison.rows
    ]
    header = ["class", "images", "top-1 A", "top-1 B", "change (points)", "right in A alone", "right in B alone"]
    body = (
        f"{identity}{verdict}<h2>Per class, most worsened first</h2>{table(header, rows)}"
        '<p>Each evaluation on its own: <a href="A/index.html">A</a>, <a href="B/index.html">B</a>.</p>'
    )
    path = out / "index.html"
    path.write_text(page("Two checkpoints side by side", body))
    return path
