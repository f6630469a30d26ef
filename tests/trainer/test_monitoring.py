"""What operators and researchers look at: `residual tensorboard` in a real headless browser, `residual report`,
a job's log (plain lines into a file, a bar on a terminal)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from checkout import RESIDUAL, ROOT
from PIL import Image

from trainer.config import load_config
from trainer.machine.distributed import LaunchEnv
from trainer.training.loop import train

ARTIFACTS = Path(os.environ.get("RESIDUAL_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def short_run(runs: Path, cifar_root: Path, name: str, *overrides: str) -> Path:
    config = load_config(
        ROOT / "configs/quickstart.yaml",
        [
            f"data.root={cifar_root}",
            "data.synthesize=null",
            "data.batch_size=32",
            "data.workers=0",
            "eval.batch_size=50",
            "train.iterations=12",
            "log.every=3",
            "eval.every=6",
            "log.progress=false",
            f"train.output_dir={runs}",
            f"train.run_name={name}",
            *overrides,
        ],
    )
    train(config, LaunchEnv())
    return runs / name


@pytest.mark.slow
def test_report_writes_the_figure_and_the_table_with_the_paper_column_for_the_papers_data_alone(tmp_path, cifar_root):
    runs = [short_run(tmp_path, cifar_root, name, f"model.name={name}") for name in ("plain20", "resnet20")]
    home = tmp_path / "home"  # nothing written outside the runs and the report (matplotlib's caches and config)
    home.mkdir()
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("XDG_", "MPLCONFIGDIR"))}
    result = subprocess.run(
        [RESIDUAL, "report", *map(str, runs), "--out", str(tmp_path / "report")],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ | {"HOME": str(home)},
    )
    assert result.returncode == 0, result.stderr
    assert list(home.iterdir()) == []
    figure = tmp_path / "report/errors-synthetic.png"
    assert Image.open(figure).size[0] > 800  # plain and residual side by side
    table = (tmp_path / "report/report.md").read_text()
    assert "| resnet20 | synthetic data | resnet20 | center | 12 |" in table and "8.75" not in table
    assert "- synthetic data: no published figure to compare with" in table
    for run in runs:  # as a run on CIFAR-10's own files records it (their test_batch's md5)
        assert json.loads((run / "dataset.json").read_text())["dataset"] == "synthetic"
        (run / "dataset.json").write_text(json.dumps({"dataset": "cifar10", "title": "CIFAR-10"}))
    subprocess.run([RESIDUAL, "report", *map(str, runs), "--out", str(tmp_path / "report")], check=True, timeout=120)
    table = (tmp_path / "report/report.md").read_text()
    assert table.split("| resnet20 | CIFAR-10 | resnet20 | center | 12 |")[1].count("8.75") == 1
    assert "| plain20 | CIFAR-10 | plain20 | center | 12 |" in table  # the paper gives no number: "-"
    assert "![errors-cifar10](errors-cifar10.png)" in table


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1400,900",
        "--virtual-time-budget=15000",
    ]
    return subprocess.run([shutil.which("chromium"), *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.browser
def test_tensorboard_renders_the_run_and_its_charts_in_a_browser(tmp_path, cifar_root):
    if shutil.which("chromium") is None:
        pytest.skip("no chromium: `apt-get install chromium` (tools/test.sh installs it)")
    short_run(tmp_path / "runs", cifar_root, "quickstart")
    port = free_port()
    board = subprocess.Popen(
        [RESIDUAL, "tensorboard", str(tmp_path / "runs"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                runs = get_json(f"{base}/data/runs")
                break
            except OSError:
                assert time.monotonic() < deadline and board.poll() is None, "TensorBoard did not start"
                time.sleep(0.5)
        assert runs == ["quickstart/tensorboard"]
        tags = get_json(f"{base}/data/plugin/scalars/tags")["quickstart/tensorboard"]
        assert {"train/loss", "speed/images_per_second", "eval/center/top1_error", "train/grad_norm"} <= set(tags)
        assert len([tag for tag in tags if tag.startswith("eval/center/class/")]) == 10  # top-1 of each class
        images = get_json(f"{base}/data/plugin/images/tags")["quickstart/tensorboard"]
        assert "eval/center/confusion" in images  # the confusion matrix, in the Images tab
        layout = get_json(f"{base}/data/plugin/custom_scalars/layout")
        assert [category["title"] for category in layout["category"]] == ["Training", "Evaluation", "Speed", "Health"]
        charts = [chart["title"] for chart in layout["category"][1]["chart"]]
        assert any(title.startswith("top-1 per class") for title in charts)

        dom = chromium("--dump-dom", f"{base}/#timeseries", profile=tmp_path / "profile-dom").stdout
        assert "quickstart/tensorboard" in dom  # the page ran and listed the run
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        screenshot = ARTIFACTS / "tensorboard-custom-scalars.png"
        shot = chromium(f"--screenshot={screenshot}", f"{base}/#custom_scalars", profile=tmp_path / "profile-png")
        assert screenshot.exists(), shot.stderr[-2000:]
        # The charts drew the run's curves: pixels of its colour (TensorBoard's first run is orange, #ff7043).
        pixels = Image.open(screenshot).convert("RGB").get_flattened_data()
        curve = sum(1 for r, g, b in pixels if r > 230 and 90 < g < 130 and 50 < b < 90)
        assert curve > 500, f"{curve} pixels of the run's colour: no chart drawn (see {screenshot})"
    finally:
        board.terminate()  # the PID `residual tensorboard` started with
        board.wait(timeout=30)
    with socket.socket() as probe:  # nothing left listening: TensorBoard was that process, not its child
        assert probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_tensorboard_on_a_port_in_use_says_so_in_one_line(tmp_path):
    (tmp_path / "runs").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [RESIDUAL, "tensorboard", str(tmp_path / "runs"), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2 and result.stdout == "", result.stdout  # no URL of a port it cannot serve
    assert result.stderr == f"residual: error: --port {port}: cannot listen on 127.0.0.1 (Address already in use)\n"


WINDOW_LINE = r"^\[\d/8\] epoch 0  loss \d+\.\d{4}  top-1 \d+\.\d\d%  lr 0\.1  [\d,]+ img/s  data \d+%  ETA 0:00:\d\d$"
EVAL_LINE = r"^\[8/8\] epoch 0  evaluation \(center, 100 images\): top-1 \d+\.\d\d%  top-5 \d+\.\d\d%$"


def logged_training(tmp_path: Path, quickstart_on_cifar: list[str], *, terminal: bool) -> str:
    """A short training's whole output (stdout and stderr), into a file or a terminal (a pty)."""
    command = [
        sys.executable,
        "-m",
        "trainer",
        *quickstart_on_cifar,
        "log.progress=true",
        "data.batch_size=20",
        "train.iterations=8",
        "log.every=2",
        "eval.every=8",
        f"train.output_dir={tmp_path}",
    ]
    if not terminal:
        with open(tmp_path / "job.out", "w") as out:
            subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=300, check=True)
        return (tmp_path / "job.out").read_text()
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal_end = pty.openpty()
    fcntl.ioctl(terminal_end, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    process = subprocess.Popen(command, cwd=ROOT, stdin=terminal_end, stdout=terminal_end, stderr=terminal_end)
    os.close(terminal_end)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=300) == 0
    os.close(controller)
    return b"".join(chunks).decode()


@pytest.mark.slow
def test_a_job_log_file_reads_as_plain_lines(tmp_path, quickstart_on_cifar):
    """A SLURM job's .out, nohup, CI: a line per log window and per evaluation, no carriage returns."""
    text = logged_training(tmp_path, quickstart_on_cifar, terminal=False)
    assert "\r" not in text
    lines = text.splitlines()
    assert len([line for line in lines if re.match(WINDOW_LINE, line)]) == 4, text
    assert len([line for line in lines if re.match(EVAL_LINE, line)]) == 1, text


@pytest.mark.slow
def test_a_terminal_gets_the_progress_bar(tmp_path, quickstart_on_cifar):
    text = logged_training(tmp_path, quickstart_on_cifar, terminal=True)
    lines = text.replace("\r\n", "\n").split("\n")  # the terminal ends lines with \r\n
    assert any("\r" in line and "img/s" in line for line in lines), text  # tqdm's bar, redrawn in place
    shown = [line.rsplit("\r", 1)[-1] for line in lines]  # what stays on the screen: tqdm.write clears the bar first
    assert not [line for line in shown if re.match(WINDOW_LINE, line)]
    assert len([line for line in shown if re.match(EVAL_LINE, line)]) == 1, text
