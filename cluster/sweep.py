"""``residual sweep SWEEP.yaml``: Ray Tune over config keys. Each trial runs the trainer's own entry point as a
subprocess (one process, or its own torchrun) with its overrides, and reports every evaluation the trainer logs,
with a checkpoint that names the trial's run directory: a resumed or paused trial starts the trainer again on the
same directory, and the trainer resumes from its own latest checkpoint.

A sweep file::

    base: configs/quickstart.yaml       # the config every trial starts from
    overrides: [train.iterations=400]   # the same for every trial
    space:                              # config keys: grid / choice / loguniform / uniform
      optim.lr: {loguniform: [0.01, 0.5]}
      model.name: {grid: [plain20, resnet20]}
    samples: 4                          # Tune's num_samples (each grid point as often)
    scheduler: asha                     # or fifo; ASHA counts evaluations
    metric: top1                        # of the evaluations, maximised
    grace_period: 1                     # ASHA: evaluations before a trial may be stopped
    reduction_factor: 2
    resources: {cpu: 1, gpu: 0}         # per trial
    ranks: 1                            # > 1: each trial is a torchrun of that many processes
    output_dir: runs/sweeps             # the sweep lives in output_dir/name: Tune's state and runs/<trial>
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.errors import UserError, read_text
from trainer.config import Config, load_config, said_in_one_line, to_yaml
from trainer.machine.distributed import TRIAL_CPUS
from trainer.training.run_log import METRICS_FILE, read_metrics

DISTRIBUTIONS = ("grid", "choice", "loguniform", "uniform")


@dataclass
class SweepConfig:
    base: str = ""
    overrides: list[str] = field(default_factory=list)
    space: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    samples: int = 1
    scheduler: Literal["asha", "fifo"] = "asha"
    metric: Literal["top1", "top5"] = "top1"
    grace_period: int = 1
    reduction_factor: int = 2
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    ranks: int = 1
    output_dir: str = "runs/sweeps"
    name: str | None = None  # default: the sweep file's name
    workdir: str = ""  # where relative paths of the configs point: the folder `residual sweep` ran in


def load_sweep(path: Path) -> SweepConfig:
    """Read and check a sweep file: every key of the space is a config key, every value a known distribution,
    and the base config loads with the overrides and with one value of each key."""
    text = read_text(path, "sweep file")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepConfig), OmegaConf.create(text))
        sweep: SweepConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise said_in_one_line(path, error) from None
    sweep.name = sweep.name or path.stem
    sweep.workdir = sweep.workdir or os.getcwd()
    if not sweep.base:
        raise UserError(f"{path}: base: name the config every trial starts from")
    if not sweep.space:
        raise UserError(f"{path}: space: empty; give at least one config key to search (optim.lr: ...)")
    for key, spec in sweep.space.items():
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise UserError(f"{path}: space.{key}: one of {', '.join(DISTRIBUTIONS)} with its values, not {spec}")
        kind, values = next(iter(spec.items()))
        if not values or (kind in ("loguniform", "uniform") and len(values) != 2):
            raise UserError(f"{path}: space.{key}.{kind}: {values} (grid/choice: a list; (log)uniform: [low, high])")
        try:
            load_config(sweep.base, [*sweep.overrides, f"{key}={values[0]}"])
        except UserError as error:
            raise UserError(f"{path}: space.{key}: {error}") from None
    return sweep


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    build = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "loguniform": lambda v: tune.loguniform(*v),
        "uniform": lambda v: tune.uniform(*v),
    }
    return {key: build[kind](list(values)) for key, spec in sweep.space.items() for kind, values in spec.items()}


def evaluations_per_trial(config: Config) -> int:
    """How many evaluations a trial's training logs: ASHA's time axis."""
    iterations, every = config.train.iterations, config.eval.every
    if iterations is None or every is None:
        raise UserError("a sweep's base config needs train.iterations and eval.every (ASHA counts evaluations)")
    return -(-iterations // every)


def trainer_command(ranks: int, run_dir: Path) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "trainer"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return [*torchrun, f"--log-dir={run_dir / 'torchrun'}", "-m", "trainer"]  # not $TMPDIR/torchelastic_*


def die_with_parent() -> None:
    """In the trainer's process: SIGTERM when the trial's worker dies (Ray kills a stopped trial's actor), which
    the trainer answers with a checkpoint."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_trial(params: dict[str, Any], sweep: SweepConfig, runs_dir: str) -> None:
    """One trial: start the trainer, report each new evaluation of its metrics.jsonl with a checkpoint."""
    from ray import tune

    name = tune.get_context().get_trial_name()
    run_dir = Path(runs_dir) / name
    reported = -1
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a resumed trial: the trainer resumes from run_dir; report only what is new
        with checkpoint.as_directory() as folder:
            reported = json.loads((Path(folder) / "trial.json").read_text())["iteration"]
    overrides = [f"{key}={value}" for key, value in params.items()]
    command = [
        *trainer_command(sweep.ranks, run_dir),
        sweep.base,
        *sweep.overrides,
        *overrides,
        f"train.output_dir={runs_dir}",
        f"train.run_name={name}",
        "log.progress=false",
    ]
    log = open(Path(runs_dir) / f"{name}.log", "a")  # noqa: SIM115 (closed in the finally below)
    environ = os.environ | {TRIAL_CPUS: str(max(1, int(sweep.resources.get("cpu", 1))))}  # the trainer's threads
    process = subprocess.Popen(
        command, cwd=sweep.workdir, env=environ, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
    )
    try:
        while True:
            finished = process.poll() is not None
            for record in new_evaluations(run_dir / METRICS_FILE, after=reported):
                if record["iteration"] <= reported:  # one report per iteration: the first record (raw weights)
                    continue
                reported = record["iteration"]
                with tempfile.TemporaryDirectory() as folder:
                    (Path(folder) / "trial.json").write_text(
                        json.dumps({"iteration": reported, "run_dir": str(run_dir)})
                    )
                    metrics = {key: record[key] for key in ("top1", "top5", "iteration")}
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
            if finished:
                break
            time.sleep(0.5)
        if process.returncode != 0:
            raise RuntimeError(f"trial {name}: the trainer exited with {process.returncode}; see {log.name}")
    finally:
        if process.poll() is None:  # stopped by the scheduler or interrupted: the trainer checkpoints and exits
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


def new_evaluations(path: Path, *, after: int) -> list[dict[str, Any]]:
    return [record for record in read_metrics(path) if record["kind"] == "eval" and record["iteration"] > after]


def run_sweep(path: Path, *, resume: bool, address: str | None) -> str:
    """Run (or with ``resume``, continue) a sweep; returns the table of its trials."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sweep = load_sweep(path)
    base = load_config(sweep.base, sweep.overrides)
    experiment = (Path(sweep.output_dir) / sweep.name).resolve()
    runs_dir = experiment / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    if resume and not (experiment / "tuner.pkl").exists():
        raise UserError(f"--resume: no sweep to continue in {experiment}")
    if address is None:  # a local Ray on the loopback only (it binds the machine's public address otherwise)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(
            include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir="/tmp/ray-residual", log_to_driver=False
        )
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, sweep=sweep, runs_dir=str(runs_dir)), dict(sweep.resources)
        )
        if resume:
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
        else:
            evaluations = evaluations_per_trial(base)
            scheduler = (
                ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=evaluations,
                    grace_period=sweep.grace_period,
                    reduction_factor=sweep.reduction_factor,
                )
                if sweep.scheduler == "asha"
                else FIFOScheduler()
            )
            tuner = tune.Tuner(
                trainable,
                param_space=search_space(sweep),
                tune_config=tune.TuneConfig(
                    metric=sweep.metric, mode="max", scheduler=scheduler, num_samples=sweep.samples
                ),
                run_config=tune.RunConfig(name=sweep.name, storage_path=str(experiment.parent), verbose=1),
            )
        results = tuner.fit()
    finally:
        ray.shutdown()
    return summarize(results, sweep, experiment)


class TrialRow(NamedTuple):
    """One trial in the sweep's table."""

    value: float | None  # the sweep's metric at the trial's last report
    evaluations: int  # reports (evaluations) made
    iteration: int | None  # the training iteration of the last one
    name: str
    params: dict[str, object]  # the trial's values of the search space
    failed: bool


def summarize(results, sweep: SweepConfig, experiment: Path) -> str:
    """The trials as a table (best first) and the best trial's config written as YAML beside them."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        rows.append(
            TrialRow(
                value=metrics.get(sweep.metric),
                evaluations=metrics.get("training_iteration", 0),
                iteration=metrics.get("iteration"),
                name=f"run_trial_{metrics.get('trial_id', '?')}",
                params={key: (result.config or {}).get(key) for key in sweep.space},
                failed=result.error is not None,
            )
        )
    rows.sort(key=lambda row: -1 if row.value is None else row.value, reverse=True)
    keys = list(sweep.space)
    lines = [f"{'trial':<34}" + "".join(f"{key:>22}" for key in keys) + f"{sweep.metric:>8}{'evals':>7}{'iter':>8}"]
    for row in rows:
        shown = "failed" if row.failed else (f"{100 * row.value:.2f}" if row.value is not None else "-")
        lines.append(
            f"{row.name[:33]:<34}"
            + "".join(f"{format_value(row.params[key]):>22}" for key in keys)
            + f"{shown:>8}{row.evaluations:>7}{row.iteration if row.iteration is not None else '-':>8}"
        )
    best = next((row for row in rows if row.value is not None and not row.failed), None)
    if best is not None:
        overrides = [*sweep.overrides, *(f"{key}={value}" for key, value in best.params.items())]
        best_config = load_config(sweep.base, overrides)
        best_config.train.run_name = f"{sweep.name}-best"
        (experiment / "best.yaml").write_text(to_yaml(best_config))
        lines.append(
            f"best: {best.name} ({sweep.metric} {100 * best.value:.2f}%); its config: {experiment / 'best.yaml'}"
        )
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(experiment)).trials  # as saved: an interrupted trial is pending again
    unfinished = sum(trial.status not in ("TERMINATED", "ERROR") for trial in trials)
    if unfinished:
        lines.append(f"{unfinished} trials unfinished (interrupted): `residual sweep --resume` continues the sweep")
    lines.append(f"TensorBoard of every trial: residual tensorboard {experiment / 'runs'}")
    return "\n".join(lines)


def format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
