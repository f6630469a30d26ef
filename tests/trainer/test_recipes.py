"""The pieces of the modern recipes in the trainer: LARS, Mixup/CutMix, label smoothing, the EMA of the weights."""

import math
import re

import numpy as np
import pytest
import torch
from checkout import ROOT
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from training_runs import RECIPES, metrics, small_run

from trainer.config import EmaConfig, LossConfig, OptimConfig
from trainer.eval.weights import export_state_dict, read_weights
from trainer.machine.distributed import LaunchEnv
from trainer.models import create_model
from trainer.recipe.ema import WeightAverage
from trainer.recipe.mixing import BatchMixer, cutmix_box, dominant_labels, mixed_targets
from trainer.recipe.optim import LARS, build_optimizer
from trainer.training.checkpoint.files import latest_checkpoint, load_checkpoint
from trainer.training.loop import train


def two_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


@pytest.mark.parametrize("gathered", [False, True], ids=["per-tensor-ratios", "gathered-ratios"])
def test_lars_updates_as_computed_by_hand(gathered, monkeypatch):
    """Two steps of MLPerf's LARS on a two-layer model, weights with the trust ratio and decay, biases (excluded)
    without either, against the formula written out per tensor; with the trust ratios applied as a CPU applies
    them (per tensor) and as a GPU does (gathered)."""
    monkeypatch.setattr("trainer.recipe.optim.gathers_scales", lambda device: gathered)
    model, eta, decay, momentum, lr = two_layers(), 0.001, 5e-5, 0.9, 2.0
    config = OptimConfig(
        name="lars", lr=lr, momentum=momentum, weight_decay=decay, trust_coefficient=eta, no_decay_bn_bias=True
    )
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, LARS)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    velocity = {name: torch.zeros_like(p) for name, p in expected.items()}
    inputs, targets = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1] * 4)
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        for name, p in model.named_parameters():
            w, g = expected[name], p.grad
            if p.ndim > 1:
                ratio = eta * w.norm() / (g.norm() + decay * w.norm())
                step = lr * ratio * (g + decay * w)
            else:
                step = lr * g
            velocity[name] = momentum * velocity[name] + step
            expected[name] = w - velocity[name]
        optimizer.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gathered", [False, True], ids=["per-tensor-ratios", "gathered-ratios"])
def test_lars_step_is_cancelled_on_the_device(gathered, monkeypatch):
    monkeypatch.setattr("trainer.recipe.optim.gathers_scales", lambda device: gathered)
    model = two_layers()
    optimizer = build_optimizer(model, OptimConfig(name="lars", lr=1.0))
    model(torch.randn(2, 4)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    next(model.parameters()).grad.fill_(math.nan)
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    del optimizer.found_inf
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(not optimizer.state[p]["momentum_buffer"].any() for p in model.parameters())


class LaunchCounter(TorchDispatchMode):
    """What a step would launch on a GPU, read on the CPU: each op that reaches a kernel, and for each foreach op
    whether CUDA's one-launch route takes it (``can_use_fast_route``: the lists' tensors pairwise of one size and
    stride, and dense, as ``empty_like`` keeps only a dense tensor's strides). Off that route, a foreach op
    launches one kernel per tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.per_tensor: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and not name.startswith("_record_function"):  # neither launches a kernel
            self.ops.append(name)
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        if (
            name.startswith("_foreach")
            and not name.startswith("_foreach_norm")
            and any(
                (x.shape, x.stride()) != (y.shape, y.stride()) or x.stride() != torch.empty_like(x).stride()
                for other in lists[1:]
                for x, y in zip(lists[0], other, strict=True)
            )
        ):
            self.per_tensor.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("nesterov", [False, True])
def test_a_lars_step_launches_the_same_few_kernels_for_any_depth(nesterov):
    """LARS's step on ResNet-20 and on ResNet-110 (59 and 329 parameter tensors), cancellable on the device: the
    same ops, none of them once per tensor. The per-tensor trust ratios and the ``found_inf`` mask once took
    about six ops per tensor (about a thousand launches a step for ResNet-50). On the meta device, which takes
    the GPU's route (``gathers_scales``) and computes nothing."""

    def step_ops(name: str) -> list[str]:
        model = create_model(name).to("meta", memory_format=torch.channels_last)
        optimizer = build_optimizer(model, OptimConfig(name="lars", no_decay_bn_bias=True, nesterov=nesterov))
        images = torch.empty(2, 3, 32, 32, device="meta").to(memory_format=torch.channels_last)
        model(images).sum().backward()
        optimizer.found_inf = torch.zeros((), device="meta")
        with LaunchCounter() as counter:
            optimizer.step()
        assert counter.per_tensor == [], counter.per_tensor
        return counter.ops

    shallow, deep = step_ops("resnet20"), step_ops("resnet110")
    assert shallow == deep and len(deep) < 60, (len(shallow), len(deep), deep)  # 49: 25 and 24 for the two groups


def test_mixup_targets_and_dominant_labels():
    labels = torch.tensor([0, 1, 2, 3])
    targets = mixed_targets(labels, 0.7, 4)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert targets[1].tolist() == pytest.approx([0.3, 0.7, 0, 0])  # image 1 takes 0.3 of image 0 (rolled by one)
    assert targets[0].tolist() == pytest.approx([0.7, 0, 0, 0.3])
    assert dominant_labels(labels, 0.7).tolist() == [0, 1, 2, 3]
    assert dominant_labels(labels, 0.3).tolist() == [3, 0, 1, 2]


@pytest.mark.parametrize("lam", [0.1, 0.5, 0.9])
def test_the_cutmix_box_area_is_one_minus_lambda(lam):
    """Centred, the box is (1 - lambda) of the image to the pixel's rounding; at a corner, clipped, and the labels
    weigh the clipped area."""
    top, bottom, left, right = cutmix_box(lam, 224, 224, (0.5, 0.5))
    assert (bottom - top) * (right - left) / 224**2 == pytest.approx(1 - lam, abs=2 * 2 / 224)
    top, bottom, left, right = cutmix_box(lam, 224, 224, (0.0, 0.0))
    assert (top, left) == (0, 0) and (bottom - top) * (right - left) <= (1 - lam) * 224**2 / 4 + 224


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_a_mixed_batch_is_the_blend_its_targets_say(kind):
    config = LossConfig(mixup_alpha=0.2 if kind == "mixup" else 0.0, cutmix_alpha=1.0 if kind == "cutmix" else 0.0)
    mixer = BatchMixer(config, num_classes=4, seed=0, rank=0)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()  # image i is all i
    labels = torch.tensor([0, 1, 2, 3])
    mixed, targets, dominant = mixer(images, labels, iteration=5)
    lam = targets[1, 1].item()  # image 1's own share
    share_own = (mixed[1] == 1).float().mean().item() if kind == "cutmix" else None
    if kind == "mixup":
        torch.testing.assert_close(mixed[1], torch.full((3, 8, 8), lam * 1 + (1 - lam) * 0))
    else:
        assert share_own == pytest.approx(lam)  # the box's area weighs the labels
    assert dominant.tolist() == (labels if lam >= 0.5 else labels.roll(1)).tolist()
    again = mixer(images, labels, iteration=5)
    assert torch.equal(again[0], mixed) and torch.equal(again[1], targets)  # a function of (seed, iteration, rank)


def test_switch_prob_chooses_cutmix_that_often():
    mixer = BatchMixer(LossConfig(mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.25), num_classes=2, seed=0, rank=0)
    images, labels = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 16, 16).contiguous(), torch.tensor([0, 1])
    cutmix = 0
    for iteration in range(400):
        mixed = mixer(images, labels, iteration)[0]
        cutmix += int(bool(((mixed == 0) | (mixed == 1)).all()))  # pasted pixels are whole, blended ones are not
    assert cutmix / 400 == pytest.approx(0.25, abs=0.07)


def test_the_ema_averages_as_its_formula():
    model = two_layers()
    ema = WeightAverage(model, EmaConfig(decay=0.9, every=2))
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(1)  # not an EMA iteration
    assert all(torch.equal(ema.average[n], start[n]) for n in start)
    ema.update(2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ema.average[name], 0.9 * start[name] + 0.1 * p.detach())
    with ema.applied():
        assert all(torch.equal(p, ema.average[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p, start[n] + 1) for n, p in model.named_parameters())


# (A cosine schedule's rates depend on train.iterations, which the resume below changes: the schedules' tests show
# their rates are functions of the iteration alone.)
EMA = (
    "ema.decay=0.8",
    "ema.every=2",
    "eval.weights=both",
    "loss.label_smoothing=0.1",
    "loss.mixup_alpha=0.2",
    "loss.cutmix_alpha=1.0",
)


@pytest.mark.slow
def test_ema_and_mixing_resume_bit_exact(tmp_path, cifar_root):
    """16 iterations straight == 8, stop, resume, 8 more, with the EMA, Mixup/CutMix and label smoothing: the
    weights, the average and every logged figure."""
    common = (*EMA, "checkpoint.every=4", "eval.every=4")
    train(small_run(tmp_path / "a", cifar_root, "train.iterations=16", *common), LaunchEnv())
    train(small_run(tmp_path / "b", cifar_root, "train.iterations=8", *common), LaunchEnv())
    train(small_run(tmp_path / "b", cifar_root, "train.iterations=16", *common), LaunchEnv())
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / run / "run")) for run in "ab")
    for name, tensor in a["ema"].items():
        assert torch.equal(tensor, b["ema"][name]), name
    assert not all(torch.equal(a["ema"][n], a["model"][n]) for n in a["ema"])  # an average, not the weights
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert metrics(tmp_path / "a/run", "train") == metrics(tmp_path / "b/run", "train")
    evals = metrics(tmp_path / "a/run", "eval")
    assert evals == metrics(tmp_path / "b/run", "eval")
    assert [record["protocol"] for record in evals[:2]] == ["center", "center-ema"]  # eval.weights=both


@pytest.mark.slow
def test_eval_and_export_choose_the_ema(tmp_path, cifar_root):
    train(small_run(tmp_path, cifar_root, "train.iterations=6", *EMA), LaunchEnv())
    checkpoint = latest_checkpoint(tmp_path / "run")
    raw, ema = read_weights(checkpoint), read_weights(checkpoint, "ema")
    assert not torch.equal(raw.state_dict["fc.weight"], ema.state_dict["fc.weight"])
    assert torch.equal(ema.state_dict["fc.weight"], load_checkpoint(checkpoint)["ema"]["fc.weight"])
    exported = export_state_dict(checkpoint, tmp_path / "ema.pt", "ema")
    assert torch.equal(
        torch.load(tmp_path / "ema.pt", weights_only=True)["fc.weight"], exported.state_dict["fc.weight"]
    )
    from trainer.eval.evaluate_checkpoint import EvalRequest, evaluate_checkpoint

    results = {
        which: evaluate_checkpoint(EvalRequest(checkpoint, cifar_root, weights=which, workers=0), LaunchEnv())[0]
        for which in ("raw", "ema")
    }
    final = [r for r in metrics(tmp_path / "run", "eval") if r["iteration"] == 6]
    assert {r["protocol"]: r["correct1"] for r in final} == {
        "center": results["raw"].correct1,
        "center-ema": results["ema"].correct1,
    }


def test_label_smoothing_is_the_loss_of_smoothed_targets():
    from trainer.training.step import Stepper

    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2, 3, 4])
    smoothed = torch.full((4, 10), 0.01) + 0.9 * nn.functional.one_hot(labels, 10)
    expected = -(smoothed * logits.log_softmax(1)).sum(1).mean()
    assert Stepper.__dataclass_fields__["label_smoothing"].default == 0.0
    assert nn.functional.cross_entropy(logits, labels, label_smoothing=0.1).item() == pytest.approx(expected.item())


def test_repeated_augmentation_deals_the_copies_to_different_ranks():
    from data_pipeline.sampling import ShardedEpochSampler

    samplers = [ShardedEpochSampler(64, global_batch=16, rank=r, world_size=4, seed=0, repeats=4) for r in range(4)]
    batches = [list(s) for s in samplers]
    for position in range(0, 16, 4):
        firsts = [batches[r][position][0] for r in range(4)]
        assert len(set(firsts)) == 1  # one image, on each of the four ranks
        assert len({batches[r][position][1] for r in range(4)}) == 4  # with four different augmentations
    indices = np.array([index for rank in batches for index, _ in rank])
    assert len(indices) == 64 and len(set(indices.tolist())) == 16  # an epoch of 64 samples: 16 images x 4


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_config_runs_three_steps(tmp_path, cifar_root, imagefolder_root, recipe):
    """The recipe as written (its crops, test-time resolution, augmentations, optimizer, schedule, EMA), on the
    small fixtures: ImageNet recipes with 8 images a step on the ImageFolder set, the CIFAR one on the CIFAR set."""
    from trainer.config import load_config

    data = (
        [f"data.root={cifar_root}"]
        if recipe.startswith("cifar")
        else [f"data.root={imagefolder_root}", "model.num_classes=4", "data.ra_reps=2"]
    )
    overrides = [
        *data,
        "data.batch_size=8",
        "data.workers=0",
        "train.epochs=null",
        "train.iterations=3",
        "eval.batch_size=10",
        "log.progress=false",
        "log.every=1",
        f"train.output_dir={tmp_path}",
    ]
    config = load_config(ROOT / "configs" / f"{recipe}.yaml", overrides)
    result, _ = train(config, LaunchEnv())
    assert result.count in (20, 100)
    records = metrics(tmp_path / config.train.run_name, "train")
    assert [record["iteration"] for record in records] == [1, 2, 3]
    assert all(math.isfinite(record["loss"]) for record in records)


@pytest.mark.parametrize("name", ["quickstart", "resnet20-fast"])
def test_the_fashion_mnist_recipes_run_three_steps(tmp_path, name):
    """The real-data quickstart and the fast recipe as written, on a small IDX set of 28 x 28 grey images."""
    from tests.data_pipeline.test_idx import write_idx_set
    from trainer.config import load_config

    write_idx_set(tmp_path / "data", train=64, test=24)
    overrides = [
        f"data.root={tmp_path / 'data'}",
        "data.batch_size=8",
        "train.epochs=null",
        "train.iterations=3",
        "schedule.unit=iteration",
        "schedule.warmup_length=1",
        "eval.batch_size=12",
        "log.progress=false",
        "log.every=1",
        f"train.output_dir={tmp_path}",
    ]
    config = load_config(ROOT / "configs/fashion-mnist" / f"{name}.yaml", overrides)
    result, _ = train(config, LaunchEnv())
    assert result.count == 24
    records = metrics(tmp_path / config.train.run_name, "train")
    assert [record["iteration"] for record in records] == [1, 2, 3]
    assert all(math.isfinite(record["loss"]) for record in records)


@pytest.mark.slow
def test_a_recipe_runs_on_dali(tmp_path, imagefolder_root):
    """torchvision's V2 recipe on the DALI path: TrivialAugmentWide from nvidia.dali.auto_aug, the feeder's erasing
    boxes, repeated augmentation, the 176 crop and the 232/224 evaluation."""
    from trainer.config import load_config

    overrides = [
        f"data.root={imagefolder_root}",
        "data.backend=dali",
        "model.num_classes=4",
        "data.batch_size=8",
        "data.ra_reps=2",
        "data.workers=0",
        "train.epochs=null",
        "train.iterations=3",
        "eval.batch_size=10",
        "log.progress=false",
        f"train.output_dir={tmp_path}",
    ]
    config = load_config(ROOT / "configs/imagenet/resnet50-torchvision-v2.yaml", overrides)
    result, _ = train(config, LaunchEnv())
    assert result.count == 20
    assert [r["protocol"] for r in metrics(tmp_path / config.train.run_name, "eval")] == ["center", "center-ema"]


@pytest.mark.slow
def test_the_report_gives_time_to_accuracy(tmp_path, cifar_root):
    """Each evaluation carries the run's hours so far, which go on across a resume; the report plots error against
    hours and device-hours and tabulates when each run first reached the target (raw or EMA weights)."""
    from trainer.reports.report import common_target, read_run, time_to_accuracy, write_report

    train(small_run(tmp_path / "a", cifar_root, "train.iterations=10"), LaunchEnv())
    train(small_run(tmp_path / "b", cifar_root, "train.iterations=5", *EMA), LaunchEnv())
    train(small_run(tmp_path / "b", cifar_root, "train.iterations=10", *EMA), LaunchEnv())  # resumed at 5
    runs = [read_run(tmp_path / name / "run") for name in "ab"]
    assert [point[0] for point in runs[1].timed] == [5, 5, 10, 10]  # raw and EMA at each evaluation
    assert [point[4] for point in runs[1].timed] == [False, True, False, True]
    hours = [point[1] for point in runs[1].timed]
    assert 0 < hours[0] <= hours[2] and all(point[2] == point[1] for point in runs[1].timed)  # one rank
    target = common_target(runs)
    assert all(time_to_accuracy(run, target) is not None for run in runs)
    write_report([tmp_path / "a/run", tmp_path / "b/run"], tmp_path / "report")
    text = (tmp_path / "report/report.md").read_text()
    assert f"| to {target:.2f}% | best top-1 |" in text and "not reached" not in text
    assert (tmp_path / "report/time-synthetic.png").stat().st_size > 10_000
    write_report([tmp_path / "a/run"], tmp_path / "report", targets=[0.0, 100.5])
    row = (
        r"^\| run \| resnet20 \| \d+\.\d min \(it\. 5\) \| not reached \| \d+\.\d\d% at \d+\.\d min \(it\. (5|10)\) \|$"
    )
    assert re.search(row, (tmp_path / "report/report.md").read_text(), re.M)  # 0% at the first evaluation
