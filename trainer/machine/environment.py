"""What ``residual env`` prints and every run directory keeps as env.json: the machine (trainer.machine.hardware), what
``auto`` picks on it (trainer.machine.auto), and the versions of everything a run depends on."""

from __future__ import annotations

import platform
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.machine.auto import choose_precision
from trainer.machine.distributed import LaunchEnv
from trainer.machine.hardware import dali_facts, detect_cpu, detect_gpus, package_version, slurm_version


def environment(launch: LaunchEnv | None = None) -> dict[str, Any]:
    """What ``residual env`` prints and every run directory keeps as env.json: the machine, what ``auto`` picks
    on it, and the versions of everything a run depends on."""
    launch = launch or LaunchEnv.from_environ()
    cpu = detect_cpu()
    gpus = detect_gpus()
    device = torch.device("cuda", launch.local_rank) if gpus else torch.device("cpu")
    precision, reason = choose_precision("auto", device_type=device.type, cpu=cpu, gpu=gpus[0] if gpus else None)
    cores, cores_source = launch.rank_cores(cpu.cores)
    return {
        "host": platform.node(),
        "cpu": asdict(cpu),
        "rank_cores": {"cores": cores, "source": cores_source},
        "gpus": [asdict(gpu) for gpu in gpus],
        "auto_precision": {"device": str(device), "precision": precision, "reason": reason},
        "distributed_backends": [name for name in ("gloo", "nccl", "mpi") if getattr(dist, f"is_{name}_available")()],
        "dali": dali_facts(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "torchvision": package_version("torchvision"),
            "submitit": package_version("submitit"),
            "ray": package_version("ray"),
            "slurm": slurm_version(),
        },
    }


def code_commit() -> str:
    """The commit of this code, where it runs from a git checkout."""
    try:
        found = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return found.stdout.strip() if found.returncode == 0 else "unknown (not a git checkout)"


def format_environment(facts: dict[str, Any]) -> str:
    cpu, auto = facts["cpu"], facts["auto_precision"]
    native = cpu["bf16_native"]
    lines = [
        f"host        {facts['host']}",
        f"cpu         {cpu['model']}, {cpu['isa']}, bf16 {'native' if native else 'not native'} "
        f"(instructions {'yes' if cpu['bf16_flags'] else 'no'}, used by torch {'yes' if native else 'no'}), "
        f"{cpu['cores']} usable cores ({facts['rank_cores']['cores']} for this rank: {facts['rank_cores']['source']})",
    ]
    for index, gpu in enumerate(facts["gpus"]):
        capability = ".".join(map(str, gpu["capability"]))
        lines.append(
            f"gpu {index}       {gpu['name']}, {gpu['memory_gb']:.1f} GiB, compute capability {capability}, "
            f"bf16 {'yes' if gpu['bf16'] else 'no'}"
        )
    if not facts["gpus"]:
        lines.append("gpu         none")
    dali = facts["dali"]
    versions = ", ".join(f"{name} {version}" for name, version in facts["versions"].items() if version)
    lines += [
        f"auto        precision {auto['precision']} on {auto['device']}: {auto['reason']}",
        f"backends    {', '.join(facts['distributed_backends'])}",
        f"dali        {dali['version']}: CPU-only mode {_works(dali['cpu_mode'])}, GPU mode {_works(dali['gpu_mode'])}",
        f"versions    {versions}",
    ]
    return "\n".join(lines)


def _works(result: bool | str) -> str:
    return "works" if result is True else str(result)
