"""The published data sets the project knows: where each comes from (for ``residual data get``), how a folder is
recognized as one of them, and the test accuracies published for it. A run records which data set it trained on
(``identify``), and reports compare it only with figures for that data set: the paper's for CIFAR-10 and
ImageNet (trainer.models.paper_error), the data set's own benchmark table for Fashion-MNIST, none for synthetic
data or a folder of one's own.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.config import DataConfig


@dataclass(frozen=True)
class Download:
    name: str  # the file's name at the source
    md5: str  # as the source (or torchvision's copy of its table) publishes it


@dataclass(frozen=True)
class PublishedDataSet:
    name: str
    format: str  # the data.format that reads it
    mirrors: tuple[str, ...]  # base addresses, tried in order; a file's address is base + its name
    files: tuple[Download, ...]
    classes: tuple[str, ...] = ()  # written to classes.txt for IDX data (CIFAR's batches.meta names its own)
    archive_folder: str | None = None  # a tar.gz's folder whose files are the data set (CIFAR)
    debian_package: str | None = None  # Debian's package with the same files, installed under /usr/share/datasets
    title: str = ""
    # the md5 of the test labels' file, decompressed (how a folder is recognized: Debian's copies are compressed
    # again, so the source's md5 of the .gz is not theirs)
    test_labels_md5: str = ""
    results: tuple[tuple[str, float], ...] = ()  # published test top-1 accuracies (%), with who reached them

    def addresses(self, download: Download) -> list[str]:
        return [f"{mirror}{download.name}" for mirror in self.mirrors]


IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def idx_downloads(*md5s: str) -> tuple[Download, ...]:
    """MNIST's four files as its copies publish them, with their md5s in IDX_FILES' order."""
    return tuple(Download(name, md5) for name, md5 in zip(IDX_FILES, md5s, strict=True))


PUBLISHED = {
    "fashion-mnist": PublishedDataSet(
        "fashion-mnist",
        "idx",
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),  # Zalando's README, "Get the Data"
        idx_downloads(
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "25c81989df183df01b3e8a0aad5dffbe",
            "bef4ecab320f06d8554ea6380940ec79",
            "bb300cfdad3c16e7a12a480ee83cd310",
        ),
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        debian_package="dataset-fashion-mnist",
        title="Fashion-MNIST",
        test_labels_md5="15d484375f8d13e6eb1aabb0c3f46965",
        # the benchmark table of Zalando's README (/usr/share/doc/dataset-fashion-mnist/README.md.gz)
        results=(
            ("ResNet-18", 94.9),
            ("WRN-28-10", 95.9),
            ("WRN-28-10 + random erasing", 96.3),
            ("WRN-40-4", 96.7),
            ("human", 83.5),
        ),
    ),
    "mnist": PublishedDataSet(
        "mnist",
        "idx",
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),  # torchvision's
        idx_downloads(
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "d53e105ee54ea40749a09fcbcd1e9432",
            "9fb629c4189551a2d022fa330f9573f3",
            "ec29112dd5afa0611ce80d1b7f02629c",
        ),
        classes=tuple(str(digit) for digit in range(10)),
        title="MNIST",
    ),
    "cifar10": PublishedDataSet(
        "cifar10",
        "cifar",
        ("https://www.cs.toronto.edu/~kriz/",),  # Krizhevsky's page
        (Download("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        archive_folder="cifar-10-batches-py",
        title="CIFAR-10",
        test_labels_md5="40351d587109b95175f43aff81a1287e",  # of test_batch (torchvision's table)
    ),
    "cifar100": PublishedDataSet(
        "cifar100",
        "cifar",
        ("https://www.cs.toronto.edu/~kriz/",),
        (Download("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
        archive_folder="cifar-100-python",
        title="CIFAR-100",
        test_labels_md5="f0ef6b0ae62326f3e7ffdfab6717acfc",  # of test (torchvision's table)
    ),
}
TITLES = {
    "imagenet": "ImageNet",
    "synthetic": "synthetic data",
    "unrecorded": "a data set not recorded (a run from before dataset.json)",
    **{k: v.title for k, v in PUBLISHED.items()},
}
SYNTHETIC_CLASS = re.compile(r"c\d{3}_[a-z]+_[a-z]+")  # data_pipeline.prepare.synthetic.class_name
IMAGENET_CLASS = re.compile(r"n\d{8}")  # a WordNet id


def file_md5s(path: Path) -> set[str]:
    """The md5 of a file as it lies and, gzipped, of its contents."""
    data = path.read_bytes()
    contents = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return {hashlib.md5(data).hexdigest(), hashlib.md5(contents).hexdigest()}


def identify(config: DataConfig, classes: list[str]) -> str:
    """Which data set ``config.data.root`` holds: a key of PUBLISHED (by its test labels' md5), "imagenet" (1,000
    WordNet-id classes), "synthetic" (the classes `residual data synth` names), else the format's name for a data
    set of one's own ("idx", "cifar", "imagefolder", "webdataset")."""
    if all(SYNTHETIC_CLASS.fullmatch(name) for name in classes):
        return "synthetic"
    if len(classes) == 1000 and all(IMAGENET_CLASS.fullmatch(name) for name in classes):
        return "imagenet"
    if (labels := test_labels_file(config)) is not None:
        found = file_md5s(labels)
        for name, published in PUBLISHED.items():
            if found & {published.test_labels_md5, *(d.md5 for d in published.files if "t10k-labels" in d.name)}:
                return name
    return config.format


def test_labels_file(config: DataConfig) -> Path | None:
    """The file that holds the test labels, where the readers (data_pipeline.datasets.idx and .cifar) find it: IDX's
    t10k labels, CIFAR-10's test_batch or CIFAR-100's test; None for other formats."""
    from data_pipeline.datasets.cifar import CIFAR100_FILES, CIFAR_TEST_BATCH
    from data_pipeline.datasets.idx import find_idx_file

    root = Path(config.root)
    if config.format == "idx":
        return find_idx_file(root, "t10k", "labels")
    if config.format == "cifar":
        return next((path for path in (root / CIFAR_TEST_BATCH, root / CIFAR100_FILES[False]) if path.is_file()), None)
    return None


def title(dataset: str) -> str:
    """The data set's name as its authors write it; a folder of one's own is "<format> data"."""
    return TITLES.get(dataset, f"{dataset} data")


def published_results(dataset: str) -> tuple[tuple[str, float], ...]:
    return PUBLISHED[dataset].results if dataset in PUBLISHED else ()
