"""What the ``auto`` settings pick on this machine (trainer.machine.hardware's facts): precision, CPU threads,
loader workers, cuDNN's autotuning, and glibc keeping freed memory.

The choices are pure functions of the facts (``choose_precision``, ``plan_threads``), so each kind of hardware is
testable here; ``detect_cpu``/``detect_gpus`` read the facts. Measured on 2-core CPUs (docs/benchmarks.md):
ResNet-20 in bf16 autocast trains 1.3-1.7x as fast as fp32 on AMD EPYCs with native bf16, but 12x *slower* on an
AMD EPYC Zen 3 with AVX2 only (no bf16 instructions: every bf16 op is emulated), so bf16 is chosen only where it
is native. channels_last helped fp32 and bf16 on every CPU measured (1.14-1.34x), so it stays a plain setting.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace

import torch

from data_pipeline.loaders import uses_tensor_path
from trainer.config import Config
from trainer.machine.distributed import LaunchEnv
from trainer.machine.hardware import CpuFacts, GpuFacts, detect_cpu, detect_gpus, usable_cores


def choose_precision(requested: str, *, device_type: str, cpu: CpuFacts, gpu: GpuFacts | None) -> tuple[str, str]:
    """``train.precision``: an explicit fp32/bf16/fp16 is kept; ``auto`` is bf16 on GPUs with bf16 tensor cores,
    fp16 (with the gradient scaler) on older GPUs, bf16 on CPUs that compute it natively, fp32 on other CPUs.
    Returns the precision and the reason, for the log."""
    if requested != "auto":
        return requested, "set in the config"
    if device_type == "cuda":
        assert gpu is not None, "a CUDA device without its facts"
        if gpu.bf16:
            return "bf16", f"{gpu.name} (compute capability {gpu.capability[0]}.{gpu.capability[1]}) has bf16"
        return "fp16", f"{gpu.name} (compute capability {gpu.capability[0]}.{gpu.capability[1]}) has no bf16"
    if cpu.bf16_native:
        return "bf16", f"{cpu.model} computes bf16 natively ({cpu.isa})"
    if cpu.bf16_flags:
        return "fp32", (
            f"{cpu.model} has bf16 instructions, but torch will not use them here ({cpu.isa}, oneDNN "
            f"without bf16: an ISA cap such as ONEDNN_MAX_CPU_ISA?): bf16 autocast would be emulated, "
            f"about 12x slower"
        )
    return "fp32", f"{cpu.model} ({cpu.isa}) has no native bf16: bf16 autocast would be emulated, about 12x slower"


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """``choose_precision`` on this machine's facts."""
    gpu = None
    if device.type == "cuda":
        gpu = detect_gpus()[device.index or 0]
    return choose_precision(requested, device_type=device.type, cpu=detect_cpu(), gpu=gpu)


@dataclass(frozen=True)
class ThreadPlan:
    threads: int  # torch's intra-op threads in this rank
    workers: int  # loader worker processes of this rank
    reason: str
    dali_threads: int = 0  # DALI's CPU threads (decoding, the CPU stage of GPU decoding); 0: not DALI


def plan_threads(
    *,
    cores: int,
    cores_source: str,
    threads: int | None,
    workers: int | None,
    loader_processes: bool,
    on_gpu: bool,
    dali: bool = False,
    dali_threads: int | None = None,
) -> ThreadPlan:
    """How the ``cores`` one rank may use are given to torch's threads, the loader's worker processes and DALI's
    threads. ``threads``/``workers``/``dali_threads`` are the config's (None: auto). ``loader_processes``: whether
    the data path uses worker processes at all (the in-memory CIFAR and IDX path does not: no workers, whatever is
    asked).

    On a GPU the rank's own thread only launches kernels: every other core decodes (with DALI, a quarter of them
    read files and draw the crops, DALI's threads decode the rest). On a CPU the compute comes first: torch gets
    every core of the rank, and the loader processes run beside it on half of them, sharing the cores through the
    OS. A loader process mostly waits (decoding a small JPEG costs far less than a ResNet step); measured on a
    2-core CPU, ResNet-18 trained 1.6x as fast with 2 torch threads beside 2 loader processes as with 1 thread
    (docs/benchmarks.md). Where the loader still cannot keep up, ``more_workers`` adds processes as the run goes."""
    if not dali:
        if not loader_processes:
            workers = 0
        elif workers is None:
            workers = max(1, cores - 1) if on_gpu else max(1, cores // 2)
        if threads is None:
            threads = max(1, cores - workers) if on_gpu and loader_processes else cores
        reason = f"cores: {cores} for this rank ({cores_source}) -> {threads} torch threads, {workers} loader workers"
        return ThreadPlan(threads, workers, reason + _shared(cores, threads + workers))
    if workers is None:
        workers = max(1, cores // 4)
    if on_gpu:
        dali_threads = dali_threads or max(1, cores - workers)
        threads = threads or max(1, cores - workers - dali_threads)
    else:
        dali_threads = dali_threads or max(1, cores // 2)
        threads = threads or cores
    reason = (
        f"cores: {cores} for this rank ({cores_source}) -> {threads} torch threads, {workers} DALI reader "
        f"processes, {dali_threads} DALI threads"
    )
    return ThreadPlan(threads, workers, reason + _shared(cores, threads + workers + dali_threads), dali_threads)


def _shared(cores: int, wanted: int) -> str:
    if wanted <= cores:
        return ""
    return " (sharing the core)" if cores == 1 else f" (sharing the {cores} cores)"


# A loader that keeps the step waiting for more than this share of a log window gets one more worker process.


DATA_WAIT_LIMIT = 0.10


def more_workers(workers: int, *, data_wait: float, cores: int) -> int | None:
    """The loader processes the next windows should have, or None to keep ``workers``: one more while the step
    waited for data more than ``DATA_WAIT_LIMIT`` of the last window (a rank whose wait is near zero needs no more),
    up to one per core of the rank (beyond, they would only take turns on the cores, as DataLoader warns)."""
    if data_wait <= DATA_WAIT_LIMIT or workers >= cores:
        return None
    return workers + 1


@dataclass
class LoaderTuner:
    """``data.workers: auto`` as the run goes (DALI: ``data.threads: auto``, the threads that decode): after each
    log window, ``more_workers`` of the window's wait for data. The window after a start or a change is not judged
    (the processes were starting). ``key`` None: the config fixed the count, or the data path has no processes."""

    key: str | None  # "workers" | "threads" | None
    count: int
    cores: int
    settling: bool = True

    def grow(self, data_wait: float) -> int | None:
        """The new count where the last window says the loader needs one more, else None."""
        if self.key is None or self.settling:
            self.settling = False
            return None
        grown = more_workers(self.count, data_wait=data_wait, cores=self.cores)
        if grown is not None:
            self.count, self.settling = grown, True
        return grown


def resolve_auto(config: Config, launch: LaunchEnv, device: torch.device) -> tuple[Config, list[str], LoaderTuner]:
    """The config with ``train.precision``, ``train.threads`` and ``data.workers`` decided for this machine and
    rank (what the run directory's config.yaml records), torch's thread count set, one log line per choice, and
    the tuner of the loader's automatic count."""
    precision, precision_reason = resolve_precision(config.train.precision, device)
    cores, cores_source = launch.rank_cores(usable_cores())
    workers = None if config.data.workers == "auto" else int(config.data.workers)
    tensor_path = uses_tensor_path(config.data)
    dali = config.data.backend == "dali"
    plan = plan_threads(
        cores=cores,
        cores_source=cores_source,
        threads=config.train.threads,
        workers=workers,
        loader_processes=not tensor_path,
        on_gpu=device.type == "cuda",
        dali=dali,
        dali_threads=None if config.data.threads == "auto" else int(config.data.threads),
    )
    torch.set_num_threads(plan.threads)
    lines = [f"train.precision={config.train.precision} -> {precision}: {precision_reason}", plan.reason]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark, why = choose_cudnn_benchmark(config)
        lines.append(f"cudnn.benchmark={torch.backends.cudnn.benchmark}: {why}")
    if device.type == "cpu" and keep_freed_memory():
        lines.append(
            f"malloc: freed blocks up to {MMAP_THRESHOLD_MAX >> 20} MB are kept for reuse (the activations "
            f"of the next step), not returned to the OS"
        )
    if tensor_path:
        lines.append(f"data: {config.data.format} images held as one tensor on the device, augmented in batches")
    resolved = replace(
        config,
        train=replace(config.train, precision=precision, threads=plan.threads),
        data=replace(config.data, workers=plan.workers, **({"threads": plan.dali_threads} if dali else {})),
    )
    if dali:
        tuner = LoaderTuner("threads" if config.data.threads == "auto" else None, plan.dali_threads, cores)
    else:
        tuned = config.data.workers == "auto" and not tensor_path
        tuner = LoaderTuner("workers" if tuned else None, plan.workers, cores)
    return resolved, lines, tuner


def choose_cudnn_benchmark(config: Config) -> tuple[bool, str]:
    """cuDNN's autotuning (torchvision's reference turns it on): each new input shape is timed once over cuDNN's
    algorithms, and the fastest kept. Training has one shape (a few with progressive resizing); multi-scale
    evaluation has one per scale and aspect ratio, each of which would be timed: off there."""
    protocols = {config.eval.protocol, config.eval.final_protocol}
    if "multiscale" in protocols:
        return False, "multi-scale evaluation gives a shape per scale and aspect ratio; autotuning each costs more"
    return True, "fixed input shapes: cuDNN times its algorithms once per shape and keeps the fastest"


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest M_MMAP_THRESHOLD on 64-bit; larger blocks are always mapped


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse: every block up to 32 MB from its heap, never trimmed back. By
    default it maps a large block fresh from the OS and unmaps it when freed, so each training step on a CPU
    page-faults its activations in again: ResNet-18, batch 64 at 112 pixels, bf16, 2-core Zen 4, 80 steps went
    from 1.31-1.50 million minor faults and 5.7-6.4 s of system time to 0.52 million and 3.4-3.9 s, and 1.05x the
    images/s (docs/benchmarks.md). Returns whether it applied (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False  # not glibc: musl, macOS
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30))
