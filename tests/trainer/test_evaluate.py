"""The paper's test protocols against independent references, exact counts, and the checkpoint formats."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torchvision
from checkout import RESIDUAL, ROOT
from PIL import Image
from torchvision import transforms as v1
from torchvision.transforms import v2

from data_pipeline.augment.transforms import ten_crop
from data_pipeline.config import DataConfig
from data_pipeline.datasets import ImageFolderDataset
from data_pipeline.errors import UserError
from data_pipeline.prepare.synthetic import render_sample
from data_pipeline.torch_loader import build_eval_loader
from trainer.eval.counts import EvalResult, topk_hits
from trainer.eval.evaluate import ViewScorer, evaluate
from trainer.eval.evaluate_checkpoint import EvalRequest, evaluate_checkpoint
from trainer.machine.distributed import LaunchEnv
from trainer.models import create_model

CONFIG = DataConfig(workers=0, val_resize=80, crop_size=64, scale_min=64, scale_max=96)


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory) -> Path:
    """3 classes of val images in three sizes and aspects, 7 images: shapes differ within a batch."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    sizes = [(96, 80), (80, 112), (100, 100)]
    for index in range(7):
        folder = root / "val" / f"class{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_sample(index % 3, sizes[index % 3], rng)).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=3).eval()


def scores_of(model, loader) -> torch.Tensor:
    scorer = ViewScorer(model, device=torch.device("cpu"), precision="fp32", channels_last=False)
    with torch.no_grad():
        return torch.cat([scorer(views) for views, _ in loader])


def test_ten_crop_equals_torchvision():
    image = torch.rand(3, 80, 101)
    assert torch.equal(ten_crop(image, 64), torch.stack(v2.TenCrop(64)(image)))


def test_tencrop_equals_a_torchvision_tencrop_reference(mixed_sizes, model):
    dataset = ImageFolderDataset(mixed_sizes / "val")
    loader = build_eval_loader(dataset, CONFIG, rank=0, world_size=1, batch_per_rank=3, protocol="tencrop", scales=())
    ours = scores_of(model, loader)
    # The same resize of the uint8 image (v1 and v2 round it differently); the crops, flips and mean are v1's.
    reference_views = v1.Compose(
        [v2.Resize(80), v1.ConvertImageDtype(torch.float32), v1.Normalize(CONFIG.mean, CONFIG.std), v1.TenCrop(64)]
    )
    reference = []
    with torch.no_grad():
        for index in range(len(dataset)):
            crops = reference_views(dataset[index][0])
            reference.append(torch.stack([model(crop[None]).softmax(1)[0] for crop in crops]).mean(0))
    reference = torch.stack(reference)
    assert torch.allclose(ours, reference, atol=1e-5)
    labels = torch.tensor([label for _, label in dataset.samples])
    assert [int(h.sum()) for h in topk_hits(ours, labels, (1, 2))] == [
        int(h.sum()) for h in topk_hits(reference, labels, (1, 2))
    ]


def test_multiscale_equals_a_per_image_loop(mixed_sizes, model):
    dataset = ImageFolderDataset(mixed_sizes / "val")
    scales = (64, 72, 100)
    loader = build_eval_loader(
        dataset, CONFIG, rank=0, world_size=1, batch_per_rank=4, protocol="multiscale", scales=scales
    )
    ours = scores_of(model, loader)
    normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(CONFIG.mean, CONFIG.std)])
    reference = []
    with torch.no_grad():
        for index in range(len(dataset)):
            image = normalize(dataset[index][0])
            views = []
            for scale in scales:
                resized = v2.functional.resize(image, scale, antialias=True)
                assert min(resized.shape[-2:]) == scale
                views += [model(resized[None]).softmax(1)[0], model(resized.flip(-1)[None]).softmax(1)[0]]
            reference.append(torch.stack(views).mean(0))
    assert torch.allclose(ours, torch.stack(reference), atol=1e-5)


def test_counts_per_class_and_totals():
    result = evaluate(
        torch.nn.Identity(),
        [(torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]]), torch.tensor([0, 2, 2]))],
        num_classes=3,
        device=torch.device("cpu"),
    )
    assert (result.correct1, result.count) == (1, 3)
    assert result.per_class == ((1, 1, 1), (0, 0, 0), (0, 2, 2))
    assert EvalResult(1, 3, 3).as_dict()["top1_error"] == pytest.approx(2 / 3)


def save_training_checkpoint(path: Path, model: torch.nn.Module, classes: list[str]) -> None:
    config = {
        "model": {"name": "resnet18", "num_classes": len(classes)},
        "data": {"val_resize": 80, "crop_size": 64, "scale_min": 64, "scale_max": 96},
    }
    torch.save({"model_name": "resnet18", "model": model.state_dict(), "config": config, "classes": classes}, path)


def test_checkpoint_dcp_and_state_dict_agree(tmp_path, mixed_sizes, model):
    classes = ["class0", "class1", "class2"]
    save_training_checkpoint(tmp_path / "ckpt.pt", model, classes)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    dcp.save(state, checkpoint_id=tmp_path / "dcp")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    results = []
    for path, name in ((tmp_path / "ckpt.pt", None), (tmp_path / "dcp", None), (tmp_path / "plain.pt", "resnet18")):
        request = EvalRequest(path, mixed_sizes, protocol="center", batch_size=4, model=name, workers=0)
        results.append(evaluate_checkpoint(request, LaunchEnv())[0])
    counts = [(r.correct1, r.correct5, r.count, r.per_class) for r in results]
    assert counts[0] == counts[1] == counts[2] and results[0].count == 7


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "resnet34"}, "a checkpoint of 'resnet18', not of --model 'resnet34'"),
        ({"protocol": "multiscale", "scales": (64, 32)}, r"--scales: \[32\] smaller than the 64 crop"),
        ({"batch_size": 3}, "--batch 3: not divisible by the world size 2"),
    ],
)
def test_bad_requests(tmp_path, mixed_sizes, model, change, message):
    save_training_checkpoint(tmp_path / "ckpt.pt", model, ["class0", "class1", "class2"])
    request = EvalRequest(tmp_path / "ckpt.pt", mixed_sizes, workers=0, **change)
    with pytest.raises(UserError, match=message):
        evaluate_checkpoint(request, LaunchEnv(world_size=2))


def test_data_with_other_classes_than_the_checkpoints(tmp_path, mixed_sizes, model):
    save_training_checkpoint(tmp_path / "ckpt.pt", model, ["cat", "class1", "dog"])
    with pytest.raises(UserError, match="not the 3 the checkpoint was trained on .*'cat' vs 'class0'"):
        evaluate_checkpoint(EvalRequest(tmp_path / "ckpt.pt", mixed_sizes, workers=0), LaunchEnv())


def test_weights_of_another_model(tmp_path, mixed_sizes):
    torch.save(torchvision.models.resnet34(num_classes=3).state_dict(), tmp_path / "resnet34.pt")
    with pytest.raises(UserError, match="does not fit resnet18: 96 unexpected keys"):
        evaluate_checkpoint(EvalRequest(tmp_path / "resnet34.pt", mixed_sizes, model="resnet18"), LaunchEnv())
    with pytest.raises(UserError, match="pass --model"):
        evaluate_checkpoint(EvalRequest(tmp_path / "resnet34.pt", mixed_sizes), LaunchEnv())


def test_cifar_is_tested_on_the_original_image(tmp_path, cifar_root):
    torch.save(create_model("resnet20").state_dict(), tmp_path / "r20.pt")
    with pytest.raises(UserError, match="tested on the single original image"):
        evaluate_checkpoint(
            EvalRequest(tmp_path / "r20.pt", cifar_root, model="resnet20", protocol="tencrop"), LaunchEnv()
        )
    result, _, _ = evaluate_checkpoint(
        EvalRequest(tmp_path / "r20.pt", cifar_root, model="resnet20", workers=0), LaunchEnv()
    )
    assert result.count == 100


@pytest.mark.slow
def test_torchvision_weights_file_from_the_command_line(tmp_path, mixed_sizes):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "resnet18.pth")
    command = [
        RESIDUAL,
        "eval",
        str(tmp_path / "resnet18.pth"),
        "--data",
        str(mixed_sizes),
        "--model",
        "resnet18",
        "--protocol",
        "tencrop",
        "--batch",
        "4",
        "--per-class",
        "--workers",
        "0",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split() == [
        "protocol",
        "images",
        "top-1",
        "top-5",
        "top-1",
        "err",
        "top-5",
        "err",
        "images/s",
    ]
    report = json.loads((tmp_path / "resnet18.pth.eval-tencrop.json").read_text())
    assert report["count"] == 7 and report["protocol"] == "tencrop"
    assert sum(row["count"] for row in report["per_class"]) == 7
    command[command.index("--model") + 1] = "resnet50"
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "does not fit resnet50" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_count_every_image_once(tmp_path, mixed_sizes, model):
    """7 images, 2 ranks, 2 per rank per step: shares of 3 and 4, the last batches short; nothing padded."""
    save_training_checkpoint(tmp_path / "ckpt.pt", model, ["class0", "class1", "class2"])
    common = [
        "eval",
        str(tmp_path / "ckpt.pt"),
        "--data",
        str(mixed_sizes),
        "--batch",
        "4",
        "--workers",
        "0",
        "--per-class",
    ]
    single = subprocess.run(
        [RESIDUAL, *common, "--out", str(tmp_path / "single.json"), "--report", str(tmp_path / "single")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29518",
        "-m",
        "trainer.cli",
    ]
    double = subprocess.run(
        [*torchrun, *common, "--out", str(tmp_path / "double.json"), "--report", str(tmp_path / "double")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("single", "double"))
    assert two["count"] == 7 and two["correct1"] == one["correct1"] and two["per_class"] == one["per_class"]
    # the report's counts too: the confusion matrix and the calibration bins summed over the ranks, each image's
    # record gathered in the data set's order (the strips of the same pairs)
    for name in ("confusion.csv", "classes.csv"):
        assert (tmp_path / "double" / name).read_text() == (tmp_path / "single" / name).read_text()
    assert sum(row[0] for row in two["calibration"]) == 7
    assert sum(two["calibration"], []) == pytest.approx(sum(one["calibration"], []), abs=1e-4)
    assert sorted(p.name for p in (tmp_path / "double").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir()
    )
