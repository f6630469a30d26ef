"""A damaged image, one rule for every reader (an image folder's and a WebDataset shard's samples on the torch path,
DALI's readers, `residual data verify`): what counts as damaged, what it is called, and what ``data.skip_corrupt``
does with it in training and in evaluation.

Damaged means Pillow cannot decode it, every pixel, into RGB: a file that is not an image, a truncated one, a
broken stream. Never its size: Pillow refuses more than 179 million pixels as a possible decompression bomb (a
traceback, in training), while DALI decodes any size and photo collections hold panoramas of 20,000 x 10,000 (200
million); JPEG itself stops at 65,535 pixels a side. DALI's readers check headers first, without decoding (the
cost of a full decode per sample would be Pillow's); a file those checks flag is judged by the same decode, and
reported with the same reason."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from data_pipeline.errors import UserError

log = logging.getLogger(__name__)
Sample = TypeVar("Sample")

Image.MAX_IMAGE_PIXELS = None  # damaged when undecodable, never for its size
# What a decoder raises for a damaged file: Pillow's UnidentifiedImageError and truncated data are OSErrors; a
# broken PNG chunk or palette can be a ValueError
DAMAGE = (OSError, ValueError)


class CorruptImage(UserError):
    """An image file that cannot be decoded: what ``data.skip_corrupt`` skips (its warning names the file and the
    reason; the advice is for a run that stops)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(
            f"{name}: cannot decode image ({reason}); data.skip_corrupt=true skips such files, "
            "`residual data verify` lists them"
        )
        self.name, self.reason = name, reason


def why(error: Exception) -> str:
    """A decoder's error as every reader reports it: "OSError: image file is truncated (73 bytes not processed)".
    Pillow names the file it could not identify, as a path or an in-memory buffer: the reader names it."""
    message = "cannot identify image file" if isinstance(error, UnidentifiedImageError) else str(error)
    return f"{type(error).__name__}: {message}"


def decode_rgb(source: str | np.ndarray, name: str | None = None) -> torch.Tensor:
    """A file (a path) or its encoded bytes, decoded by Pillow as torchvision's ImageFolder does (torchvision.io's
    decoders are deprecated since 0.29), as a uint8 C x H x W tensor; ``CorruptImage`` naming ``name`` (default:
    the path) when it is damaged."""
    try:
        with Image.open(source if isinstance(source, str) else io.BytesIO(source.data)) as image:
            return pil_to_tensor(image.convert("RGB"))
    except DAMAGE as error:
        raise CorruptImage(name or str(source), why(error)) from None


def damage(encoded: np.ndarray) -> str | None:
    """Why an encoded file is damaged, or None: the same decode as ``decode_rgb``."""
    try:
        decode_rgb(encoded, "")
    except CorruptImage as error:
        return error.reason
    return None


class SkipCorrupt:
    """``data.skip_corrupt`` in training, on both backends: a sample whose image is damaged is replaced by the next
    one that is not, with a warning that names the file and counts this process's skips; off, the sample's
    ``CorruptImage`` stops the run with the file's name."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.skipped = enabled, 0

    def first_usable(self, index: int, count: int, attempt: Callable[[int], Sample]) -> Sample:
        """``attempt(index)``, or (enabled) ``attempt`` of the next index modulo ``count`` that raises no
        ``CorruptImage``."""
        for offset in range(count):
            try:
                return attempt((index + offset) % count)
            except CorruptImage as error:
                if not self.enabled:
                    raise
                self.skipped += 1
                log.warning("skipped %s: %s (%d skipped by this process)", error.name, error.reason, self.skipped)
        raise UserError("no decodable image in the training set")


class SkippingCorrupt(Dataset):
    """``SkipCorrupt`` on the torch path: a sample whose image is damaged is replaced by the next one that is not."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.classes, self.policy = dataset, dataset.classes, SkipCorrupt(enabled=True)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.policy.first_usable(index, len(self.dataset), self.dataset.__getitem__)


def left_out(error: CorruptImage) -> None:
    """``data.skip_corrupt`` in evaluation, on both backends: a damaged image is left out of the count, warned
    about; off, its ``CorruptImage`` stops the evaluation."""
    log.warning("left out of the evaluation: %s: %s", error.name, error.reason)
