"""`residual data get` without the internet: Debian's copy, a download source on loopback serving files made here,
a wrong checksum and an interrupted download (refused, nothing left in or beside DIR), the offline message."""

import gzip
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.datasets import open_dataset
from data_pipeline.errors import UserError
from data_pipeline.prepare.get import get_dataset
from data_pipeline.published import IDX_FILES, PUBLISHED, Download, PublishedDataSet
from tests.data_pipeline.test_idx import write_idx_set
from trainer.cli import main

DEBIAN_COPY = Path("/usr/share/datasets/fashion-mnist")


class Server:
    """A loopback HTTP server of ``files`` (name -> bytes); a name in ``cut`` is sent half, under a Content-Length
    of the whole, and the connection closed."""

    def __init__(self, files: dict[str, bytes], cut: tuple[str, ...] = ()) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                name = self.path.rsplit("/", 1)[-1]
                if name not in files:
                    self.send_error(404)
                    return
                body = files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if name in cut else body)
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def idx_files(tmp_path) -> dict[str, bytes]:
    write_idx_set(tmp_path / "made")
    return {name: (tmp_path / "made" / name).read_bytes() for name in IDX_FILES}


def leftovers(parent: Path) -> list[str]:
    return [path.name for path in parent.iterdir() if ".partial-" in path.name]


def get_served(monkeypatch, out: Path, files: dict[str, bytes], data_format: str, **published) -> tuple[str, str]:
    """`get_dataset` of a data set published (with these files' md5s) by a loopback server: where it said the files
    came from, and the server's address."""
    server = Server(files)
    downloads = tuple(Download(name, hashlib.md5(body).hexdigest()) for name, body in files.items())
    made = PublishedDataSet("made", data_format, (server.address,), downloads, **published)
    monkeypatch.setitem(PUBLISHED, "made", made)
    try:
        return get_dataset("made", out, system=out.parent / "no-copies"), server.address
    finally:
        server.close()


def archive_of(members: dict[str, bytes]) -> bytes:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive.getvalue()


@pytest.mark.skipif(
    not DEBIAN_COPY.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (tools/test.sh "
    "installs it: apt-get install dataset-fashion-mnist)",
)
def test_debians_copy_is_taken_when_installed(tmp_path, capsys):
    assert main(["data", "get", "fashion-mnist", str(tmp_path / "fm")]) == 0
    assert "Debian's package dataset-fashion-mnist" in capsys.readouterr().out
    for name in IDX_FILES:
        copied, installed = (gzip.decompress((folder / name).read_bytes()) for folder in (tmp_path / "fm", DEBIAN_COPY))
        assert copied == installed
    test = open_dataset(tmp_path / "fm", "idx", train=False)
    assert len(test) == 10_000 and test.classes[0] == "T-shirt/top" and test.classes[9] == "Ankle boot"


def test_a_download_is_verified_then_placed(tmp_path, idx_files, monkeypatch):
    origin, address = get_served(monkeypatch, tmp_path / "out", idx_files, "idx", classes=("a",) * 10)
    assert origin.startswith(address) and origin.endswith("(md5 verified)")
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").glob("*.gz")} == idx_files
    assert len(open_dataset(tmp_path / "out", "idx", train=True)) == 64
    assert leftovers(tmp_path) == []


def test_cifar_archives_are_unpacked_to_the_batches(tmp_path, cifar_root, monkeypatch):
    members = {f"cifar-10-batches-py/{path.name}": path.read_bytes() for path in sorted(cifar_root.iterdir())}
    members["elsewhere/test_batch"] = b"a member outside the folder"
    get_served(
        monkeypatch, tmp_path / "out", {"c.tar.gz": archive_of(members)}, "cifar", archive_folder="cifar-10-batches-py"
    )
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(p.name for p in cifar_root.iterdir())
    assert len(open_dataset(tmp_path / "out", "cifar", train=False)) == 100


def test_a_wrong_checksum_is_refused_and_nothing_is_written(tmp_path, idx_files, capsys):
    server = Server(idx_files)  # not Zalando's bytes: their md5 is not the published one
    try:
        status = main(["data", "get", "fashion-mnist", str(tmp_path / "out"), "--mirror", server.address])
    finally:
        server.close()
    error = capsys.readouterr().err.strip()
    assert status == 2 and len(error.splitlines()) == 1
    assert (
        "train-images-idx3-ubyte.gz: md5 " in error and "the source publishes 8d4fb7e6c68d591d4c3dfef9ec88bf0d" in error
    )
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_an_interrupted_download_leaves_nothing_half_written(tmp_path, idx_files, monkeypatch):
    server = Server(idx_files, cut=("t10k-images-idx3-ubyte.gz",))  # the third of four files breaks off
    files = tuple(Download(name, hashlib.md5(idx_files[name]).hexdigest()) for name in IDX_FILES)
    monkeypatch.setitem(PUBLISHED, "made", PublishedDataSet("made", "idx", (server.address,), files))
    (tmp_path / "out").mkdir()  # an empty folder is a valid DIR, and stays as it was
    try:
        with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz: the connection ended after"):
            get_dataset("made", tmp_path / "out", system=tmp_path / "no-copies")
    finally:
        server.close()
    assert list((tmp_path / "out").iterdir()) == [] and leftovers(tmp_path) == []


def test_offline_without_a_copy_names_both_ways_in_one_line(tmp_path, capsys):
    nothing_listens = "http://127.0.0.1:9/"  # port 9, discard
    status = main(
        ["data", "get", "fashion-mnist", str(tmp_path / "out"), "--system", str(tmp_path), "--mirror", nothing_listens]
    )
    error = capsys.readouterr().err.strip()
    assert status == 2 and len(error.splitlines()) == 1
    assert "apt-get install dataset-fashion-mnist" in error and "fashion-mnist.s3-website" in error
    assert not (tmp_path / "out").exists()


def test_a_folder_with_files_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not an empty folder"):
        get_dataset("fashion-mnist", tmp_path / "out")
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_cifar100s_layout_is_read_with_its_fine_labels(tmp_path, monkeypatch):
    """CIFAR-100's archive: one `train` and one `test` file, the labels under b"fine_labels", names in `meta`."""
    rng = np.random.default_rng(0)
    members = {}
    for name, count in (("train", 300), ("test", 100)):
        labels = {b"fine_labels": [i % 100 for i in range(count)], b"coarse_labels": [i % 20 for i in range(count)]}
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), **labels}
        members[f"cifar-100-python/{name}"] = pickle.dumps(batch)
    members["cifar-100-python/meta"] = pickle.dumps(
        {b"fine_label_names": [f"class{i:02d}".encode() for i in range(100)]}
    )
    get_served(
        monkeypatch,
        tmp_path / "out",
        {"cifar-100-python.tar.gz": archive_of(members)},
        "cifar",
        archive_folder="cifar-100-python",
    )
    train, test = (open_dataset(tmp_path / "out", "cifar", train=split) for split in (True, False))
    assert len(train) == 300 and len(test) == 100 and train.classes[99] == "class99" and len(test.classes) == 100
    assert test.labels[:3].tolist() == [0, 1, 2] and int(train.labels.max()) == 99
