"""Two gloo ranks under torchrun on this CPU: the same entry point, a shared global batch, exact evaluation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from data_pipeline.errors import UserError
from trainer.config import load_config
from trainer.distributed import LaunchEnv, average_bn_buffers, first_host
from trainer.loop import train
from trainer.models import create_model

ROOT = Path(__file__).parents[2]


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_on_one_host_train_together(tmp_path, quickstart_on_cifar):
    """Two torchrun agents, one per "node", meeting through the c10d rendezvous on 127.0.0.1."""
    node = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:29519",
        "--rdzv-id=two-nodes",
        "-m",
        "trainer",
        *quickstart_on_cifar,
        "data.batch_size=40",
        "train.iterations=4",
        "log.every=2",
        f"train.output_dir={tmp_path}",
        "eval.batch_size=20",
    ]
    agents = [
        subprocess.Popen(node, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [agent.communicate(timeout=300) for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum("global batch 40 (20 per rank x 2 ranks x 1 accumulation)" in err for _, err in outputs) == 1
    records = train_records(tmp_path / "quickstart")
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [2, 4]
    assert records[-1]["count"] == 100


def average_on_rank(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = create_model("resnet20")
    model.bn1.running_mean.fill_(float(rank))  # each rank's own statistics
    model.bn1.running_var.fill_(1.0 + 2 * rank)
    average_bn_buffers(model)
    results[rank] = (model.bn1.running_mean.tolist(), model.bn1.running_var.tolist())
    dist.destroy_process_group()


@pytest.mark.distributed
def test_bn_statistics_are_averaged_over_ranks(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(average_on_rank, args=(str(tmp_path / "init"), results), nprocs=2)
    for rank in (0, 1):
        mean, var = results[rank]
        assert mean == [0.5] * 16 and var == [2.0] * 16


def test_sync_bn_is_refused_on_the_cpu(tmp_path, cifar_root):
    config = load_config(
        ROOT / "configs/quickstart.yaml",
        [
            f"data.root={cifar_root}",
            "data.synthesize=null",
            "model.sync_bn=true",
            f"train.output_dir={tmp_path}",
            "data.batch_size=40",
        ],
    )
    with pytest.raises(UserError, match="model.sync_bn=true: SyncBatchNorm runs on GPUs only"):
        train(config, LaunchEnv())


def test_a_slurm_task_is_a_rank_with_the_jobs_first_host_as_rendezvous():
    environ = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[007-009,12]",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_NTASKS_PER_NODE": "2",
    }
    launch = LaunchEnv.from_environ(environ)
    assert launch == LaunchEnv(rank=5, world_size=8, local_rank=1, launcher="slurm", local_world_size=2)
    assert environ["MASTER_ADDR"] == "gpu007" and environ["MASTER_PORT"] == str(20000 + 4242)
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", **environ}  # torchrun inside a SLURM job wins
    assert LaunchEnv.from_environ(torchrun) == LaunchEnv(1, 2, 1, "torchrun")
    assert LaunchEnv.from_environ({}) == LaunchEnv()
    assert first_host("node1") == "node1" and first_host("a[1-2],b") == "a1"


@pytest.mark.slow
@pytest.mark.distributed
def test_an_error_every_rank_meets_is_said_once_under_torchrun(tmp_path, cifar_root, quickstart_on_cifar):
    """Arguments and config are the same on every rank: one rank per host says what is wrong (torchrun's own
    ChildFailedError summary follows; the README says why)."""
    import torch

    torch.save(create_model("resnet20").state_dict(), tmp_path / "resnet20.pt")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--log-dir={tmp_path}/logs"]
    evaluation = ["-m", "trainer.cli", "eval", str(tmp_path / "resnet20.pt"), "--model", "resnet20",
                  "--data", str(cifar_root), "--batch", "63"]  # fmt: skip
    training = ["-m", "trainer", *quickstart_on_cifar, "optim.lr=-1"]
    for command, message in [
        (evaluation, "residual: error: --batch 63: not divisible by the world size 2\n"),
        (training, "optim.lr=-1.0: must be > 0\n"),
    ]:
        result = subprocess.run([*torchrun, *command], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and result.stderr.count(message) == 1, result.stderr[-3000:]


def evaluate_sharded_on_rank(rank: int, init_file: str, results) -> None:
    from datetime import timedelta

    import torch

    from trainer.config import DistConfig
    from trainer.evaluate import evaluate
    from trainer.parallel import shard_fully

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # fmt: skip
    torch.manual_seed(0)
    model = create_model("resnet20")
    images, labels = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(9) % 10
    share = range(0, 4) if rank == 0 else range(4, 9)  # 4 and 5 images in batches of 4: 1 and 2 batches
    batches = [(images[list(share)[i : i + 4]], labels[list(share)[i : i + 4]]) for i in range(0, len(share), 4)]
    shard_fully(model, device=torch.device("cpu"), world_size=2, precision="fp32", config=DistConfig(strategy="fsdp"))
    result = evaluate(model, batches, num_classes=10, device=torch.device("cpu"), sharded=True)
    results[rank] = (result.correct1, result.correct5, result.count)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp_evaluation_of_shares_with_other_batch_counts_does_not_hang(tmp_path):
    """FSDP2's forward gathers each layer's shards from every rank: the rank with fewer batches repeats its last
    one, counting nothing, until the others are done."""
    import torch

    from trainer.evaluate import evaluate

    results = mp.Manager().dict()
    mp.spawn(evaluate_sharded_on_rank, args=(str(tmp_path / "init"), results), nprocs=2)
    torch.manual_seed(0)
    model = create_model("resnet20")
    images, labels = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(9) % 10
    alone = evaluate(model, [(images, labels)], num_classes=10, device=torch.device("cpu"))
    assert results[0] == results[1] == (alone.correct1, alone.correct5, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU: run on a GPU machine")
def test_a_ddp_step_over_nccl_on_one_gpu(tmp_path):
    """NCCL (a group of one: NCCL refuses two ranks on one GPU), DDP's reducer, bf16 autocast and the step's flags
    collective on the device."""
    import torch

    from trainer.config import DistConfig
    from trainer.distributed import all_reduce_sum
    from trainer.parallel import parallelize
    from trainer.precision import build_grad_scaler
    from trainer.step import Stepper

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1,
                            device_id=device)  # fmt: skip
    try:
        model = create_model("resnet20").to(device)
        wrapped = parallelize(model, DistConfig(), precision="bf16", device=device, world_size=2)  # DDP, not bypassed
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        stepper = Stepper(model, wrapped, optimizer, build_grad_scaler(device, "bf16"), device, "bf16")
        images, labels = torch.randn(16, 3, 32, 32, device=device), torch.arange(16, device=device) % 10
        outcome = stepper.step(images, labels, stop=False, grad_norm=True)
        assert outcome.flags.tolist() == [0, 0, 0] and outcome.grad_norm > 0
        assert all_reduce_sum(torch.ones(3), device).tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()
