"""Two gloo ranks under torchrun on this CPU: the same entry point, a shared global batch, exact evaluation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from checkout import ROOT

from data_pipeline.errors import UserError
from trainer.config import load_config
from trainer.machine.distributed import LaunchEnv, average_bn_buffers, first_host
from trainer.models import create_model
from trainer.training.loop import train


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
    ChildFailedError summary follows; docs/operators.md says why)."""
    import torch

    torch.save(create_model("resnet20").state_dict(), tmp_path / "resnet20.pt")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--log-dir={tmp_path}/logs"]
    evaluation = [
        "-m",
        "trainer.cli",
        "eval",
        str(tmp_path / "resnet20.pt"),
        "--model",
        "resnet20",
        "--data",
        str(cifar_root),
        "--batch",
        "63",
    ]
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
    from trainer.eval.evaluate import evaluate
    from trainer.recipe.parallel import shard_fully

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
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

    from trainer.eval.evaluate import evaluate

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
    from trainer.machine.distributed import all_reduce_sum
    from trainer.recipe.parallel import parallelize
    from trainer.recipe.precision import build_grad_scaler
    from trainer.training.step import Stepper

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1, device_id=device)
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


def multiscale_views(rank: int):
    """Two images per rank at scales 32 and 40, each an [image, flip] pair: rank 0's both square (2 shapes, so 2
    forwards), rank 1's one square and one 2:3 (4 shapes, 4 forwards)."""
    import torch

    generator = torch.Generator().manual_seed(rank)
    aspects = [(1, 1), (1, 1)] if rank == 0 else [(1, 1), (2, 3)]
    views = [
        [torch.randn(2, 3, scale * h // w if h < w else scale, scale, generator=generator) for scale in (32, 40)]
        for h, w in aspects
    ]
    return views, torch.tensor([rank, 3])


def evaluate_multiscale_on_rank(rank: int, init_file: str, results) -> None:
    from datetime import timedelta

    import torch

    from trainer.config import DistConfig
    from trainer.eval.evaluate import evaluate
    from trainer.recipe.parallel import shard_fully

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    torch.manual_seed(0)
    model = create_model("resnet20")
    shard_fully(model, device=torch.device("cpu"), world_size=2, precision="fp32", config=DistConfig(strategy="fsdp"))
    result = evaluate(model, [multiscale_views(rank)], num_classes=10, device=torch.device("cpu"), sharded=True)
    results[rank] = (result.correct1, result.correct5, result.count)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp_multiscale_evaluation_of_images_of_other_shapes_does_not_hang(tmp_path):
    """Multi-scale runs one forward per distinct view shape, and the shapes follow each rank's images; under FSDP2
    each forward is a chain of all-gathers, so every rank runs as many as the rank with the most (issue 24, item 1)."""
    import torch

    from trainer.eval.evaluate import evaluate

    results = mp.Manager().dict()
    mp.spawn(evaluate_multiscale_on_rank, args=(str(tmp_path / "init"), results), nprocs=2)
    torch.manual_seed(0)
    model = create_model("resnet20")
    alone = [evaluate(model, [multiscale_views(rank)], num_classes=10, device=torch.device("cpu")) for rank in (0, 1)]
    expected = tuple(sum(getattr(result, key) for result in alone) for key in ("correct1", "correct5", "count"))
    assert results[0] == results[1] == expected


def save_ema_on_rank(rank: int, init_file: str, run_dir: str, results) -> None:
    import torch

    from trainer.config import EmaConfig
    from trainer.recipe.ema import WeightAverage
    from trainer.training.checkpoint.state import save_checkpoint

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = create_model("resnet20")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = WeightAverage(model, EmaConfig(decay=0.5, bn_buffers="average"))
    model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(rank)) + rank)  # each rank's own images
    ema.update(1)
    name = "bn1.running_mean"
    before = ema.average[name].clone()
    save_checkpoint(
        Path(run_dir), 1, model, optimizer, {"iteration": 1}, ema=ema, sharded=False, keep=2, is_main=rank == 0
    )
    results[rank] = (before, ema.average[name].clone())
    dist.destroy_process_group()


@pytest.mark.distributed
def test_the_emas_bn_statistics_are_one_over_the_ranks_before_a_checkpoint(tmp_path):
    """With ema.bn_buffers=average each rank folds its own images' statistics in; a checkpoint kept one rank's and
    every rank evaluated its own (issue 24, item 4)."""
    import torch

    from trainer.training.checkpoint.files import latest_checkpoint, load_checkpoint

    results = mp.Manager().dict()
    mp.spawn(save_ema_on_rank, args=(str(tmp_path / "init"), str(tmp_path / "run"), results), nprocs=2)
    (before0, after0), (before1, after1) = results[0], results[1]
    assert not torch.equal(before0, before1)  # the ranks' own statistics differ
    torch.testing.assert_close(after0, (before0 + before1) / 2)
    assert torch.equal(after0, after1)
    saved = load_checkpoint(latest_checkpoint(tmp_path / "run"))["ema"]["bn1.running_mean"]
    assert torch.equal(saved, after0)


def ema_forward_on_rank(rank: int, init_file: str, results) -> None:
    import torch
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from trainer.config import EmaConfig
    from trainer.recipe.ema import WeightAverage

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    mesh = init_device_mesh("cpu", (2,))
    for module in (*model, model):
        fully_shard(module, mesh=mesh, reshard_after_forward=False)
    ema = WeightAverage(model, EmaConfig(decay=0.5))
    with torch.no_grad():
        for average in ema.average.values():
            average.zero_()  # an average that differs from the weights: its outputs are all zero
        x = torch.ones(2, 4)
        raw = model(x)  # an evaluation of the raw weights first: without resharding they stay gathered
        with ema.applied():
            averaged = model(x)
        after = model(x)
    results[rank] = (raw.abs().sum().item(), averaged.abs().sum().item(), after.abs().sum().item())
    dist.destroy_process_group()


@pytest.mark.distributed
def test_under_fsdp_without_resharding_the_ema_evaluation_sees_the_average(tmp_path):
    """dist.reshard_after_forward=false: a no-grad forward leaves the parameters gathered, and the EMA written into
    the shards went unseen (issue 24, item 3)."""
    results = mp.Manager().dict()
    mp.spawn(ema_forward_on_rank, args=(str(tmp_path / "init"), results), nprocs=2)
    for rank in (0, 1):
        raw, averaged, after = results[rank]
        assert raw > 0 and averaged == 0.0 and after == raw  # the average inside, the weights again after


def count_fsdp_collectives_on_rank(rank: int, init_file: str, results) -> None:
    import torch
    from torch.profiler import profile

    from trainer.config import DistConfig
    from trainer.recipe.parallel import shard_fully

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = create_model("resnet20")
    shard_fully(model, device=torch.device("cpu"), world_size=2, precision="bf16", config=DistConfig(strategy="fsdp"))
    images = torch.randn(4, 3, 32, 32)
    with profile() as profiler, torch.autocast("cpu", dtype=torch.bfloat16):
        model(images).float().sum().backward()
    names = [event.name for event in profiler.events()]
    results[rank] = (
        sum(name.startswith("FSDP::all_gather (") or name == "FSDP::all_gather" for name in names),
        sum(name.startswith("FSDP::post_backward_reduce") for name in names),
    )
    dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp_in_mixed_precision_gathers_each_blocks_batchnorms_together(tmp_path):
    """ResNet-20 in bf16 under FSDP2: 9 blocks, 19 BatchNorms. One group per BatchNorm made 29 groups, each an
    all-gather and a reduce-scatter per step; each block's BatchNorms together (and the stem's) make 20 (issue 24,
    item 8)."""
    results = mp.Manager().dict()
    mp.spawn(count_fsdp_collectives_on_rank, args=(str(tmp_path / "init"), results), nprocs=2)
    gathers, reduces = results[0]
    assert reduces == 1 + 9 + 10, results[0]  # the root, the blocks, the blocks' BatchNorms and the stem's
    assert gathers <= 2 * reduces, results[0]  # forward, and again in backward where resharded
