"""``residual data verify DIR``: decode every image below a folder, in parallel, and list those that fail."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from data_pipeline.damaged import CorruptImage, decode_rgb
from data_pipeline.datasets.folder_index import walk_folders
from data_pipeline.errors import UserError


def image_files(root: Path) -> list[str]:
    """Every file below ``root`` with an image extension (ImageFolder's list), in sorted order; listed without a
    stat per file, so that ImageNet's 1.33 million take seconds (a link back into the tree is an error)."""
    found = []
    for folder, files in walk_folders(str(root), os.path.realpath(root)):
        found += [os.path.join(folder, file) for file in files if file.lower().endswith(IMG_EXTENSIONS)]
    return sorted(found)


def decode_error(path: Path) -> str | None:
    """Why ``path`` is not an image training can read, or None: it is decoded as training decodes it, every pixel
    (so truncated files fail), under the one rule of data_pipeline.damaged."""
    try:
        decode_rgb(str(path))
    except CorruptImage as error:
        return error.reason
    return None


def verify_images(root: Path, *, workers: int, progress: bool = False) -> tuple[int, list[tuple[Path, str]]]:
    """(files checked, [(file, reason)] for each one that does not decode); ``progress``: a bar with the rate."""
    if not root.is_dir():
        raise UserError(f"{root}: folder does not exist")
    files = image_files(root)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        decoded = pool.map(decode_error, files, chunksize=256)
        shown = tqdm(
            decoded,
            total=len(files),
            unit="image",
            unit_scale=True,
            desc="verify",
            disable=not progress,
            mininterval=2.0,
        )
        errors = list(shown)
    return len(files), [(Path(path), error) for path, error in zip(files, errors, strict=True) if error is not None]
