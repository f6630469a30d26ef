"""The fault matrix of docs/faults.md: each kind of file the system reads, damaged each way, and each resource it
needs, taken away, through the command a user runs. Each cell asserts the exit status, one line that names the file
or resource (never a traceback), and that nothing half-written is left for a later start to take as good. Cells
held by tests elsewhere are named in docs/faults.md."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkout import QUICKSTART, ROOT

from trainer.cli import main
from trainer.models import create_model
from trainer.training.checkpoint.files import latest_checkpoint, list_checkpoints
from trainer.training.checkpoint.state import save_checkpoint

CONFIG_TEXT = QUICKSTART.read_text()


def said(capsys, argv: list[str]) -> tuple[int, str]:
    """Run ``residual ARGV`` in this process: its exit status and the one line it said (asserted to be one, and no
    traceback)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("residual:")]
    assert len(lines) == 1, err
    return code, lines[0]


def small_training(cifar_root: Path, output_dir: Path, *overrides: str) -> list[str]:
    return [
        "train",
        str(QUICKSTART),
        f"data.root={cifar_root}",
        "data.synthesize=null",
        "data.workers=0",
        "data.batch_size=20",
        "log.progress=false",
        "train.iterations=2",
        "eval.every=2",
        f"train.output_dir={output_dir}",
        "train.run_name=run",
        *overrides,
    ]


def imagefolder_training(root: Path, output_dir: Path, *overrides: str) -> list[str]:
    """`python -m trainer` on the 4-class image folder (with loader processes where the overrides ask)."""
    return [
        sys.executable,
        "-m",
        "trainer",
        str(QUICKSTART),
        f"data.root={root}",
        "data.format=imagefolder",
        "data.synthesize=null",
        "data.workers=0",
        "model.num_classes=4",
        "log.progress=false",
        f"train.output_dir={output_dir}",
        *overrides,
    ]


CONFIG_DAMAGE = {
    "missing": (None, "config file '.*' does not exist"),
    "empty": ("", "empty, not a mapping of sections"),
    "truncated": (CONFIG_TEXT[: CONFIG_TEXT.index("data:") + 40] + "\n  mean: [0.4", "not valid YAML|expected"),
    "utf-16": (CONFIG_TEXT.encode("utf-16"), r"not UTF-8 text \(byte 0xff at offset 0\); save it as UTF-8"),
    "latin-1": ("# café\n".encode("latin-1") + CONFIG_TEXT.encode(), r"not UTF-8 text \(byte 0xe9 at offset 5\)"),
    "a list": ("- model\n- data\n", "a list, not a mapping of sections"),
    "wrong type": (CONFIG_TEXT.replace("lr: 0.1", "lr: fast"), "optim.lr: Value 'fast' of type 'str'"),
    "another version": ("train:\n  log_every: 5\n", r"train.log_every is now log.every \(python tools/migrate"),
    "a folder": ("folder", "config file '.*' cannot be read \\(Is a directory\\)"),
}


@pytest.mark.parametrize("damage", CONFIG_DAMAGE)
@pytest.mark.parametrize("command", ["train", "config show"])
def test_a_damaged_config_is_named_in_one_line(tmp_path, capsys, command, damage):
    content, message = CONFIG_DAMAGE[damage]
    path = tmp_path / "config.yaml"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, line = said(capsys, [*command.split(), str(path), f"train.output_dir={tmp_path / 'runs'}"])
    assert code == 2 and re.search(message, line) and "config" in line, line
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, cifar_root) -> Path:
    """A ResNet-20 training checkpoint file (2 iterations of the quickstart on the small CIFAR set) and a DCP
    directory of the same weights, each written as training writes them."""
    folder = tmp_path_factory.mktemp("checkpoints")
    assert main(small_training(cifar_root, folder / "False")) == 0
    saved = torch.load(latest_checkpoint(folder / "False" / "run"), weights_only=True)
    model = create_model("resnet20")
    model.load_state_dict(saved["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = {key: saved[key] for key in ("iteration", "model_name", "config", "classes")}
    save_checkpoint(folder / "True", 2, model, optimizer, state, sharded=True, keep=1, is_main=True)
    return folder


def damaged_file(path: Path, damage: str) -> None:
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "text":
        path.write_text("model: resnet20\n")
    elif damage == "missing":
        path.unlink()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "cannot be read: empty (0 bytes)"),
        ("truncated", "cannot be read: damaged or truncated"),
        ("text", "cannot be read: a text file, not a checkpoint"),
    ],
)
def test_a_damaged_checkpoint_file_is_named_in_one_line(tmp_path, capsys, checkpoints, cifar_root, damage, message):
    path = tmp_path / "ckpt-000000002.pt"
    shutil.copy(latest_checkpoint(checkpoints / "False" / "run"), path)
    damaged_file(path, damage)
    for argv in (["eval", str(path), "--data", str(cifar_root)], ["export", str(path), str(tmp_path / "out.pt")]):
        code, line = said(capsys, argv)
        assert code == 2 and str(path) in line and message in line, line
    assert not (tmp_path / "out.pt").exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("part", "damage", "message"),
    [
        ("__0_0.distcp", "missing", r"__0_0.distcp: missing, a shard of the checkpoint"),
        ("__0_0.distcp", "truncated", r"__0_0.distcp: cut short \(\d+ of \d+ bytes\), a shard of the checkpoint"),
        (".metadata", "missing", "a directory without .metadata is not a torch.distributed.checkpoint"),
        (".metadata", "text", r".metadata: not loaded"),
        ("train_state.pt", "truncated", "train_state.pt' cannot be read: damaged or truncated"),
    ],
)
def test_a_damaged_sharded_checkpoint_is_named_in_one_line(tmp_path, capsys, checkpoints, part, damage, message):
    path = tmp_path / "ckpt-000000002"
    shutil.copytree(latest_checkpoint(checkpoints / "True"), path)
    damaged_file(path / part, damage)
    code, line = said(capsys, ["export", str(path), str(tmp_path / "out.pt")])
    assert code == 2 and re.search(message, line), line
    assert not (tmp_path / "out.pt").exists()


def test_a_checkpoint_with_nonfinite_weights_is_not_exported(tmp_path, capsys, checkpoints):
    path = tmp_path / "ckpt-000000002.pt"
    checkpoint = torch.load(latest_checkpoint(checkpoints / "False" / "run"), weights_only=True)
    checkpoint["model"]["bn1.running_var"][0] = float("inf")
    torch.save(checkpoint, path)
    code, line = said(capsys, ["export", str(path), str(tmp_path / "out.pt")])
    assert code == 2 and "bn1.running_var holds inf or NaN (a diverged run): not exported" in line
    assert not (tmp_path / "out.pt").exists()


@pytest.fixture
def read_only(tmp_path):
    """A read-only file system (a tmpfs remounted read-only): what a checkpoint store mounted for reading is."""
    mount = tmp_path / "store"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def remount_read_only(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)


def test_eval_of_a_checkpoint_on_a_read_only_store_evaluates_and_says_where_the_counts_can_go(
    read_only, capsys, checkpoints, cifar_root
):
    shutil.copy(latest_checkpoint(checkpoints / "False" / "run"), read_only / "ckpt-000000002.pt")
    remount_read_only(read_only)
    code, line = said(capsys, ["eval", str(read_only / "ckpt-000000002.pt"), "--data", str(cifar_root)])
    assert code == 0 and "not written beside the checkpoint (Read-only file system); --out FILE" in line


def test_training_into_a_read_only_file_system_is_refused_in_one_line(read_only, capsys, cifar_root):
    remount_read_only(read_only)
    code, line = said(capsys, small_training(cifar_root, read_only / "runs"))
    assert code == 74 and f"{read_only / 'runs'}" in line and "Read-only file system; " in line, line


def test_a_disk_full_at_the_start_is_refused_before_anything_is_written(small_disk, capsys, cifar_root):
    (small_disk / "filler").write_bytes(b"\0" * (3 * 2**20 - 64 * 1024))  # what is left is less than a page or two
    code, line = said(capsys, small_training(cifar_root, small_disk / "runs"))
    assert code == 2 and f"{small_disk / 'runs' / 'run'}: its disk is full" in line, line
    assert not (small_disk / "runs").exists()


def test_a_validation_set_without_one_decodable_image_is_said_in_one_line(tmp_path, capsys, imagefolder_root):
    shutil.copytree(imagefolder_root, tmp_path / "data")
    for image in (tmp_path / "data" / "val").rglob("*.*"):
        image.write_bytes(b"not an image")
    overrides = ("data.batch_size=8", "data.skip_corrupt=true", "train.iterations=1")
    argv = ["train", *imagefolder_training(tmp_path / "data", tmp_path / "runs", *overrides)[3:]]
    code, line = said(capsys, argv)
    assert code == 2 and "no validation image was evaluated: each was undecodable" in line, line


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("", "config.yaml: empty or half-written"),
        ("model:\n  name: resnet20\ntrain:\n  run_n", "config.yaml: empty or half-written"),
        ("model: {name: [", "config.yaml: not valid YAML, half-written?"),
        (b"\xff\xfe", "config.yaml': not UTF-8 text"),
    ],
)
def test_report_on_a_run_directory_with_a_damaged_config(tmp_path, capsys, cifar_root, damage, message):
    assert main(small_training(cifar_root, tmp_path / "runs")) == 0
    capsys.readouterr()
    run = tmp_path / "runs" / "run"
    (run / "config.yaml").write_bytes(damage if isinstance(damage, bytes) else damage.encode())
    code, line = said(capsys, ["report", str(run), "--out", str(tmp_path / "report")])
    assert code == 2 and message in line, line
    (run / "config.yaml").unlink()
    code, line = said(capsys, ["report", str(run), "--out", str(tmp_path / "report")])
    assert code == 2 and "not a run directory (needs config.yaml and metrics.jsonl)" in line


@pytest.mark.slow
def test_a_damaged_folder_index_is_listed_again(tmp_path, capsys, imagefolder_root):
    """The index a run keeps of an image folder is a cache: cut short or foreign, it is listed again."""
    argv = ["train", *imagefolder_training(imagefolder_root, tmp_path, "data.batch_size=8", "train.iterations=1")[3:]]
    assert main(argv) == 0
    for index in (tmp_path / "quickstart" / "index").iterdir():
        index.write_bytes(index.read_bytes()[:100])
    assert main([*argv, "train.iterations=2"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_an_internal_error_is_one_line_with_the_traceback_in_a_file(tmp_path, capsys, monkeypatch):
    """A fault no one listed is a bug: it is said in one line that names the file holding its traceback."""

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setattr("trainer.cli.reports.cmd_models", broken)
    code, line = said(capsys, ["models"])
    saved = Path(re.search(r"the traceback is in (\S+):", line).group(1))
    assert code == 1 and "internal error (ZeroDivisionError: division by zero)" in line
    assert saved.parent == tmp_path and "Traceback" in saved.read_text()


@pytest.mark.slow
def test_a_killed_loader_process_stops_the_run_in_one_line_and_it_resumes(tmp_path, imagefolder_root):
    """The kernel's OOM killer sends SIGKILL to a loader process. DataLoader raises in the trainer wherever it is,
    mid-step too, so the run stops in one line naming the process and the signal, and resumes from its checkpoint."""
    overrides = ("data.workers=2", "data.batch_size=4", "log.every=2", "train.iterations=10000", "eval.every=100000")
    command = imagefolder_training(imagefolder_root, tmp_path, *overrides, "checkpoint.every=4")
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "quickstart" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list_checkpoints(tmp_path / "quickstart") and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(workers[0]), signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("residual:")]
    assert f"a data loader process (pid {workers[0]}) was killed by signal Killed (SIGKILL" in line
    assert f"the same command resumes from {checkpoints}" in line
    assert not list(checkpoints.glob("*.tmp"))


@pytest.mark.slow
def test_memory_exhausted_in_a_step_is_one_line(tmp_path, imagefolder_root):
    """A process limited to 5 GiB of address space (what a cgroup or a smaller machine gives) trains ResNet-152 at
    224 x 224 in batches of 48, which needs about twice that: the allocation fails in the forward."""
    import resource

    limit = 5 * 2**30
    overrides = ("data.batch_size=48", "data.crop_size=224", "model.name=resnet152", "train.iterations=1")
    command = imagefolder_training(imagefolder_root, tmp_path, *overrides)
    done = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("residual:")]
    assert line == (
        "residual: error: out of memory; lower data.batch_size (train.accumulation keeps the global batch), or "
        "data.workers"
    )
