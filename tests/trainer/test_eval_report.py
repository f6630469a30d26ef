"""The evaluation report: what its numbers are (per class, confusions, calibration, flips and McNemar's test), and
that `residual eval --report` writes a page whose figures load in a browser."""

import csv
import math
import re
import shutil

import pytest
import torch
from checkout import QUICKSTART
from PIL import Image

from trainer.cli import main
from trainer.eval.counts import CALIBRATION_BINS, calibration_error
from trainer.eval.eval_report import compare, confused_pairs, mcnemar
from trainer.eval.evaluate import evaluate


def scored(rows: list[list[float]], labels: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.tensor(rows), torch.tensor(labels))]


def test_the_confusion_matrix_calibration_and_records_of_an_evaluation():
    """An identity model scores each "image" as given: the counts follow by hand. Row: the true class."""
    rows = [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.1, 0.1, 0.8]]
    batches = scored([[3 * x for x in row] for row in rows], [0, 2, 2, 2])  # logits: softmax gives the confidences
    result = evaluate(torch.nn.Identity(), batches, num_classes=3, device=torch.device("cpu"), predictions=True)
    confidences = (3 * torch.tensor(rows)).softmax(dim=1).max(dim=1).values
    assert result.confusion.tolist() == [[1, 0, 0], [0, 0, 0], [1, 1, 1]]
    assert result.predictions[:, :2].tolist() == [[0, 0], [2, 1], [2, 0], [2, 2]]
    assert result.predictions[:, 2].tolist() == pytest.approx(confidences.tolist())
    images, confidence, correct = result.calibration.T
    assert images.sum() == 4 and correct.sum() == result.correct1 == 2
    bins = (confidences * CALIBRATION_BINS).long()
    assert images.tolist() == torch.bincount(bins, minlength=CALIBRATION_BINS).tolist()
    right = torch.tensor([1.0, 0.0, 0.0, 1.0])  # images 0 and 3 share a bin, both right: the gaps add up alike
    assert calibration_error(result.calibration) == pytest.approx(float((right - confidences).abs().mean()))
    assert confused_pairs(result.confusion, ["a", "b", "c"], 5) == [(2, 0, 1), (2, 1, 1)]


def test_mcnemars_exact_test():
    assert mcnemar(0, 0) == 1.0 and mcnemar(3, 3) == 1.0
    assert mcnemar(0, 6) == pytest.approx(2 / 2**6)  # all six flips one way
    assert mcnemar(2, 10) == pytest.approx(2 * sum(math.comb(12, k) for k in range(3)) / 2**12)
    assert mcnemar(500, 600) < 0.01 < mcnemar(500, 540)


def test_flips_account_for_the_top1_difference_class_by_class():
    labels = [0, 0, 1, 1, 2, 2]
    a, b = (
        evaluate(
            torch.nn.Identity(),
            scored(torch.eye(3)[predicted].tolist(), labels),
            num_classes=3,
            device=torch.device("cpu"),
            predictions=True,
        )
        for predicted in ([0, 1, 1, 1, 2, 0], [0, 0, 1, 0, 2, 2])
    )
    comparison = compare(a, b, ["a", "b", "c"])
    assert (comparison.only_a, comparison.only_b) == (1, 2)  # right in A alone: image 3; in B alone: 1 and 5
    by_class = {name: (only_a, only_b) for name, _, _, _, only_a, only_b in comparison.rows}
    assert by_class == {"a": (0, 1), "b": (1, 0), "c": (0, 1)}
    assert comparison.only_b - comparison.only_a == b.correct1 - a.correct1
    assert comparison.rows[0][0] == "b"  # most worsened first


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, cifar_root):
    """A ResNet-20 after 2 and after 6 iterations of the quickstart on the small CIFAR set."""
    folder = tmp_path_factory.mktemp("trained")
    common = [f"data.root={cifar_root}", "data.synthesize=null", "data.workers=0", "data.batch_size=40"]
    argv = ["train", str(QUICKSTART), *common, "log.progress=false", f"train.output_dir={folder}", "eval.every=1000"]
    assert main([*argv, "train.iterations=6", "checkpoint.every=2"]) == 0
    checkpoints = sorted((folder / "quickstart" / "checkpoints").iterdir())
    return checkpoints[-2], checkpoints[-1]


def test_eval_report_of_one_checkpoint(tmp_path, capsys, cifar_root, two_checkpoints):
    out = tmp_path / "report"
    assert (
        main(["eval", str(two_checkpoints[1]), "--data", str(cifar_root), "--workers", "0", "--report", str(out)]) == 0
    )
    assert f"wrote {out / 'index.html'}" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    for name in ("confusion.png", "reliability.png", "pair-1.png", "classes.csv", "confusion.csv"):
        assert (out / name).is_file() and name in page
    with open(out / "classes.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 10 and sum(int(row["images"]) for row in rows) == 100
    assert [float(row["top1"]) for row in rows] == sorted(float(row["top1"]) for row in rows)  # worst first
    with open(out / "confusion.csv") as file:
        matrix = [[int(cell) for cell in row[1:]] for row in list(csv.reader(file))[1:]]
    assert sum(map(sum, matrix)) == 100 and sum(matrix[i][i] for i in range(10)) == sum(
        int(row["top1_correct"]) for row in rows
    )
    for key in ("iteration</td><td>6", "commit</td>", "ECE (15 bins)", "synthetic data"):
        assert key in page, key


@pytest.mark.slow
def test_eval_report_of_two_checkpoints_side_by_side(tmp_path, capsys, cifar_root, two_checkpoints):
    out = tmp_path / "report"
    argv = ["eval", *map(str, two_checkpoints), "--data", str(cifar_root), "--workers", "0", "--report", str(out)]
    assert main(argv) == 0
    page = (out / "index.html").read_text()
    assert (out / "A" / "index.html").is_file() and (out / "B" / "index.html").is_file()
    top1 = [float(value) for value in re.findall(r"top-1</td><td>([\d.]+)%</td><td>([\d.]+)%", page)[0]]
    only_a, only_b = map(int, re.search(r"Flips: (\d+) images right in A alone, (\d+) in B alone", page).groups())
    assert only_b - only_a == round(top1[1] - top1[0])  # 100 images: a point is an image
    assert re.search(r"McNemar's exact test .*: p = [\d.e-]+", page)
    code = main(["eval", *map(str, two_checkpoints), "--data", str(cifar_root), "--workers", "0"])
    assert code == 2 and "add --report DIR" in capsys.readouterr().err


def report_in_a_browser(tmp_path, cifar_root, checkpoint, *, figures: bool) -> tuple[str, int, int]:
    """The report of ``checkpoint`` (its figures removed unless ``figures``) as headless Chromium shows it: the DOM,
    and the pixels of the confusion matrix's dark blue (matplotlib's Blues) and of the reliability bars (#4c72b0)."""
    from test_monitoring import ARTIFACTS, chromium

    if shutil.which("chromium") is None:
        pytest.skip("no chromium: `apt-get install chromium` (tools/test.sh installs it)")
    out = tmp_path / "report"
    assert main(["eval", str(checkpoint), "--data", str(cifar_root), "--workers", "0", "--report", str(out)]) == 0
    for figure in [] if figures else out.glob("*.png"):
        figure.unlink()
    dom = chromium("--dump-dom", f"file://{out}/index.html", profile=tmp_path / "profile-dom").stdout
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / ("eval-report.png" if figures else "eval-report-without-figures.png")
    page = f"file://{out}/index.html"
    shot = chromium(f"--screenshot={screenshot}", "--window-size=1200,1600", page, profile=tmp_path / "profile")
    assert screenshot.exists(), shot.stderr[-2000:]
    pixels = Image.open(screenshot).convert("RGB").get_flattened_data()
    blues = sum(1 for r, g, b in pixels if r < 120 and g < 140 and b > 150)
    bars = sum(1 for r, g, b in pixels if abs(r - 0x4C) < 12 and abs(g - 0x72) < 12 and abs(b - 0xB0) < 12)
    return dom, blues, bars


@pytest.mark.slow
@pytest.mark.browser
def test_the_report_page_and_its_figures_load_in_a_browser(tmp_path, cifar_root, two_checkpoints):
    dom, blues, bars = report_in_a_browser(tmp_path, cifar_root, two_checkpoints[1], figures=True)
    assert "Top-1 per class, worst first" in dom and 'src="confusion.png"' in dom
    assert blues > 2000 and bars > 500, f"{blues} matrix and {bars} bar pixels: a figure did not load"
    # the check can fail: the same page without its figures draws none of their colours
    _, blues, bars = report_in_a_browser(tmp_path / "without", cifar_root, two_checkpoints[1], figures=False)
    assert blues < 2000 and bars < 500


@pytest.mark.slow
def test_training_logs_each_class_and_the_confusion_matrix_and_writes_its_report(tmp_path, cifar_root):
    """At each evaluation TensorBoard gets top-1 per class and the confusion image (up to 100 classes, or as
    log.per_class says); eval.report=true writes the final evaluation's report into the run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from training_runs import small_run

    from trainer.machine.distributed import LaunchEnv
    from trainer.training.loop import train

    result, run_log = train(small_run(tmp_path, cifar_root, "train.iterations=6", "eval.report=true"), LaunchEnv())
    events = EventAccumulator(str(run_log.tensorboard_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    per_class = sorted(tag for tag in events.Tags()["scalars"] if "/class/" in tag)
    assert len(per_class) == 10 and per_class[0] == "eval/center/class/c000_disc_solid"
    assert [event.step for event in events.Scalars(per_class[0])] == [5, 6]
    assert "eval/center/confusion" in events.Tags()["images"]
    correct = sum(round(events.Scalars(tag)[-1].value * 10) for tag in per_class)  # 10 images a class
    assert correct == result.correct1
    page = (tmp_path / "run" / "eval-report" / "index.html").read_text()
    assert "pair-1.png" in page and "iteration</td><td>6" in page

    train(small_run(tmp_path / "off", cifar_root, "train.iterations=5", "log.per_class=false"), LaunchEnv())
    events = EventAccumulator(str(tmp_path / "off" / "run" / "tensorboard"))
    events.Reload()
    assert not [tag for tag in events.Tags()["scalars"] if "/class/" in tag]
    assert events.Tags()["images"] == ["data/first_augmented_batch"]
    assert not (tmp_path / "off" / "run" / "eval-report").exists()
