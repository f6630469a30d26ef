import os
import pickle
import time

import pytest
import torchvision

from data_pipeline.datasets import open_dataset
from data_pipeline.datasets.folder_index import FolderIndex, folder_index, index_splits, list_folder
from data_pipeline.errors import UserError
from data_pipeline.prepare.verify import image_files


def make_tree(root, files):
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not decoded here")


TREE = [
    "b/2.jpg",
    "b/1.JPEG",
    "b/notes.txt",
    "b/sub/3.png",
    "b/sub/deeper/4.jpg",
    "a/x.jpeg",
    "a/empty/.keep",
    "c/\udcff-latin1.jpg",
]


def test_the_index_lists_what_torchvisions_image_folder_lists(tmp_path):
    make_tree(tmp_path, TREE)
    index = list_folder(tmp_path)
    reference = torchvision.datasets.DatasetFolder(
        str(tmp_path), loader=None, extensions=torchvision.datasets.folder.IMG_EXTENSIONS
    )
    assert index.classes == reference.classes == ["a", "b", "c"]
    assert list(index) == reference.samples  # the same order, paths and labels
    assert index[-1] == reference.samples[-1]
    with pytest.raises(IndexError):
        index[len(index)]


def test_it_is_written_once_and_read_by_the_next_opener_without_listing(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_tree(data / "train", TREE)
    make_tree(data / "val", ["a/v.jpg", "b/w.jpg", "c/y.jpg"])
    assert index_splits(data, tmp_path / "index") == ["6 train images, listed", "3 val images, listed"]  # rank 0
    assert sorted(path.name for path in (tmp_path / "index").iterdir()) == ["train.npz", "val.npz"]
    listed = {split: list(list_folder(data / split)) for split in ("train", "val")}

    def no_listing(*args, **kwargs):
        raise AssertionError("listed again")

    monkeypatch.setattr("data_pipeline.datasets.folder_index.walk_folders", no_listing)
    assert index_splits(data, tmp_path / "index") == ["6 train images, read", "3 val images, read"]  # a later start
    for train in (True, False):  # every other rank
        opened = open_dataset(data, "imagefolder", train=train, index_dir=tmp_path / "index")
        assert list(opened.samples) == listed["train" if train else "val"]


@pytest.mark.parametrize(
    "change",
    [
        lambda root: (root / "a" / "new.jpg").write_bytes(b"x"),  # an image added
        lambda root: (root / "b" / "2.jpg").unlink(),  # one removed
        lambda root: (root / "b" / "sub" / "3.png").rename(root / "b" / "sub" / "5.png"),  # renamed, in a subfolder
        lambda root: make_tree(root, ["d/z.jpg"]),  # a class added
    ],
)
def test_a_changed_tree_is_listed_again(tmp_path, change):
    root, saved = tmp_path / "train", tmp_path / "index" / "train.npz"
    make_tree(root, TREE)
    before = list(folder_index(root, saved))
    time.sleep(0.01)  # a coarse file system clock must tick
    change(root)
    after = folder_index(root, saved)
    assert list(after) == list(list_folder(root)) != before
    assert list(FolderIndex.load(saved)) == list(after)  # and saved again


def test_an_index_of_another_root_or_version_is_not_used(tmp_path):
    make_tree(tmp_path / "one", ["a/1.jpg"])
    make_tree(tmp_path / "two", ["a/1.jpg", "a/2.jpg"])
    saved = tmp_path / "index.npz"
    folder_index(tmp_path / "one", saved)
    assert len(folder_index(tmp_path / "two", saved)) == 2
    saved.write_bytes(b"garbage")
    assert len(folder_index(tmp_path / "two", saved)) == 2


def test_the_table_pickles_as_arrays(tmp_path):
    """What a DALI reader process receives: the arrays' bytes, not an object per sample."""
    make_tree(tmp_path, [f"c{c}/image_{i:05d}.JPEG" for c in range(4) for i in range(500)])
    index = list_folder(tmp_path)
    arrays = index.names.nbytes + index.offsets.nbytes + index.labels.nbytes
    assert len(pickle.dumps(index)) < arrays + 4096
    assert index.names.nbytes == sum(len(os.path.relpath(path, tmp_path)) for path, _ in index)


@pytest.mark.parametrize(
    ("files", "message"),
    [([], "no class folders"), (["a/1.jpg", "b/notes.txt"], "/b: no images")],
)
def test_a_tree_without_images_is_named(tmp_path, files, message):
    make_tree(tmp_path, files)
    with pytest.raises(UserError, match=message):
        list_folder(tmp_path)
    with pytest.raises(UserError, match="folder does not exist"):
        list_folder(tmp_path / "missing")


@pytest.mark.parametrize(
    ("link", "target", "message"),
    [
        ("a/loop", "..", "a/loop: a symbolic link to .*, inside the data set"),  # what a careless `ln -s` makes
        ("a/again", ".", "a/again: a symbolic link to .*, inside the data set"),
        ("a/other", "../b", "a/other: a symbolic link to .*/b, inside the data set"),
        ("a/gone.jpg", "missing.jpg", "a/gone.jpg: a symbolic link to missing.jpg, which does not exist"),
        ("a/gone", "../../nowhere", "a/gone: a symbolic link to ../../nowhere, which does not exist"),
    ],
)
def test_a_link_that_would_list_images_twice_or_nowhere_is_named(tmp_path, link, target, message):
    """torchvision's walk follows every link: ``a/loop -> ..`` listed b's images again and again under a's label."""
    make_tree(tmp_path / "data", ["a/1.jpg", "b/2.jpg"])
    (tmp_path / "data" / link).symlink_to(target)
    for lister in (list_folder, image_files):
        with pytest.raises(UserError, match=message):
            lister(tmp_path / "data")


def test_a_link_to_a_folder_outside_the_data_set_is_followed(tmp_path):
    make_tree(tmp_path / "data", ["a/1.jpg", "b/2.jpg"])
    make_tree(tmp_path / "elsewhere", ["3.jpg", "4.jpg"])
    (tmp_path / "data/b/more").symlink_to(tmp_path / "elsewhere")
    assert [(os.path.relpath(path, tmp_path / "data"), label) for path, label in list_folder(tmp_path / "data")] == [
        ("a/1.jpg", 0),
        ("b/2.jpg", 1),
        ("b/more/3.jpg", 1),
        ("b/more/4.jpg", 1),
    ]


def test_an_unreadable_folder_is_named(tmp_path, monkeypatch):
    """os.walk skips a folder it cannot list without a word (its onerror is None). The tests run as root, whom no
    mode stops: the kernel's answer to another user is given by scandir."""
    make_tree(tmp_path / "data", ["a/1.jpg", "a/sub/2.jpg", "b/3.jpg"])
    scandir = os.scandir

    def refused(path):
        if str(path).endswith("a/sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr("data_pipeline.datasets.folder_index.os.scandir", refused)
    with pytest.raises(UserError, match="a/sub: cannot be listed \\(Permission denied\\); make it readable"):
        list_folder(tmp_path / "data")
