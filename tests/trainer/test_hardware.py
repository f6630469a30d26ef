import json
import os
import subprocess
import sys

import pytest
import torch

from trainer.config import Config
from trainer.machine.auto import LoaderTuner, choose_precision, more_workers, plan_threads, resolve_auto
from trainer.machine.distributed import LaunchEnv
from trainer.machine.hardware import CpuFacts, GpuFacts, detect_cpu

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
        ),
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
        ),
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


def test_on_a_cpu_torch_gets_every_core_and_the_loader_runs_beside_it():
    def plan(**kwargs):
        found = plan_threads(cores=8, cores_source="test", threads=None, workers=None, **kwargs)
        return found.threads, found.workers

    assert plan(loader_processes=False, on_gpu=False) == (8, 0)  # CIFAR tensors: all cores train
    assert plan(loader_processes=True, on_gpu=True) == (1, 7)  # a GPU rank: the others decode
    assert plan(loader_processes=True, on_gpu=False) == (8, 4)  # compute first, the loader shares the cores
    explicit = plan_threads(cores=8, cores_source="test", threads=None, workers=6, loader_processes=True, on_gpu=False)
    assert (explicit.threads, explicit.workers) == (8, 6) and "sharing the 8 cores" in explicit.reason
    tensors = plan_threads(cores=8, cores_source="test", threads=None, workers=6, loader_processes=False, on_gpu=False)
    assert (tensors.threads, tensors.workers) == (8, 0)  # no loader processes: data.workers has nothing to start
    assert "sharing" not in tensors.reason
    two = plan_threads(cores=2, cores_source="test", threads=None, workers=None, loader_processes=True, on_gpu=False)
    assert (two.threads, two.workers) == (2, 1)
    given = plan_threads(cores=2, cores_source="test", threads=1, workers=None, loader_processes=True, on_gpu=False)
    assert (given.threads, given.workers) == (1, 1)  # train.threads given: kept


def test_the_loader_grows_while_the_step_waits_for_data():
    assert more_workers(2, data_wait=0.5, cores=4) == 3
    assert more_workers(2, data_wait=0.05, cores=4) is None  # near zero: no more processes
    assert more_workers(4, data_wait=0.9, cores=4) is None  # one per core at most
    tuner = LoaderTuner("workers", 1, cores=4)
    waits = [0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.0]  # the first window and each after a change are not judged
    assert [tuner.grow(wait) for wait in waits] == [None, 2, None, 3, None, 4, None]
    assert tuner.grow(0.9) is None and tuner.count == 4
    fixed = LoaderTuner(None, 3, cores=4)
    assert [fixed.grow(0.9) for _ in range(3)] == [None, None, None]


def test_resolve_auto_writes_the_choices_into_the_config(cifar_root):
    config = Config()
    config.data.root, config.data.format = str(cifar_root), "cifar"
    threads = torch.get_num_threads()
    try:
        resolved, lines, tuner = resolve_auto(config, LaunchEnv(), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    expected = "bf16" if detect_cpu().bf16_native else "fp32"
    assert resolved.train.precision == expected and config.train.precision == "auto"
    assert resolved.data.workers == 0 and resolved.train.threads == LaunchEnv().rank_cores(detect_cpu().cores)[0]
    assert lines[0].startswith(f"train.precision=auto -> {expected}: ")
    assert tuner.key is None  # CIFAR tensors: no loader processes to add


FAULTS_PER_STEP = """
import resource, sys, torch, torchvision
from trainer.config import Config
from trainer.machine.distributed import LaunchEnv
from trainer.machine.auto import resolve_auto
if sys.argv[1] == "resolved":
    print(resolve_auto(Config(), LaunchEnv(), torch.device("cpu"))[1])
model = torchvision.models.resnet18(num_classes=10).to(memory_format=torch.channels_last)
images = torch.randn(16, 3, 112, 112).to(memory_format=torch.channels_last)
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(images), torch.zeros(16, dtype=torch.long))
    loss.backward()
    model.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults)
"""


@pytest.mark.slow
def test_on_a_cpu_a_steps_activations_reuse_freed_memory_instead_of_faulting_in_new_pages():
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_STEP, "resolved"], capture_output=True, text=True, check=True
    )
    assert "malloc: freed blocks up to 32 MB are kept for reuse" in result.stdout
    faults = json.loads(result.stdout.splitlines()[-1])
    # Kept, the activations land in memory already mapped after two steps: 3,000-6,000 faults in all over the ten
    # steps after them, measured on a Zen 4. glibc's own choice depends on which arena each thread's blocks fall
    # in: the same ten steps took 23,000-80,000 faults in most runs there, and about 100 in one run on CI.
    assert sum(faults[2:]) < 10_000, faults


@pytest.mark.slow
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


@pytest.mark.slow
def test_auto_decides_from_what_torch_will_run_not_from_the_cpus_flags():
    """A container or an administrator capping the ISA: the CPU has AVX512-BF16, torch will not use it."""
    capped = os.environ | {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    result = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "env", "--json"], capture_output=True, text=True, check=True, env=capped
    )
    facts = json.loads(result.stdout)
    assert facts["cpu"]["isa"] == "AVX2" and facts["cpu"]["bf16_native"] is False
    assert facts["cpu"]["bf16_flags"] == detect_cpu().bf16_flags  # the instructions are still there
    assert facts["auto_precision"]["precision"] == "fp32"
    text = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "env"], capture_output=True, text=True, check=True, env=capped
    ).stdout
    instructions = "yes" if detect_cpu().bf16_flags else "no"
    assert f"bf16 not native (instructions {instructions}, used by torch no)" in text


def test_auto_names_an_isa_cap_when_the_instructions_are_there_but_unused():
    capped = CpuFacts("AMD EPYC 9B14", "AVX2", bf16_native=False, cores=2, bf16_flags=True)
    precision, reason = choose_precision("auto", device_type="cpu", cpu=capped, gpu=None)
    assert precision == "fp32" and "torch will not use them" in reason


def test_with_dali_the_readers_take_a_quarter_and_dalis_threads_decode_beside_torch():
    def plan(cores: int, on_gpu: bool, **config):
        found = plan_threads(
            cores=cores,
            cores_source="test",
            threads=None,
            workers=None,
            loader_processes=True,
            on_gpu=on_gpu,
            dali=True,
            **config,
        )
        return found.threads, found.workers, found.dali_threads

    assert plan(16, on_gpu=True) == (1, 4, 12)  # the GPU rank's thread launches kernels; DALI's threads decode
    assert plan(8, on_gpu=False) == (8, 2, 4)  # DALI's CPU mode: torch computes on every core, DALI decodes beside
    assert plan(2, on_gpu=False) == (2, 1, 1)
    assert plan(16, on_gpu=True, dali_threads=6) == (6, 4, 6)  # data.threads given: the rest to torch


def test_peak_flops_by_the_gpus_name_and_its_sms():
    """NVL boards are not SXM ones; a MIG slice has its share of the chip's SMs, and of its peak."""
    from trainer.machine.throughput import table_peak_flops

    assert table_peak_flops("NVIDIA H100 80GB HBM3", 132) == 989e12
    assert table_peak_flops("NVIDIA H100 NVL", 132) == table_peak_flops("NVIDIA H200 NVL", 132) == 835e12
    assert table_peak_flops("NVIDIA H100 PCIe", 114) == 756e12
    assert table_peak_flops("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 16) == pytest.approx(989e12 * 16 / 132)
    assert table_peak_flops("NVIDIA GeForce GTX 1080", 20) is None
    assert table_peak_flops("NVIDIA B200", 148) == 2250e12
    assert table_peak_flops("NVIDIA H800", 132) == 989e12 and table_peak_flops("NVIDIA A800-SXM4-80GB", 108) == 312e12


def test_mfu_counts_the_flops_of_each_epochs_crop_under_progressive_resizing():
    """FFCV's recipe trains 160-pixel crops until epoch 11: counted at data.crop_size (192), MFU was 1.44x high."""
    from trainer.config import load_config
    from trainer.machine.throughput import training_flops_per_image

    config = load_config("configs/imagenet/resnet50-ffcv-16ep.yaml", ["data.root=/tmp"])
    early, late = training_flops_per_image(config, epoch=0), training_flops_per_image(config, epoch=15)
    assert late == training_flops_per_image(config)  # the last crop is data.crop_size
    assert early / late == pytest.approx((160 / 192) ** 2, rel=0.01)


def test_cudnn_autotuning_is_on_for_fixed_shapes_and_off_for_multiscale_evaluation():
    from trainer.machine.auto import choose_cudnn_benchmark

    config = Config()
    assert choose_cudnn_benchmark(config)[0] is True
    config.eval.final_protocol = "multiscale"
    on, why = choose_cudnn_benchmark(config)
    assert on is False and "multi-scale" in why
