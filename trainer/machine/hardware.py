"""What this machine is: its CPU (model, instruction sets, whether torch computes bf16 natively, the usable cores),
its GPUs, and the versions of DALI and SLURM found. ``trainer.machine.auto`` decides the ``auto`` settings from
these facts."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class CpuFacts:
    model: str
    isa: str  # the widest vector ISA torch dispatches to: "AMX", "AVX512", "AVX2", ...
    bf16_native: bool  # bf16 matrix products in hardware, as torch will run them (see ``detect_cpu``)
    cores: int  # the cores this process may run on (its affinity mask)
    bf16_flags: bool = False  # the CPU's own flags: AVX512-BF16 or AMX-BF16


@dataclass(frozen=True)
class GpuFacts:
    name: str
    memory_gb: float
    capability: tuple[int, int]
    bf16: bool  # bf16 tensor cores (compute capability 8.0 and newer)


def cpu_flags() -> dict[str, bool]:
    """The CPU's bf16-related features, from torch where it reports them (``torch.cpu.get_capabilities``), else
    from /proc/cpuinfo's flags."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        return {name: bool(found.get(name)) for name in ("avx512_bf16", "amx_bf16")}
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def detect_cpu() -> CpuFacts:
    """The CPU as torch will run it. bf16 is native only where the CPU has the instructions *and* oneDNN will use
    them: a container, a VM or an administrator can cap the ISA (``ONEDNN_MAX_CPU_ISA=AVX2``,
    ``ATEN_CPU_CAPABILITY=avx2``), and oneDNN then emulates bf16, the 12x-slower case."""
    flags = cpu_flags()
    has_flags = flags["avx512_bf16"] or flags["amx_bf16"]
    onednn_bf16 = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    aten = torch.backends.cpu.get_cpu_capability()
    isa = "AMX" if flags["amx_bf16"] and onednn_bf16 and aten != "AVX2" else aten
    return CpuFacts(cpu_model(), isa, has_flags and onednn_bf16, usable_cores(), bf16_flags=has_flags)


def detect_gpus() -> list[GpuFacts]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        capability = (properties.major, properties.minor)
        gpus.append(GpuFacts(properties.name, properties.total_memory / 2**30, capability, capability >= (8, 0)))
    return gpus


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def dali_facts() -> dict[str, Any]:
    """DALI's version, and whether a one-operator pipeline runs in its CPU-only mode and on the GPU here."""
    try:
        from nvidia.dali import fn, pipeline_def
    except ImportError as error:
        return {"version": None, "cpu_mode": f"not importable: {error}", "gpu_mode": "not importable"}

    def works(device_id: int | None) -> bool | str:
        @pipeline_def(batch_size=2, num_threads=1, device_id=device_id)
        def pipeline():
            values = fn.random.uniform(range=[0.0, 1.0], shape=[4])
            return values.gpu() if device_id is not None else values

        try:
            built = pipeline()
            built.build()
            built.run()
        except Exception as error:  # noqa: BLE001 (reported, not raised: this is a diagnosis)
            return f"fails: {str(error).strip().splitlines()[0][:200]}"
        return True

    return {
        "version": package_version("nvidia-dali-cuda130") or package_version("nvidia-dali-cuda120"),
        "cpu_mode": works(None),
        "gpu_mode": works(0) if torch.cuda.is_available() else "no CUDA device",
    }


def slurm_version() -> str | None:
    if shutil.which("sinfo") is None:
        return None
    result = subprocess.run(["sinfo", "--version"], capture_output=True, text=True, timeout=10, check=False)
    if result.returncode == 0:
        return result.stdout.strip()
    return f"sinfo installed, no cluster configured ({(result.stderr.strip().splitlines() or ['?'])[-1]})"
