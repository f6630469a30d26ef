from pathlib import Path

import pytest
from checkout import ROOT
from training_runs import RECIPES

from data_pipeline.errors import UserError
from trainer.config import load_config, to_yaml
from trainer.models import list_models

CONFIGS = ROOT / "configs"
PAPER_CONFIGS = [
    path
    for path in sorted(CONFIGS.glob("imagenet/*.yaml")) + sorted(CONFIGS.glob("cifar10/*.yaml"))
    if f"{path.parent.name}/{path.stem}" not in RECIPES
]


def write_config(tmp_path: Path, text: str = "") -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "run.yaml"
    path.write_text(f"data:\n  root: {tmp_path / 'data'}\ntrain:\n  iterations: 10\n{text}")
    return path


def test_every_registered_model_has_a_paper_config():
    names = {load_config(path, [f"data.root={path.parent}"]).model.name for path in PAPER_CONFIGS}
    assert names == set(list_models())


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_paper_configs_follow_the_paper(path):
    config = load_config(path, [f"data.root={path.parent}"])
    assert (config.optim.momentum, config.optim.weight_decay, config.optim.lr) == (0.9, 1e-4, 0.1)
    if path.parent.name == "cifar10":
        assert config.data.batch_size == 128 and config.train.iterations == 64000
        assert config.schedule.milestones == [32000, 48000]
        warm = config.model.name in ("resnet110", "resnet1202")
        assert (config.schedule.warmup_until_train_error == 0.8) == warm
    else:
        assert config.data.batch_size == 256 and config.model.num_classes == 1000
        assert (config.data.scale_min, config.data.scale_max, config.data.crop_size) == (256, 480, 224) or (
            config.data.train_augment == "random_resized_crop"
        )


def test_overrides_and_run_name(tmp_path):
    config = load_config(write_config(tmp_path), ["optim.lr=0.05", "model.name=resnet20", "schedule.milestones=[5,8]"])
    assert config.optim.lr == 0.05 and config.model.name == "resnet20" and config.schedule.milestones == [5, 8]
    assert config.train.run_name == "run"
    assert "lr: 0.05" in to_yaml(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=0.1"], "optim.lrr"),
        (["nonsense.key=1"], "nonsense"),
        (["data.batch_size=many"], "data.batch_size"),
        (["optim.lr=-0.1"], "optim.lr=-0.1: must be > 0"),
        (["model.name=resnet51"], "model.name='resnet51': must be one of"),
        (["model.shortcut=D"], "model.shortcut='D'"),
        (["train.precision=fp8"], "train.precision='fp8'"),
        (["train.epochs=3"], "set exactly one"),
        (["schedule.milestones=[10,5]"], "must increase"),
        (["data.batch_size=0"], "data.batch_size=0"),
        (["lr 0.1"], "is not key=value"),
        (["eval.final_protocol=fivecrop"], "eval.final_protocol='fivecrop'"),
        (["eval.scales=[128,256]"], "every scale must be at least the 224 crop"),
        (["data.format=cifar", "eval.final_protocol=tencrop"], "tested on the single original image"),
        (["data.format=idx", "eval.protocol=flip"], "eval.protocol flip: idx data is tested on the single original"),
        (["model.in_channels=1"], "need one value per input channel: model.in_channels=1"),
        (["data.mean=[0.5]"], "need one value per channel"),
    ],
)
def test_bad_values_name_the_key(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message.replace("[", "\\[")):
        load_config(write_config(tmp_path), overrides)


def test_batch_must_divide_by_the_world_size(tmp_path):
    with pytest.raises(UserError, match=r"data.batch_size=256: must be divisible by the world size x train.acc"):
        load_config(write_config(tmp_path), world_size=3)
    assert load_config(write_config(tmp_path), world_size=4).data.batch_size == 256
    with pytest.raises(UserError, match=r"= 4 x 3"):
        load_config(write_config(tmp_path), ["train.accumulation=3"], world_size=4)


def test_missing_data_folder(tmp_path):
    path = write_config(tmp_path)
    with pytest.raises(UserError, match="does-not-exist.*folder does not exist"):
        load_config(path, [f"data.root={tmp_path / 'does-not-exist'}"])


def test_missing_data_folder_is_fine_when_it_will_be_synthesized(tmp_path):
    path = write_config(tmp_path)
    config = load_config(path, [f"data.root={tmp_path / 'later'}", "data.synthesize.classes=4"])
    assert config.data.synthesize.classes == 4


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("text", "kind"), [("- model\n- data\n", "a list"), ("", "empty"), ("# nothing\n", "empty")])
def test_a_yaml_file_that_is_not_a_mapping_is_named_as_such(tmp_path, text, kind):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=f"run.yaml: {kind}, not a mapping of sections"):
        load_config(path)


def test_static_graph_with_accumulation_is_refused(tmp_path):
    """DDP's static graph with no_sync accumulation: an assert at the first step, then silently no all-reduce."""
    path = write_config(tmp_path, "dist:\n  static_graph: true\n")
    assert load_config(path, ["train.accumulation=1"]).dist.static_graph
    with pytest.raises(UserError, match=r"dist.static_graph=True: not with train.accumulation=2: .*#143580"):
        load_config(path, ["train.accumulation=2"])


def test_loading_a_config_imports_no_torch():
    """What a login node or `residual submit` does: load and check a config, in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import sys; from trainer.config import load_config; "
        f"load_config({str(CONFIGS / 'quickstart.yaml')!r}, ['optim.lr=0.2', 'model.name=resnet56']); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_the_torch_free_model_names_are_the_registry():
    from trainer.models.table import MODEL_NAMES

    assert sorted(MODEL_NAMES) == sorted(list_models())


@pytest.mark.parametrize(
    ("old", "new"), [("train.log_every=3", "log.every"), ("train.resume=never", "checkpoint.resume")]
)
def test_a_moved_key_names_its_new_place(tmp_path, old, new):
    with pytest.raises(UserError, match=f"{old.split('=')[0]} is now {new} "):
        load_config(write_config(tmp_path), [old])


def test_the_migration_script_moves_keys_and_keeps_comments(tmp_path):
    import subprocess
    import sys

    old = tmp_path / "old.yaml"
    old.write_text(
        "# a run\nmodel:\n  name: resnet20\n  num_classes: 10\ndata:\n  format: cifar\n  root: .\n"
        "train:\n  iterations: 20\n  eval_every: 5   # often\n  log_every: 2\neval:\n  batch_size: 10\n"
    )
    script = ROOT / "tools" / "migrate_config.py"
    printed = subprocess.run([sys.executable, script, old], capture_output=True, text=True, check=True).stdout
    assert printed == f"{old}: eval: every: 5   # often; log: every: 2\n"
    config = load_config(old)
    assert (config.eval.every, config.log.every, config.eval.batch_size) == (5, 2, 10)
    assert "  every: 5   # often\n" in old.read_text() and old.read_text().startswith("# a run\n")


FASHION_MNIST = sorted(CONFIGS.glob("fashion-mnist/*.yaml"))


@pytest.mark.parametrize("path", FASHION_MNIST, ids=lambda p: p.stem)
def test_fashion_mnist_configs_carry_the_papers_cifar_recipe_over(path):
    """Grey 28 x 28 images, one channel; the paper's SGD; its 64k iterations of CIFAR-10 as 164 epochs with the
    decays at 82 and 123 where the config is the paper's (the quickstart and the fast recipe say what they change)."""
    config = load_config(path, [f"data.root={path.parent}"])
    assert (config.model.in_channels, config.data.format, len(config.data.mean), config.data.flip) == (
        1,
        "idx",
        1,
        True,
    )
    assert (config.optim.momentum, config.optim.weight_decay, config.optim.lr, config.data.batch_size) == (
        0.9,
        1e-4,
        0.1,
        128,
    )
    if path.stem in ("resnet20", "resnet56", "plain20", "plain56"):
        assert (config.train.epochs, config.schedule.unit, config.schedule.milestones) == (164, "epoch", [82, 123])
        assert config.model.name == path.stem and not config.optim.nesterov and config.loss.label_smoothing == 0
