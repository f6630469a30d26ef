"""``residual data prepare-imagenet``: ILSVRC2012's 50,000 validation images, delivered in one folder, sorted into
``val/<wnid>/`` class folders (the layout of train/ and of ImageFolder) from either ground truth: the devkit's
ILSVRC2012_validation_ground_truth.txt (ILSVRC2012_ID per line, image order) with its meta.mat (ID -> wnid), or
Kaggle's LOC_val_solution.csv (ImageId, then the wnid first in PredictionString)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

from data_pipeline.errors import UserError


def labels_from_devkit(ground_truth: Path, meta: Path) -> dict[str, str]:
    from scipy.io import loadmat

    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    wnids = {int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in synsets}
    ids = [int(line) for line in ground_truth.read_text().split()]
    return {f"ILSVRC2012_val_{number:08d}": wnids[ident] for number, ident in enumerate(ids, start=1)}


def labels_from_solution(solution: Path) -> dict[str, str]:
    with open(solution, newline="") as file:
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(file)}


def prepare_val(images: Path, out: Path, labels: dict[str, str], *, mode: str = "link") -> int:
    """Place every labelled image of ``images`` in ``out/<wnid>/`` (hard link, copy or move); returns the count.
    An image without a label, or a label without its image, is an error that names it."""
    files = {path.stem: path for path in images.iterdir() if path.suffix.lower() in (".jpeg", ".jpg", ".png")}
    unlabelled = sorted(set(files) - set(labels))
    missing = sorted(set(labels) - set(files))
    if unlabelled or missing:
        details = [
            f"{len(names)} {what} (first: {names[0]})"
            for what, names in (("images without a label", unlabelled), ("labels without an image", missing))
            if names
        ]
        raise UserError(f"{images}: {'; '.join(details)}")
    for stem, path in sorted(files.items()):
        target = out / labels[stem] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            continue
        if mode == "move":
            shutil.move(path, target)
        elif mode == "copy":
            shutil.copy2(path, target)
        else:
            try:
                os.link(path, target)
            except OSError:  # another file system
                shutil.copy2(path, target)
    return len(files)
