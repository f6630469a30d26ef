"""The ``residual`` command as a user types it: exit codes, messages, what it prints and writes."""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from checkout import RESIDUAL, ROOT

from trainer.cli import main
from trainer.machine.hardware import detect_cpu


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_models_json_matches_the_paper():
    result = run(RESIDUAL, "models", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert len(rows) == 17
    for row in rows.values():
        assert set(row) >= {"name", "params", "macs", "paper_params", "paper_macs"}
        assert abs(row["params"] / row["paper_params"] - 1) < 0.02
    for name in ("resnet34", "resnet50", "resnet101", "resnet152"):
        assert abs(rows[name]["macs"] / rows[name]["paper_macs"] - 1) < 0.03
    assert rows["resnet56"]["paper_macs"] is None


@pytest.mark.slow
def test_models_table():
    result = run(RESIDUAL, "models")
    assert re.search(r"^resnet152\s+60\.19M\s+60\.20M\s+1\.000\s+11\.282G\s+11\.3G\s+0\.998$", result.stdout, re.M)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [("optim.lr=-1", "optim.lr=-1.0: must be > 0"), ("optim.lrr=1", "optim.lrr"), ("data.root=/no/such", None)],
)
def test_user_errors_exit_2_without_a_traceback(tmp_path, override, message):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  name: resnet20\n  num_classes: 10\ndata:\n  format: cifar\ntrain:\n  iterations: 1\n")
    result = run(RESIDUAL, "train", str(config), "data.root=/no/such", override)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (message or "data.root='/no/such': folder does not exist") in result.stderr


@pytest.mark.slow
def test_data_synth(tmp_path):
    result = run(
        RESIDUAL, "data", "synth", str(tmp_path / "cifar"), "--format", "cifar", "--classes", "3", "--per-class", "5"
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cifar/data_batch_5").is_file() and (tmp_path / "cifar/test_batch").is_file()
    result = run(
        RESIDUAL, "data", "synth", str(tmp_path / "folder"), "--classes", "2", "--per-class", "5", "--size", "40x30"
    )
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "folder/train").glob("*/*.JPEG"))) == 10
    assert len(list((tmp_path / "folder/val").glob("*/*.JPEG"))) == 2
    result = run(RESIDUAL, "data", "synth", str(tmp_path / "folder"))
    assert result.returncode == 2 and "not empty" in result.stderr


@pytest.mark.slow
def test_python_m_trainer_is_the_train_entry_point(tmp_path, quickstart_on_cifar):
    result = run(
        sys.executable,
        "-m",
        "trainer",
        *quickstart_on_cifar,
        "data.batch_size=40",
        "train.iterations=4",
        "eval.every=2",
        f"train.output_dir={tmp_path}",
        "eval.batch_size=100",
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"resnet20: top-1 \d+\.\d\d%  top-5 \d+\.\d\d%  \(center, 100 validation images", result.stdout)
    assert f"TensorBoard logs: {tmp_path}/quickstart/tensorboard" in result.stdout


@pytest.mark.slow
def test_quickstart_learns(tmp_path):
    """The embedded default, shortened for CI: 100 of its 250 iterations on a 3,000-image synthetic set."""
    result = run(
        RESIDUAL,
        "train",
        "configs/quickstart.yaml",
        f"data.root={tmp_path / 'data'}",
        "data.synthesize.train_per_class=300",
        "train.iterations=100",
        "eval.every=100",
        "schedule.milestones=[70]",
        f"train.output_dir={tmp_path / 'runs'}",
    )
    assert result.returncode == 0, result.stderr
    top1 = float(re.search(r"^resnet20: top-1 (\d+\.\d+)%", result.stdout, re.MULTILINE).group(1))
    assert top1 > 50, result.stdout  # chance is 10%
    assert (tmp_path / "runs/quickstart/config.yaml").is_file()


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="real Fashion-MNIST is not here: "
    "Debian's dataset-fashion-mnist is not installed (tools/test.sh installs it)",
)
def test_resnet20_learns_real_fashion_mnist(tmp_path):
    """The README's "done when", shortened: `residual data get fashion-mnist DIR`, then the real-data quickstart
    for 50 of its 360 iterations (6,400 images, a ninth of an epoch), tested on all 10,000 test images. It reached
    70.78% in bf16 and 71.36% in fp32 (AMD EPYC Zen 4, 2026-12-04); chance is 10%."""
    got = run(RESIDUAL, "data", "get", "fashion-mnist", str(tmp_path / "fashion-mnist"))
    assert got.returncode == 0, got.stderr
    shortened = ["train.iterations=50", "schedule.warmup_length=10", f"train.output_dir={tmp_path / 'runs'}"]
    result = run(
        RESIDUAL,
        "train",
        "configs/fashion-mnist/quickstart.yaml",
        f"data.root={tmp_path / 'fashion-mnist'}",
        *shortened,
    )
    assert result.returncode == 0, result.stderr
    top1 = float(re.search(r"^resnet20: top-1 (\d+\.\d+)%", result.stdout, re.MULTILINE).group(1))
    assert top1 > 65, result.stdout
    assert "10000 validation images; chance 10.0%" in result.stdout
    assert "published top-1 on Fashion-MNIST (the data set's benchmark table, other recipes): ResNet-18 94.9%" in (
        result.stdout
    )
    assert json.loads((tmp_path / "runs/quickstart/dataset.json").read_text())["dataset"] == "fashion-mnist"


@pytest.mark.slow
def test_data_verify_exit_codes(tmp_path, imagefolder_root):
    assert run(RESIDUAL, "data", "verify", str(imagefolder_root)).returncode == 0
    broken = tmp_path / "val" / "c0"
    broken.mkdir(parents=True)
    (broken / "x.JPEG").write_bytes(b"nope")
    result = run(RESIDUAL, "data", "verify", str(tmp_path))
    assert result.returncode == 1 and "x.JPEG: UnidentifiedImageError" in result.stdout
    assert "1 images checked, 1 not decodable" in result.stderr
    missing = run(RESIDUAL, "data", "verify", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "folder does not exist" in missing.stderr


@pytest.mark.slow
def test_bench_train_prints_the_ratio():
    result = subprocess.run(
        [RESIDUAL, "bench", "train", "--model", "resnet20", "--batch", "8", "--steps", "1", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    auto = "bf16" if detect_cpu().bf16_native else "fp32"  # bench's precision is auto, as training's
    assert (
        "trainer / minimal = " in result.stdout and f"[resnet20, batch 8 per rank, {auto}, one process" in result.stdout
    )


@pytest.mark.slow
def test_bench_optim_prints_both_steps_and_their_ratio():
    result = run(RESIDUAL, "bench", "optim", "--model", "resnet20", "--steps", "1", "--rounds", "1")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^sgd +[0-9.]+ ms/step", result.stdout, re.M) and re.search(
        r"^lars +[0-9.]+ ms/step", result.stdout, re.M
    )
    assert "lars / sgd = " in result.stdout and "[resnet20, 59 parameter tensors, cpu, torch " in result.stdout


@pytest.mark.slow
def test_bench_train_end_to_end_compares_equal_work():
    """The two loops see the same images with the same crops from the same initialization: the same top-1, where
    different orders and crops of a short run differ by points."""
    command = [
        RESIDUAL,
        "bench",
        "train",
        "--end-to-end",
        "--config",
        "configs/cifar10/resnet20.yaml",
        "--iterations",
        "40",
        "--per-class",
        "100",
        "--rounds",
        "1",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"round 1 cli .* s  top-1 .*%\nround 1 bare .* s  top-1", result.stdout), result.stdout
    assert re.search(r"cli / bare = \d+\.\d{3}  \[resnet20, 40 iterations of 128, ", result.stdout), result.stdout
    cli, bare = map(float, re.search(r"top-1: cli ([\d.]+)%, bare ([\d.]+)%", result.stdout).groups())
    assert abs(cli - bare) <= 1.0, result.stdout  # 2 of the 200 test images: float rounding, not other work


@pytest.mark.slow
def test_bench_recipes_prints_each_pieces_cost():
    command = [
        RESIDUAL,
        "bench",
        "recipes",
        "--iterations",
        "20",
        "--per-class",
        "30",
        "--rounds",
        "1",
        "--pieces",
        "cutmix,ema",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cost per step against the paper recipe [configs/quickstart.yaml, 20 iterations of 128, " in result.stdout
    costs = dict(re.findall(r"^  (\w+) +(\d+\.\d\d)x", result.stdout, re.MULTILINE))
    assert costs.keys() == {"paper", "cutmix", "ema"} and costs["paper"] == "1.00"


@pytest.mark.slow
def test_export_names_who_loads_the_weights(tmp_path):
    """torchvision has resnet18..152, not the CIFAR-10 nets."""
    import torch

    from trainer.config import load_config, to_dict
    from trainer.models import create_model
    from trainer.training.checkpoint.state import save_checkpoint

    config = to_dict(load_config(ROOT / "configs/quickstart.yaml", [f"data.root={tmp_path}"]))
    model = create_model("resnet20")
    state = {"model_name": "resnet20", "config": config, "classes": [str(i) for i in range(10)]}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    source = save_checkpoint(tmp_path, 1, model, optimizer, state, sharded=False, keep=1, is_main=True)
    result = run(RESIDUAL, "export", str(source), str(tmp_path / "resnet20.pt"))
    assert result.returncode == 0, result.stderr
    assert "torchvision.models" not in result.stdout and "torchvision has no resnet20" in result.stdout
    assert f"`residual eval {tmp_path / 'resnet20.pt'} --data DIR` reads them" in result.stdout
    (tmp_path / "file").write_text("")
    result = run(RESIDUAL, "export", str(source), str(tmp_path / "file/resnet20.pt"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "cannot write (File exists" in result.stderr


RUN_TMPDIR = """
import multiprocessing.util, os, sys, tempfile
from pathlib import Path
from trainer.machine.distributed import LaunchEnv
from trainer.training.run_directory import use_run_tmpdir
use_run_tmpdir(Path(sys.argv[1]), LaunchEnv(rank=1, world_size=2))
print(tempfile.gettempdir(), os.environ.get("TMPDIR"), multiprocessing.util.get_temp_dir(), sep="\\n")
"""


@pytest.mark.slow
def test_a_runs_temporary_files_live_in_its_run_directory():
    """multiprocessing's pymp-* (and what worker processes make) go to RUN_DIR/tmp/rankN, emptied at each start, so
    a run killed with -9 leaves them there, not in $TMPDIR; too deep a run directory for a socket keeps $TMPDIR."""
    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:  # pytest's tmp_path is too deep for a socket below it
        run_dir = Path(scratch) / "run"
        stale = run_dir / "tmp/rank1/pymp-stale"
        stale.mkdir(parents=True)
        result = run(sys.executable, "-c", RUN_TMPDIR, str(run_dir))
        folder = str(run_dir / "tmp/rank1")
        gettempdir, environ, multiprocessing = result.stdout.splitlines()
        assert gettempdir == environ == folder and multiprocessing.startswith(f"{folder}/pymp-"), result.stderr
        assert not stale.exists()
        deep = Path(scratch) / ("x" * 80)
        result = run(sys.executable, "-c", RUN_TMPDIR, str(deep))
        assert result.returncode == 0 and not result.stdout.startswith(str(deep)) and not deep.exists()


@pytest.mark.slow
def test_bench_gpu_refuses_without_a_gpu_and_its_checklist_parses(tmp_path):
    import torch

    from trainer.bench.gpu import gpu_checklist
    from trainer.cli import build_parser
    from trainer.config import load_config

    if not torch.cuda.is_available():  # on a GPU machine the checklist would run
        result = run(RESIDUAL, "bench", "gpu", "--out", str(tmp_path))
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no CUDA device here" in result.stderr
        assert list(tmp_path.iterdir()) == []
    (tmp_path / "data").mkdir()
    steps = gpu_checklist(out=tmp_path, gpus=8)
    assert [title for title, _ in steps][-2:] == [
        "DDP over the node's 8 GPUs: ResNet-50",
        "FSDP over the node's 8 GPUs: ResNet-50",
    ]
    assert steps[3][1][1:5] == ["-m", "pytest", "-m", "gpu"]
    for _, command in (step for step in steps if "trainer.cli" in step[1]):
        argv = command[command.index("trainer.cli") + 1 :]
        args, overrides = build_parser().parse_known_args(argv)
        if args.command == "train":
            config = load_config(ROOT / args.config, [*args.overrides, *overrides])
            assert (config.data.backend, config.data.device, config.eval.every) == ("dali", "gpu", 20)


def test_config_show_documents_every_key_of_the_resolved_config():
    shown = run(RESIDUAL, "config", "show", "configs/quickstart.yaml", "optim.lr=0.2", "checkpoint.keep=5")
    assert shown.returncode == 0, shown.stderr
    entries = [line for line in shown.stdout.splitlines() if line.startswith("  ")]
    assert len(entries) > 60 and [line for line in entries if " # " not in line] == []
    assert any(line.startswith("  lr: 0.2 ") for line in entries)
    assert any(line.startswith("  keep: 5 ") for line in entries)


def test_config_show_prints_a_config_whose_data_is_not_here(capsys):
    """Reading a config needs no data set: the missing root is a note below it (training still refuses it)."""
    assert main(["config", "show", str(ROOT / "configs/imagenet/resnet18.yaml"), "data.root=/nowhere/imagenet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith('  name: "resnet18" ') for line in out)
    assert out[-1] == (
        "note: data.root='/nowhere/imagenet': folder does not exist (run `residual data synth /nowhere/imagenet` or "
        "set data.synthesize to generate it); training would stop there"
    )


@pytest.mark.slow
def test_bench_imagenet_size_prints_the_first_step_and_each_processs_memory(tmp_path):
    command = [
        RESIDUAL,
        "bench",
        "imagenet-size",
        "--scratch",
        str(tmp_path),
        "--classes",
        "3",
        "--per-class",
        "40",
        "--val-per-class",
        "4",
        "--seconds",
        "2",
        "--workers",
        "2",
        "--batch",
        "8",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "tree: 120 train + 12 val files in 3 class folders (132 hard links)" in out, out
    assert re.search(
        r"start 1 \(120 train images, listed; 12 val images, listed in [\d.]+ s .*\): first step "
        r"[\d.]+ s after the command",
        out,
    ), out
    assert re.search(r"start 2 \(120 train images, read; 12 val images, read in ", out), out
    assert len(re.findall(r"^  trainer 0 +[\d.]+ -> +[\d.]+$", out, re.MULTILINE)) == 2, out
    assert len(re.findall(r"^    loader worker [01] of trainer 0 +[\d.]+ -> ", out, re.MULTILINE)) == 4, out
    assert "the sample table read in full by 2 forked loader processes" in out, out
    assert len(re.findall(r"^    loader worker [01]: [\d.]+( -> [\d.]+){4}$", out, re.MULTILINE)) == 2, out
