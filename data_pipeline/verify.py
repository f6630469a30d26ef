"""``residual data verify DIR``: decode every image below a folder, in parallel, and list those that fail."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from data_pipeline.errors import UserError


def image_files(root: Path) -> Iterator[Path]:
    """Every file below ``root`` with an image extension (ImageFolder's list), in sorted order."""
    return (path for path in sorted(root.rglob("*")) if path.is_file() and path.suffix.lower() in IMG_EXTENSIONS)


def decode_error(path: Path) -> str | None:
    """Why ``path`` is not a decodable image, or None. ``load`` decodes every pixel, so truncated files fail."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def verify_images(root: Path, *, workers: int) -> tuple[int, list[tuple[Path, str]]]:
    """(files checked, [(file, reason)] for each one that does not decode)."""
    if not root.is_dir():
        raise UserError(f"{root}: folder does not exist")
    files = list(image_files(root))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        errors = list(pool.map(decode_error, files, chunksize=64))
    return len(files), [(path, error) for path, error in zip(files, errors, strict=True) if error is not None]
