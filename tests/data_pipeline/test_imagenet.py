"""`residual data prepare-imagenet` from both kinds of ground truth, on a stand-in of ILSVRC2012's val folder."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
from checkout import RESIDUAL
from scipy.io import savemat

WNIDS = {1: "n01440764", 2: "n01443537", 3: "n01484850"}  # ILSVRC2012_ID -> wnid, as in meta.mat
TRUTH = [2, 1, 3, 2, 2, 1]  # the class of val image 1, 2, ...


@pytest.fixture
def val_images(tmp_path) -> Path:
    folder = tmp_path / "ILSVRC2012_img_val"
    folder.mkdir()
    for number in range(1, len(TRUTH) + 1):
        (folder / f"ILSVRC2012_val_{number:08d}.JPEG").write_bytes(f"image {number}".encode())
    return folder


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RESIDUAL, "data", "prepare-imagenet", *args], capture_output=True, text=True, timeout=60)


def sorted_out(out: Path) -> dict[str, list[str]]:
    return {folder.name: sorted(path.name for path in folder.iterdir()) for folder in sorted(out.iterdir())}


def expected() -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for number, ident in enumerate(TRUTH, start=1):
        result.setdefault(WNIDS[ident], []).append(f"ILSVRC2012_val_{number:08d}.JPEG")
    return dict(sorted(result.items()))


def test_from_the_devkit(tmp_path, val_images):
    truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("\n".join(map(str, TRUTH)) + "\n")
    synsets = np.array([(ident, wnid) for ident, wnid in WNIDS.items()], dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    savemat(tmp_path / "meta.mat", {"synsets": synsets})
    result = prepare(str(val_images), str(tmp_path / "val"), "--devkit", str(truth), str(tmp_path / "meta.mat"))
    assert result.returncode == 0, result.stderr
    assert sorted_out(tmp_path / "val") == expected()


@pytest.mark.slow
def test_from_the_kaggle_solution_and_a_missing_image_is_named(tmp_path, val_images):
    solution = tmp_path / "LOC_val_solution.csv"
    rows = [f"ILSVRC2012_val_{n:08d},{WNIDS[i]} 10 20 30 40" for n, i in enumerate(TRUTH, start=1)]
    solution.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    result = prepare(str(val_images), str(tmp_path / "val"), "--solution", str(solution), "--mode", "copy")
    assert result.returncode == 0, result.stderr
    assert sorted_out(tmp_path / "val") == expected()
    (val_images / "ILSVRC2012_val_00000004.JPEG").unlink()
    result = prepare(str(val_images), str(tmp_path / "again"), "--solution", str(solution))
    assert result.returncode == 2
    assert "1 labels without an image (first: ILSVRC2012_val_00000004)" in result.stderr
