"""``residual data get NAME DIR``: a published data set, from Debian's package where it is installed, else from the
data set's official source, verified against the checksum that source publishes before anything is written under
DIR. The files are gathered in a hidden folder beside DIR, opened as the trainer opens them, then renamed to DIR
in one step: an interrupted download, a wrong checksum or a damaged file leave DIR as it was.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from data_pipeline.errors import UserError
from data_pipeline.published import PUBLISHED, Download, PublishedDataSet

SYSTEM_DATASETS = Path("/usr/share/datasets")  # where Debian's dataset-* packages put their files
CHUNK = 1 << 20


def get_dataset(name: str, out: Path, *, mirror: str | None = None, system: Path = SYSTEM_DATASETS) -> str:
    """Put data set ``name`` in ``out``; returns where it came from. ``mirror`` replaces the official addresses;
    ``system`` is where installed packages put their copies."""
    if name not in PUBLISHED:
        raise UserError(f"{name}: not a data set `residual data get` knows ({', '.join(PUBLISHED)})")
    published = PUBLISHED[name]
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; give another DIR or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        origin = gather(published, staging, mirror=mirror, system=system, out=out)
        if published.classes:
            (staging / "classes.txt").write_text("\n".join(published.classes) + "\n")
        check_readable(published, staging)
        if out.exists():
            out.rmdir()
        staging.chmod(0o755)  # mkdtemp's folder is private
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return origin


def gather(published: PublishedDataSet, staging: Path, *, mirror: str | None, system: Path, out: Path) -> str:
    local = system / published.name
    if mirror is None and all((local / download.name).is_file() for download in published.files):
        for download in published.files:  # Debian's files are compressed again: their md5 is not the source's
            shutil.copyfile(local / download.name, staging / download.name)
        return f"{local} (Debian's package {published.debian_package})"
    used = []
    for download in published.files:
        addresses = [f"{mirror.rstrip('/')}/{download.name}"] if mirror else published.addresses(download)
        used.append(fetch_verified(addresses, download, staging / download.name, published, system, out))
        if published.archive_folder is not None:
            extract_folder(staging / download.name, published.archive_folder, staging)
            (staging / download.name).unlink()
    return ", ".join(used) + " (md5 verified)"


def fetch_verified(
    addresses: list[str], download: Download, target: Path, published: PublishedDataSet, system: Path, out: Path
) -> str:
    """The first address that answers, streamed to ``target`` and checked against its md5; that address."""
    failures = []
    for address in addresses:
        try:
            md5 = stream(address, target)
        except (urllib.error.URLError, OSError, ValueError) as error:  # ValueError: a malformed address
            target.unlink(missing_ok=True)
            failures.append(f"{address}: {getattr(error, 'reason', error)}")
            continue
        if md5 != download.md5:
            raise UserError(f"{address}: md5 {md5}, the source publishes {download.md5}; nothing was written")
        return address
    raise UserError(
        f"{published.name}: cannot download ({'; '.join(failures)}) and no local copy in "
        f"{system / published.name}: {ways_to_get(published, out)}"
    )


def ways_to_get(published: PublishedDataSet, out: Path) -> str:
    files = ", ".join(download.name for download in published.files)
    if published.archive_folder is None:
        by_hand = f"put the files {files} from {published.mirrors[0]} in {out}"
    else:
        by_hand = f"unpack {published.archive_folder}/ of {published.mirrors[0]}{files} as {out}"
    if published.debian_package:
        return f"install Debian's package (apt-get install {published.debian_package}) or {by_hand}"
    return f"run this where {published.mirrors[0]} can be reached, or {by_hand}"


def stream(address: str, target: Path) -> str:
    """Download ``address`` to ``target``; its md5. A connection that ends before Content-Length raises."""
    digest = hashlib.md5()
    with urllib.request.urlopen(address, timeout=60) as response, open(target, "wb") as file:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, leave=False, disable=None) as bar:
            try:
                while chunk := response.read(CHUNK):
                    file.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            except http.client.IncompleteRead as error:
                file.write(error.partial)
        if total is not None and file.tell() != total:
            raise OSError(f"the connection ended after {file.tell()} of {total} bytes")
    return digest.hexdigest()


def extract_folder(archive: Path, folder: str, out: Path) -> None:
    """The regular files directly in ``folder`` of a tar.gz, into ``out`` (no other path is written)."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parent, _, name = member.name.rpartition("/")
            if member.isfile() and parent == folder and name:
                with tar.extractfile(member) as source, open(out / name, "wb") as file:
                    shutil.copyfileobj(source, file)


def check_readable(published: PublishedDataSet, staging: Path) -> None:
    from data_pipeline.datasets import open_dataset

    for train in (True, False):
        open_dataset(staging, published.format, train=train)
