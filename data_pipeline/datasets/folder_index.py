"""An ImageFolder tree's samples as arrays, listed once per job.

ImageNet's train/ holds 1,281,167 files in 1,000 folders. Held as torchvision's list of (path, label) tuples, the
samples cost every DataLoader worker a private copy that grows as the epoch touches them (each tuple's reference
count is written on reading, so the pages forked from the trainer get copied: pytorch/pytorch#13246), and every
DALI reader process (started with spawn) unpickles all of them. ``FolderIndex`` holds them as three arrays instead:
the paths below the root as one byte buffer with their offsets, and the labels. Reading a sample touches no Python
object of the table, so forked workers share its pages, and a spawned process receives a few array buffers (about
50 MB at ImageNet's size).

Listing 1.28 million entries takes seconds on a warm page cache and much longer on a network file system, so the
trainer's rank 0 writes the index into the run directory (``data.index_dir``) and every other rank and later start
reads it. It is kept while the tree is unchanged: it records the modification time of every folder it listed, and
any file or folder added, removed or renamed changes that of its parent.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from data_pipeline.errors import UserError

INDEX_VERSION = 1


@dataclass(frozen=True)
class FolderIndex:
    """The samples of ``root/<class>/**/<image>`` in torchvision's DatasetFolder order (classes sorted by folder
    name, then folders walked in sorted order, files sorted), with image extensions as DatasetFolder's."""

    root: str
    classes: list[str]
    names: np.ndarray  # uint8: each sample's path below root (file system bytes), one after another
    offsets: np.ndarray  # int64, one more than the samples: sample i's path is names[offsets[i] : offsets[i + 1]]
    labels: np.ndarray  # int32: each sample's class
    folders: list[str]  # every folder listed, below root ("" is root): what ``is_current`` checks
    folder_times: np.ndarray  # int64: their modification times (ns) when listed

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> str:
        name = self.names[self.offsets[index] : self.offsets[index + 1]].tobytes()
        return os.path.join(self.root, os.fsdecode(name))

    def __getitem__(self, index: int) -> tuple[str, int]:
        """(path, label), as an item of DatasetFolder's ``samples``."""
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return self.path(index), int(self.labels[index])

    def is_current(self) -> bool:
        """Whether every folder listed still has the modification time it had (nothing added, removed, renamed)."""
        for folder, listed in zip(self.folders, self.folder_times.tolist(), strict=True):
            try:
                if os.stat(os.path.join(self.root, folder)).st_mtime_ns != listed:
                    return False
            except OSError:
                return False
        return True

    def save(self, path: Path) -> None:
        """Written beside and renamed into place: a reader never sees half an index."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        with open(partial, "wb") as file:
            np.savez(
                file,
                version=np.array(INDEX_VERSION),
                root=np.array(self.root),
                classes=np.array(self.classes),
                names=self.names,
                offsets=self.offsets,
                labels=self.labels,
                folders=np.array(self.folders),
                folder_times=self.folder_times,
            )
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path) -> FolderIndex | None:
        """The index at ``path``; None where there is none, one of another version, or a damaged one (a cache: the
        tree is listed again)."""
        try:
            with np.load(path, allow_pickle=False) as saved:
                if int(saved["version"]) != INDEX_VERSION:
                    return None
                return cls(
                    str(saved["root"]),
                    saved["classes"].tolist(),
                    saved["names"],
                    saved["offsets"],
                    saved["labels"],
                    saved["folders"].tolist(),
                    saved["folder_times"],
                )
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):  # missing, cut short, foreign
            return None


def list_folder(root: Path) -> FolderIndex:
    """``root``'s samples, as torchvision's DatasetFolder lists them (its ``find_classes`` and ``make_dataset``):
    a folder without class folders, or a class folder without images, is an error that names it."""
    if not root.is_dir():
        raise UserError(f"{root}: folder does not exist")
    root_text = str(root)
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise UserError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    # gathered a class at a time (one bytes object and one array each), so that no Python object per file outlives
    # its class: the memory a list of 1.28 million paths would leave in the process is never taken
    names, lengths, labels, folders, times = [], [], [], [""], [os.stat(root).st_mtime_ns]
    real_root = os.path.realpath(root_text)
    for label, name in enumerate(classes):
        found = []
        for folder, files in sorted(walk_folders(os.path.join(root_text, name), real_root)):
            relative = os.path.relpath(folder, root_text)
            folders.append(relative)
            times.append(os.stat(folder).st_mtime_ns)
            prefix = os.fsencode(relative) + b"/"
            found += [prefix + os.fsencode(file) for file in sorted(files) if file.lower().endswith(IMG_EXTENSIONS)]
        if not found:
            raise UserError(f"{root / name}: no images (extensions: {', '.join(IMG_EXTENSIONS)})")
        names.append(b"".join(found))
        lengths.append(np.fromiter(map(len, found), dtype=np.int64, count=len(found)))
        labels.append(np.full(len(found), label, dtype=np.int32))
    lengths = np.concatenate(lengths)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    buffer = np.frombuffer(b"".join(names), dtype=np.uint8)
    return FolderIndex(
        root_text, classes, buffer, offsets, np.concatenate(labels), folders, np.array(times, dtype=np.int64)
    )


def walk_folders(top: str, real_root: str) -> list[tuple[str, list[str]]]:
    """(folder, file names) of every folder below ``top`` (a class folder, or a data set for verify), as
    ``os.walk(followlinks=True)`` lists them, where torchvision's walk would list an image twice or under another
    class, or skip a folder without a word: a symbolic link to a folder inside the data set (a loop such as
    ``loop -> ..``, or another class), a dangling link and a folder that cannot be read are each one error naming
    the path. A link to a folder outside the data set (a tree assembled from several disks) is followed."""
    listed, pending, seen = [], [top], {os.path.realpath(top)}
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as error:
            raise UserError(f"{folder}: cannot be listed ({error.strerror}); make it readable or remove it") from None
        files = []
        for entry in entries:
            if entry.is_symlink() and not os.path.exists(entry.path):
                raise UserError(f"{entry.path}: a symbolic link to {os.readlink(entry.path)}, which does not exist")
            if not entry.is_dir():
                files.append(entry.name)
                continue
            target = os.path.realpath(entry.path)
            if entry.is_symlink() and (target in seen or is_within(target, real_root)):
                raise UserError(
                    f"{entry.path}: a symbolic link to {target}, inside the data set or listed already: its images "
                    f"would be listed again (under this class); remove the link"
                )
            seen.add(target)
            pending.append(entry.path)
        listed.append((folder, files))
    return listed


def is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def saved_index(root: Path, saved: Path) -> FolderIndex | None:
    """The index saved at ``saved`` if it is of ``root`` and current."""
    index = FolderIndex.load(saved)
    return index if index is not None and index.root == str(root) and index.is_current() else None


def folder_index(root: Path, saved: Path | None = None) -> FolderIndex:
    """``root``'s index: the one saved at ``saved`` while it is of this root and current, else listed (and saved
    there for the next reader)."""
    if saved is not None and (index := saved_index(root, saved)) is not None:
        return index
    index = list_folder(root)
    if saved is not None:
        index.save(saved)
    return index


def index_splits(root: str | Path, index_dir: str | Path) -> list[str]:
    """What the first process of a job does before the others open the data: train/'s and val/'s indexes, read
    where current, else listed and saved in ``index_dir``; what was done, a line each ("1281167 train images,
    listed")."""
    done = []
    for split in ("train", "val"):
        folder, saved = Path(root) / split, Path(index_dir) / f"{split}.npz"
        if folder.is_dir():
            index = saved_index(folder, saved)
            how = "read"
            if index is None:
                index, how = folder_index(folder, saved), "listed"
            done.append(f"{len(index)} {split} images, {how}")
    return done
