import pytest
import torch
import torchvision
from torch import nn

from trainer.models import create_model, get_model_spec, list_models
from trainer.models.complexity import count_params_and_macs
from trainer.models.resnet import ZeroPadShortcut

IMAGENET = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "plain18", "plain34"]
CIFAR = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202"]
CIFAR += ["plain20", "plain32", "plain44", "plain56"]


def test_registry_has_every_model_of_the_paper():
    assert sorted(list_models()) == sorted(IMAGENET + CIFAR)


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_output_shape(name):
    spec = get_model_spec(name)
    model = create_model(name, num_classes=7).eval()
    size = 64 if spec.dataset == "imagenet" else 32  # global pooling: any size that survives 5 halvings
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.slow) if name == "resnet1202" else name for name in IMAGENET + CIFAR]
)
def test_params_within_two_percent_of_the_paper(name):
    params, _ = count_params_and_macs(name)
    assert params == pytest.approx(get_model_spec(name).paper_params, rel=0.02)


@pytest.mark.parametrize("name", ["resnet34", "resnet50", "resnet101", "resnet152"])
def test_macs_within_three_percent_of_the_paper(name):
    _, macs = count_params_and_macs(name, stride_in_1x1=True)
    assert macs == pytest.approx(get_model_spec(name).paper_macs, rel=0.03)


def test_v15_layout_costs_more_than_the_papers():
    _, v1 = count_params_and_macs("resnet50", stride_in_1x1=True)
    _, v15 = count_params_and_macs("resnet50")
    assert v15 / v1 == pytest.approx(1.06, abs=0.01)


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet34", "resnet50", "resnet101", pytest.param("resnet152", marks=pytest.mark.slow)]
)
def test_torchvision_state_dict_round_trip(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)().eval()
    ours = create_model(name).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    image = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(ours(image), reference(image))
    torch.manual_seed(1)
    ours = create_model(name).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(ours(image), reference(image))


def shortcuts(model: nn.Module) -> list[nn.Module | None]:
    return [block.downsample for stage in model.stages() for block in stage]


def test_option_a_has_no_shortcut_parameters():
    model = create_model("resnet34", shortcut="A")
    assert all(s is None or isinstance(s, ZeroPadShortcut) for s in shortcuts(model))
    assert not any(name for name, _ in model.named_parameters() if "downsample" in name)
    assert sum(isinstance(s, ZeroPadShortcut) for s in shortcuts(model)) == 3


def test_option_b_projects_only_where_dimensions_grow():
    projected = [isinstance(s, nn.Sequential) for s in shortcuts(create_model("resnet34"))]
    assert sum(projected) == 3 and projected.count(False) == 13


def test_option_c_projects_every_shortcut():
    assert all(isinstance(s, nn.Sequential) for s in shortcuts(create_model("resnet34", shortcut="C")))
    assert all(isinstance(s, nn.Sequential) for s in shortcuts(create_model("resnet20", shortcut="C")))


def test_cifar_nets_default_to_option_a_and_plain_nets_have_no_shortcut():
    assert all(s is None or isinstance(s, ZeroPadShortcut) for s in shortcuts(create_model("resnet56")))
    plain = create_model("plain20")
    assert all(s is None for s in shortcuts(plain)) and not any(block.residual for block in plain.layer1)


def test_zero_pad_shortcut_subsamples_and_pads():
    x = torch.randn(1, 16, 8, 8)
    out = ZeroPadShortcut(stride=2, extra_channels=16)(x)
    assert out.shape == (1, 32, 4, 4)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2]) and not out[:, 16:].any()


def test_stride_in_1x1_moves_the_bottleneck_stride():
    paper = create_model("resnet50", stride_in_1x1=True).layer2[0]
    torchvision_layout = create_model("resnet50").layer2[0]
    assert (paper.conv1.stride, paper.conv2.stride) == ((2, 2), (1, 1))
    assert (torchvision_layout.conv1.stride, torchvision_layout.conv2.stride) == ((1, 1), (2, 2))


def test_zero_init_residual_zeroes_the_last_bn_of_every_block():
    model = create_model("resnet50", zero_init_residual=True)
    assert all(not block.bn3.weight.any() for stage in model.stages() for block in stage)
    assert model.layer1[0].bn1.weight.all()


def test_he_fan_out_initialization():
    conv = create_model("resnet18").layer3[0].conv2  # 256 -> 256, 3x3: fan_out = 256 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05)


def test_any_6n_plus_2_depth_by_override():
    model = create_model("resnet20", depth=26)
    assert [len(stage) for stage in model.stages()] == [4, 4, 4]
    with pytest.raises(ValueError, match="6n\\+2"):
        create_model("resnet20", depth=25)


def test_unknown_model_names_the_registered_ones():
    with pytest.raises(KeyError, match="resnet50"):
        create_model("resnet51")
