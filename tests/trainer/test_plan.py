"""The run's plan: each run-wide value decided once, from the config, the launch and the machine."""

import pytest
import torch
from checkout import QUICKSTART

from trainer.config import load_config
from trainer.machine.distributed import LaunchEnv
from trainer.training.plan import resolve


def test_the_plan_decides_the_batches_the_lr_and_the_run_directory_once(tmp_path):
    overrides = [
        "data.batch_size=256",
        "train.accumulation=2",
        "optim.lr=0.1",
        "optim.linear_scaling=true",
        "optim.base_batch=128",
        "data.workers=0",
        "train.threads=1",
        f"train.output_dir={tmp_path}",
        "train.run_name=planned",
    ]
    config = load_config(QUICKSTART, overrides, world_size=2, data_needed=False)
    launch = LaunchEnv(rank=1, world_size=2, local_world_size=2)
    threads = torch.get_num_threads()
    try:
        plan, _ = resolve(config, launch, torch.device("cpu"))  # sets torch's threads: this process's, given back
    finally:
        torch.set_num_threads(threads)
    assert (plan.global_batch, plan.per_rank_batch, plan.micro_batch) == (256, 128, 64)
    assert plan.base_lr == pytest.approx(0.2)  # Goyal et al.'s rule: 0.1 x 256 / 128
    assert plan.run_dir == tmp_path / "planned" == plan.config.train.run_dir
    assert plan.config.data.index_dir == str(tmp_path / "planned" / "index")
    assert plan.config.train.precision in ("fp32", "bf16") and plan.choices  # auto decided, and said why
    grown = plan.grown("workers", 3)
    assert grown.config.data.workers == 3 and plan.config.data.workers == 0  # a grown loader is a new plan
