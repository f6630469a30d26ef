from trainer.config import OptimConfig
from trainer.models import create_model
from trainer.recipe.optim import build_optimizer


def test_sgd_of_the_paper():
    optimizer = build_optimizer(create_model("resnet20"), OptimConfig())
    (group,) = optimizer.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.1, 0.9, 1e-4, False)


def test_no_weight_decay_on_bn_and_bias():
    model = create_model("resnet20")
    decay, no_decay = build_optimizer(model, OptimConfig(no_decay_bn_bias=True)).param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {
        id(p) for n, p in model.named_parameters() if "bn" in n or n.endswith("bias")
    }
    assert all(p.ndim == 4 or p.ndim == 2 for p in decay["params"])
