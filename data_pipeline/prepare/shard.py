"""``residual data shard SRC OUT --shard-size N``: SRC's train/ and val/ ImageFolder trees as WebDataset shards,
OUT/train/shard-000000.tar ... and OUT/val/..., with OUT/classes.txt; each shard with the index DALI's reader
reads and its labels (the layout data_pipeline.datasets.webdataset reads)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from tqdm import tqdm

from data_pipeline.datasets.imagefolder import ImageFolderDataset
from data_pipeline.datasets.webdataset import INDEX_VERSION
from data_pipeline.errors import UserError


def write_shards(source: Path, out: Path, *, shard_size: int) -> list[Path]:
    """One split (an ImageFolder tree) as shards of ``shard_size`` samples; returns the tar files."""
    dataset = ImageFolderDataset(source)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    progress = tqdm(total=len(dataset), unit="image", unit_scale=True, desc=f"shard {source.name}", mininterval=2.0)
    for start in range(0, len(dataset), shard_size):
        path = out / f"shard-{start // shard_size:06d}.tar"
        entries, labels = [], []
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(start, min(start + shard_size, len(dataset))):
                image_path, label = dataset.samples[index]
                key = f"{index:09d}"
                files = []
                for extension, data in (("jpg", Path(image_path).read_bytes()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                    data_offset = tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    files.append(f"{extension} {data_offset} {len(data)} {key}.{extension}")
                entries.append(" ".join(files))
                labels.append(str(label))
        path.with_suffix(".idx").write_text(f"{INDEX_VERSION} {len(entries)}\n" + "\n".join(entries) + "\n")
        path.with_suffix(".labels").write_text("\n".join(labels) + "\n")
        written.append(path)
        progress.update(len(entries))
    progress.close()
    return written


def shard_imagefolder(source: Path, out: Path, *, shard_size: int) -> dict[str, int]:
    """``residual data shard``: train/ and val/ of an ImageFolder root; returns the shard count per split."""
    counts = {}
    for split in ("train", "val"):
        if (source / split).is_dir():
            counts[split] = len(write_shards(source / split, out / split, shard_size=shard_size))
    if not counts:
        raise UserError(f"{source}: no train/ or val/ folder to shard")
    classes = ImageFolderDataset(source / next(iter(counts))).classes
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    return counts
