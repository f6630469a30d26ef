import shutil

from data_pipeline.prepare.verify import verify_images


def test_verify_lists_every_undecodable_image(tmp_path, imagefolder_root):
    root = tmp_path / "set"
    shutil.copytree(imagefolder_root, root)
    good = sorted((root / "train").rglob("*.JPEG"))
    good[0].write_bytes(b"not an image at all")
    good[1].write_bytes(good[1].read_bytes()[:200])  # truncated mid-scan
    (root / "train" / "notes.txt").write_text("not an image, not checked")
    checked, failures = verify_images(root, workers=2)
    assert checked == 68
    assert [path for path, _ in failures] == [good[0], good[1]]
    assert "UnidentifiedImageError" in failures[0][1] and "truncated" in failures[1][1].lower()


def test_verify_passes_a_clean_folder(imagefolder_root):
    assert verify_images(imagefolder_root, workers=1) == (68, [])
