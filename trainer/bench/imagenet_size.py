"""``residual bench imagenet-size``: what ImageNet's size costs before and while training, on a tree of its shape.

ImageNet's train/ holds 1,281,167 files in 1,000 class folders, val/ 50,000. The bench builds a tree of that shape in
a scratch folder from hard links to one small JPEG per class (ext4 allows 65,000 links to a file), then starts
``residual train`` on it twice (the index listed, then read) and reports, for each start: the time from the command
to the first training step, and each process's private memory (the trainer ranks, their loader processes or DALI
reader processes) at the first step and again after a while of training. Private memory is what a process does not
share with any other: Private_Clean + Private_Dirty of /proc/PID/smaps_rollup.

A minute of training reads about 1% of an epoch on a CPU. What a whole epoch does to the loader processes' memory is
then shown on the sample table alone: DataLoader workers forked from a process holding the training set read every
sample's path and label once, in a shuffled order, as the training loader's workers do before decoding.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data_pipeline.datasets import open_dataset
from data_pipeline.prepare.synthetic import class_name

RESIDUAL = Path(__file__).parents[2]


def build_tree(root: Path, *, classes: int, per_class: int, val_per_class: int, size: tuple[int, int] = (64, 48)):
    """``root/{train,val}/<class>/<class>_<n>.JPEG``: hard links to one synthetic JPEG per class, written once;
    returns the file count. A tree already complete (its ``.complete`` marker) is kept."""
    marker = root / ".complete"
    total = classes * (per_class + val_per_class)
    if marker.is_file() and marker.read_text() == str(total):
        return total
    shutil.rmtree(root, ignore_errors=True)
    sources = root / "sources"
    sources.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with tqdm(total=total, unit="file", unit_scale=True, desc="tree", mininterval=2.0) as progress:
        for label in range(classes):
            name = class_name(label)
            source = sources / f"{name}.JPEG"
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(source, quality=90)
            for split, count in (("train", per_class), ("val", val_per_class)):
                folder = root / split / name
                folder.mkdir(parents=True)
                for number in range(count):
                    os.link(source, folder / f"{name}_{number}.JPEG")
                progress.update(count)
    marker.write_text(str(total))
    return total


def private_mb(pid: int) -> float | None:
    """Private_Clean + Private_Dirty of a process, in MB; None once it has exited."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    kb = sum(int(line.split()[1]) for line in text.splitlines() if line.startswith(("Private_Clean", "Private_Dirty")))
    return kb / 1024


def parent_of(pid: int) -> int | None:
    """The parent of a process (the field after its name in /proc/PID/stat); None once it has exited."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid``: its command line."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (parent := parent_of(int(entry.name))) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = {}, [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            found[child] = command.replace(b"\0", b" ").decode(errors="replace")
            stack.append(child)
    return found


def process_roles(pid: int, backend: str, ranks: int) -> dict[int, str]:
    """The processes of a training start by role: each rank's trainer (the residual process itself, or under
    torchrun each child of its agent), and below each its loader workers (DALI: reader processes); Python's
    resource tracker left out."""
    trainers = [pid] if ranks == 1 else sorted(child for child in descendants(pid) if parent_of(child) == pid)
    loader = "DALI reader" if backend == "dali" else "loader worker"
    roles = {}
    for rank, trainer in enumerate(trainers):
        roles[trainer] = f"trainer {rank}"
        helpers = [child for child, line in descendants(trainer).items() if "resource_tracker" not in line]
        roles |= {child: f"  {loader} {number} of trainer {rank}" for number, child in enumerate(sorted(helpers))}
    return roles


def memory(roles: dict[int, str]) -> dict[str, float]:
    return {role: mb for pid, role in roles.items() if (mb := private_mb(pid)) is not None}


def first_train_record(metrics: Path, since: int) -> dict | None:
    if not metrics.is_file():
        return None
    for line in metrics.read_text().splitlines():
        record = json.loads(line) if line.endswith("}") else {}
        if record.get("kind") == "train" and record["iteration"] > since:
            return record
    return None


def last_iteration(metrics: Path) -> int:
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
    return max((record["iteration"] for record in lines if record["kind"] == "train"), default=0)


def training_command(
    tree: Path, scratch: Path, backend: str, ranks: int, workers: int, batch: int, classes: int, run_name: str
) -> list[str]:
    """ResNet-18's ImageNet recipe on the tree at 32x32 crops, its loader on the CPU, never evaluating or
    checkpointing; under torchrun when ``ranks`` > 1."""
    launcher = "trainer.cli"
    if ranks > 1:
        launcher = f"torch.distributed.run --standalone --nproc_per_node={ranks} -m trainer.cli"
    recipe, tree, scratch = (
        shlex.quote(str(path)) for path in (RESIDUAL / "configs/imagenet/resnet18.yaml", tree, scratch)
    )
    arguments = (
        f"{launcher} train {recipe} data.root={tree} data.backend={backend} data.device=cpu data.workers={workers} "
        f"data.batch_size={batch * ranks} data.scale_min=40 data.scale_max=48 data.crop_size=32 data.val_resize=36 "
        f"data.index_dir={scratch}/index model.num_classes={classes} train.iterations=100000000 "
        f"eval.every=100000000 checkpoint.every=100000000 log.every=1 log.progress=false "
        f"train.output_dir={scratch}/runs train.run_name={run_name} checkpoint.resume=never"
    )
    return [sys.executable, "-m", *shlex.split(arguments)]


def start_training(
    tree: Path,
    scratch: Path,
    *,
    backend: str,
    ranks: int,
    workers: int,
    batch: int,
    classes: int,
    run_name: str,
    seconds: float,
) -> dict:
    """One start: its time to the first step, the private memory of each process then and ``seconds`` later, and
    the samples each rank's loader went through by then."""
    command = training_command(tree, scratch, backend, ranks, workers, batch, classes, run_name)
    metrics = scratch / "runs" / run_name / "metrics.jsonl"
    shutil.rmtree(metrics.parent, ignore_errors=True)
    log_path = scratch / f"{run_name}.log"
    with open(log_path, "w") as log:
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=RESIDUAL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while (record := first_train_record(metrics, 0)) is None:
            if process.poll() is not None:
                raise RuntimeError(f"the training start ended with {process.returncode}: see {log_path}")
            time.sleep(0.05)
        first_step = time.monotonic() - started
        roles = process_roles(process.pid, backend, ranks)
        before = memory(roles)
        time.sleep(seconds)
        after = memory(process_roles(process.pid, backend, ranks))  # the loader may have been built again since
        iterations = last_iteration(metrics)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    listing = next(
        (line.split("data index: ", 1)[1] for line in log_path.read_text().splitlines() if "data index: " in line), None
    )
    return {
        "first_step": first_step,
        "before": before,
        "after": after,
        "iterations": iterations,
        "samples_per_rank": iterations * batch,
        "index": listing,
        "record": record,
    }


class SampleTable(Dataset):
    """A training set's samples, each read as the training loader reads it (its path and label), not decoded."""

    def __init__(self, dataset) -> None:
        self.samples = dataset.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> int:
        path, label = self.samples[index]
        return len(path) + label


def walk_sample_table(tree: Path, index_dir: Path, workers: int, readings: int = 4) -> list[tuple[float, list[float]]]:
    """(share of the epoch, each loader process's private memory in MB) after the first batch and after each
    ``1/readings`` of an epoch in which ``workers`` forked DataLoader workers read every training sample's path and
    label once."""
    dataset = open_dataset(tree, "imagefolder", train=True, index_dir=index_dir)
    batch = max(1, min(4096, len(dataset) // (4 * readings)))  # a few batches per reading on a small tree
    loader = DataLoader(
        SampleTable(dataset),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(0),
    )
    iterator = iter(loader)
    pids = [worker.pid for worker in iterator._workers]
    marks = {1} | {round(len(loader) * (n + 1) / readings) for n in range(readings)}
    seen = []
    for number, _ in enumerate(tqdm(iterator, total=len(loader), unit="batch", desc="sample table", mininterval=2), 1):
        if number in marks:
            seen.append((number / len(loader), [private_mb(pid) or 0.0 for pid in pids]))
    return seen


def bench_imagenet_size(
    *,
    scratch: Path,
    classes: int,
    per_class: int,
    val_per_class: int,
    backend: str,
    ranks: int,
    workers: int,
    batch: int,
    seconds: float,
) -> None:
    tree = scratch / "imagenet"
    started = time.monotonic()
    files = build_tree(tree, classes=classes, per_class=per_class, val_per_class=val_per_class)
    print(
        f"tree: {classes * per_class:,} train + {classes * val_per_class:,} val files in {classes} class folders "
        f"({files:,} hard links), ready in {time.monotonic() - started:.1f} s at {tree}"
    )
    shutil.rmtree(scratch / "index", ignore_errors=True)
    epoch = classes * per_class
    for start in range(2):  # the index listed by rank 0, then read
        result = start_training(
            tree,
            scratch,
            backend=backend,
            ranks=ranks,
            workers=workers,
            batch=batch,
            classes=classes,
            run_name=f"{backend}-{ranks}-{start}",
            seconds=seconds,
        )
        print(
            f"start {start + 1} ({result['index'] or 'no index line'}): first step "
            f"{result['first_step']:.1f} s after the command"
        )
        share = result["samples_per_rank"] / (epoch / ranks)
        print(
            f"  private memory, MB, at the first step -> {seconds:.0f} s later ({result['iterations']} iterations: "
            f"{result['samples_per_rank']:,} samples per rank, {100 * share:.1f}% of its share of the epoch):"
        )
        for role, mb in result["before"].items():
            later = result["after"].get(role)
            print(f"  {role:<32} {mb:8.1f} -> " + (f"{later:8.1f}" if later is not None else "exited"))
    if backend == "torch":
        readings = walk_sample_table(tree, scratch / "index", workers)
        print(
            f"the sample table read in full by {workers} forked loader processes (path and label of every "
            f"training sample, shuffled, not decoded); private memory, MB, at "
            f"{', '.join(f'{100 * share:.0f}%' for share, _ in readings)} of the epoch:"
        )
        for worker in range(workers):
            print(f"    loader worker {worker}: " + " -> ".join(f"{mb[worker]:.1f}" for _, mb in readings))
    print(
        f"[{backend} path, {ranks} rank{'s' * (ranks > 1)}, {workers} loader processes per rank, batch {batch} per "
        f"rank, ResNet-18 at 32x32, {os.cpu_count()} CPUs]"
    )
