import json
import subprocess
import sys

import pytest
import torch

from trainer.config import Config
from trainer.distributed import LaunchEnv
from trainer.hardware import CpuFacts, GpuFacts, choose_precision, detect_cpu, plan_threads, resolve_auto

ZEN3 = CpuFacts("AMD EPYC 7B13", "AVX2", bf16_native=False, cores=2)
ZEN4 = CpuFacts("AMD EPYC 9B14", "AVX512", bf16_native=True, cores=2)
SAPPHIRE_RAPIDS = CpuFacts("Intel Xeon Platinum 8481C", "AMX", bf16_native=True, cores=2)
SKYLAKE = CpuFacts("Intel Xeon Gold 6148", "AVX512", bf16_native=False, cores=2)
H100 = GpuFacts("NVIDIA H100 80GB HBM3", 79.1, (9, 0), bf16=True)
V100 = GpuFacts("Tesla V100-SXM2-32GB", 31.7, (7, 0), bf16=False)


@pytest.mark.parametrize(
    ("cpu", "expected"), [(ZEN3, "fp32"), (SKYLAKE, "fp32"), (ZEN4, "bf16"), (SAPPHIRE_RAPIDS, "bf16")]
)
def test_auto_on_a_cpu_is_bf16_only_where_it_is_native(cpu, expected):
    precision, reason = choose_precision("auto", device_type="cpu", cpu=cpu, gpu=None)
    assert precision == expected
    assert cpu.model in reason and cpu.isa in reason


@pytest.mark.parametrize(("gpu", "expected"), [(H100, "bf16"), (V100, "fp16")])
def test_auto_on_a_gpu_is_bf16_or_else_fp16_with_the_scaler(gpu, expected):
    precision, reason = choose_precision("auto", device_type="cuda", cpu=ZEN3, gpu=gpu)
    assert precision == expected and gpu.name in reason


@pytest.mark.parametrize("forced", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept_on_any_hardware(forced):
    assert choose_precision(forced, device_type="cpu", cpu=ZEN3, gpu=None)[0] == forced
    assert choose_precision(forced, device_type="cuda", cpu=ZEN4, gpu=V100)[0] == forced


def launch_from(environ: dict[str, str]) -> LaunchEnv:
    return LaunchEnv.from_environ(dict(environ))


@pytest.mark.parametrize(
    ("environ", "available", "cores"),
    [
        ({}, 16, 16),  # one process: every core it may run on
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, 16, 4),  # torchrun
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, 3, 1),  # never 0
        (  # a SLURM task with --cpus-per-task
            {
                "SLURM_PROCID": "1",
                "SLURM_NTASKS": "2",
                "SLURM_LOCALID": "1",
                "SLURM_JOB_NODELIST": "n1",
                "SLURM_JOB_ID": "7",
                "SLURM_NTASKS_PER_NODE": "2",
                "SLURM_CPUS_PER_TASK": "6",
            },
            32,
            6,
        ),  # fmt: skip
        (  # SLURM without --cpus-per-task: the tasks of the node share its cores
            {
                "SLURM_PROCID": "0",
                "SLURM_NTASKS": "4",
                "SLURM_JOB_NODELIST": "n[1-2]",
                "SLURM_JOB_ID": "8",
                "SLURM_JOB_NUM_NODES": "2",
            },
            8,
            4,
        ),  # fmt: skip
        ({"RESIDUAL_TRIAL_CPUS": "3"}, 16, 3),  # a Ray trial of 3 CPUs, one process
        (
            {"RESIDUAL_TRIAL_CPUS": "4", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
            16,
            2,
        ),  # torchrun in it
    ],
)
def test_each_rank_uses_its_share_of_the_cores(environ, available, cores):
    assert launch_from(environ).rank_cores(available)[0] == cores


def test_loader_workers_and_threads_never_oversubscribe():
    def plan(**kwargs):
        found = plan_threads(cores=8, cores_source="test", threads=None, workers=None, **kwargs)
        return found.threads, found.workers

    assert plan(loader_processes=False, on_gpu=False) == (8, 0)  # CIFAR tensors: all cores train
    assert plan(loader_processes=True, on_gpu=True) == (1, 7)  # a GPU rank: the others decode
    assert plan(loader_processes=True, on_gpu=False) == (4, 4)
    explicit = plan_threads(cores=8, cores_source="test", threads=None, workers=6, loader_processes=True, on_gpu=False)
    assert (explicit.threads, explicit.workers) == (2, 6)
    tensors = plan_threads(cores=8, cores_source="test", threads=None, workers=6, loader_processes=False, on_gpu=False)
    assert (tensors.threads, tensors.workers) == (8, 0)  # no loader processes: data.workers has nothing to start
    one = plan_threads(cores=1, cores_source="test", threads=None, workers=None, loader_processes=True, on_gpu=False)
    assert (one.threads, one.workers) == (1, 1)


def test_resolve_auto_writes_the_choices_into_the_config(cifar_root):
    config = Config()
    config.data.root, config.data.format = str(cifar_root), "cifar"
    threads = torch.get_num_threads()
    try:
        resolved, lines = resolve_auto(config, LaunchEnv(), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    expected = "bf16" if detect_cpu().bf16_native else "fp32"
    assert resolved.train.precision == expected and config.train.precision == "auto"
    assert resolved.data.workers == 0 and resolved.train.threads == LaunchEnv().rank_cores(detect_cpu().cores)[0]
    assert lines[0].startswith(f"train.precision=auto -> {expected}: ")


def test_residual_env_says_what_auto_picks_here():
    result = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "env", "--json"], capture_output=True, text=True, check=True
    )
    facts = json.loads(result.stdout)
    cpu = detect_cpu()
    assert facts["cpu"]["bf16_native"] == cpu.bf16_native and facts["cpu"]["isa"] == cpu.isa
    assert facts["auto_precision"]["precision"] == ("bf16" if cpu.bf16_native else "fp32")
    assert "gloo" in facts["distributed_backends"] and facts["versions"]["torch"] == torch.__version__
    assert facts["dali"]["cpu_mode"] is True  # DALI's CPU-only mode runs on every machine of this project


def test_with_dali_the_readers_take_a_quarter_and_dalis_threads_decode():
    def plan(cores: int, on_gpu: bool, **config):
        found = plan_threads(cores=cores, cores_source="test", threads=None, workers=None, loader_processes=True,
                             on_gpu=on_gpu, dali=True, **config)  # fmt: skip
        return found.threads, found.workers, found.dali_threads

    assert plan(16, on_gpu=True) == (1, 4, 12)  # the GPU rank's thread launches kernels; DALI's threads decode
    assert plan(8, on_gpu=False) == (3, 2, 3)  # DALI's CPU mode: decoding and training share the cores
    assert plan(2, on_gpu=False) == (1, 1, 1)
    assert plan(16, on_gpu=True, dali_threads=6) == (6, 4, 6)  # data.threads given: the rest to torch


def test_peak_flops_by_the_gpus_name_and_its_sms():
    """NVL boards are not SXM ones; a MIG slice has its share of the chip's SMs, and of its peak."""
    from trainer.throughput import table_peak_flops

    assert table_peak_flops("NVIDIA H100 80GB HBM3", 132) == 989e12
    assert table_peak_flops("NVIDIA H100 NVL", 132) == table_peak_flops("NVIDIA H200 NVL", 132) == 835e12
    assert table_peak_flops("NVIDIA H100 PCIe", 114) == 756e12
    assert table_peak_flops("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 16) == pytest.approx(989e12 * 16 / 132)
    assert table_peak_flops("NVIDIA GeForce GTX 1080", 20) is None
