"""Model zoo: CIFAR (CRD) architectures, torchvision adapter, registry, model_info."""
from __future__ import annotations

import copy
import sys

import pytest
import torch
import torchvision
from torch import nn

import sokd.models as models
from sokd.errors import SokdError
from sokd.models import StagedNet

CIFAR = list(models.CIFAR_MODELS)
TV = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: intra-op threads only add synchronisation cost (and stall badly on a busy machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _check_staged(net: StagedNet, x: torch.Tensor, num_classes: int) -> None:
    net.eval()
    with torch.no_grad():
        logits = net(x)
        logits2, feats = net.forward_features(x)
        assert logits.shape == (x.shape[0], num_classes)
        assert torch.equal(logits, logits2)
        assert len(feats) == net.num_stages >= 2
        assert all(f.dim() == 4 and f.shape[0] == x.shape[0] for f in feats)
        for k in range(net.num_stages + 1):
            h, f1 = net.forward_trunk(x, k)
            out, f2 = net.forward_tail(h, k)
            assert len(f1) + len(f2) == net.num_stages
            torch.testing.assert_close(out, logits)


def test_list_models_contents():
    names = models.list_models()
    for n in ["wrn_40_2", "wrn_40_1", "wrn_16_2", "wrn_16_1", "wrn_28_10", "resnet8", "resnet110",
              "resnet8x4", "resnet32x4", "resnet50", "vgg8", "vgg19", "mobilenetv2", "shufflenetv1",
              "shufflenetv2"]:
        assert n in names
    assert set(CIFAR) <= set(names)


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_model_shapes_and_staging(name):
    for c, s in ((1, 28), (3, 32)):
        net = models.create(name, num_classes=10, in_channels=c)
        assert isinstance(net, StagedNet)
        _check_staged(net, torch.randn(2, c, s, s), 10)
    # train mode: features and logits backpropagate (no in-place clobbering of stage outputs)
    net.train()
    logits, feats = net.forward_features(torch.randn(2, 3, 32, 32))
    (logits.sum() + sum(f.pow(2).mean() for f in feats)).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


CRD_PARAMS_M = {"wrn_40_2": 2.25, "wrn_40_1": 0.57, "wrn_16_2": 0.70, "resnet56": 0.86, "resnet20": 0.28,
                "resnet110": 1.73, "resnet32x4": 7.43, "resnet8x4": 1.23, "vgg13": 9.46, "vgg8": 3.96,
                "mobilenetv2": 0.81, "shufflenetv1": 0.95, "shufflenetv2": 1.36, "resnet50": 23.71}


@pytest.mark.parametrize("name", sorted(CRD_PARAMS_M))
def test_param_counts_match_crd(name):
    net = models.create(name, num_classes=100)
    n = sum(p.numel() for p in net.parameters()) / 1e6
    assert n == pytest.approx(CRD_PARAMS_M[name], rel=0.03)


def test_stage_counts():
    expected = {"wrn_40_2": 3, "resnet56": 3, "resnet32x4": 3, "resnet50": 4, "vgg13": 5, "mobilenetv2": 4,
                "shufflenetv1": 3, "shufflenetv2": 3}
    for name, n in expected.items():
        assert models.create(name, 10).num_stages == n, name


@pytest.mark.parametrize("name", ["resnet20", "wrn_16_2", "vgg8", "mobilenetv2", "shufflenetv2"])
def test_reset_parameters_reinitialises_copied_stage(name):
    net = models.create(name, num_classes=10)
    stage = copy.deepcopy(net.stages[-1])
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(1.0)
    before = [p.detach().clone() for p in stage.parameters()]
    net.reset_parameters(stage)
    after = list(stage.parameters())
    assert all(not torch.equal(b, a) for b, a in zip(before, after))
    for m in stage.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # the original stage is untouched
    for (name_a, a), b in zip(net.stages[-1].named_parameters(), after):
        assert not torch.equal(a, b) or torch.all(b == 0) or torch.all(b == 1), name_a


def test_reset_matches_fresh_init_statistics():
    net = models.create("wrn_40_2", 10)
    conv = net.stages[-1][0].conv1
    fresh_std = conv.weight.std().item()
    with torch.no_grad():
        conv.weight.mul_(10)
    net.reset_parameters(net.stages[-1])
    assert conv.weight.std().item() == pytest.approx(fresh_std, rel=0.1)


def test_any_valid_wrn_and_invalid_ones():
    net = models.create("wrn_22_3", 10)
    assert net.num_stages == 3 and net.head[-1].in_features == 64 * 3
    for bad in ("wrn_41_2", "wrn_40_0"):
        with pytest.raises(SokdError, match="wrn"):
            models.create(bad, 10)
    with pytest.raises(SokdError, match=r"\(depth - 4\) % 6"):
        models.create("wrn_41_2", 10)


def test_unknown_model_lists_valid_names():
    with pytest.raises(SokdError) as err:
        models.create("resnet57", 10)
    msg = str(err.value)
    assert "resnet57" in msg and "resnet56" in msg and "wrn_40_2" in msg and "tv." in msg
    with pytest.raises(SokdError) as err:
        models.create("tv.resnet19", 10)
    assert "tv.resnet18" in str(err.value)


def test_bad_arguments():
    with pytest.raises(SokdError, match="num_classes"):
        models.create("resnet8", 0)
    with pytest.raises(SokdError, match="in_channels"):
        models.create("resnet8", 10, in_channels=0)
    with pytest.raises(SokdError, match="does not accept"):
        models.create("resnet8", 10, width=3)
    assert models.create("wrn_16_1", 10, dropout=0.3).num_stages == 3
    with pytest.raises(SokdError, match="net_size"):
        models.create("shufflenetv2", 10, net_size=3)


def test_model_info():
    info = models.model_info("wrn_40_2", input_shape=(3, 32, 32), num_classes=100)
    assert set(info) == {"params", "macs"}
    assert info["params"] == pytest.approx(2.25e6, rel=0.03)
    assert info["macs"] == pytest.approx(0.33e9, rel=0.03)
    net = models.create("resnet8", 10, in_channels=1)
    net.train()
    small = models.model_info(net, input_shape=(1, 28, 28))
    assert small["params"] > 0 and small["macs"] > 0
    assert net.training  # mode restored
    with pytest.raises(SokdError):
        models.model_info("resnet8", input_shape=(32, 32))


@pytest.mark.parametrize("name", TV)
def test_torchvision_adapter_matches_original(name):
    original = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    net = models.from_torchvision(original)
    assert isinstance(net, StagedNet) and net.num_stages >= 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), original(x))
    _check_staged(net, x, 10)
    gray = models.create(f"tv.{name}", num_classes=7, in_channels=1)
    _check_staged(gray, torch.randn(2, 1, 64, 64), 7)


def test_torchvision_stage_grouping():
    shapes = {}
    for name in ("mobilenet_v2", "efficientnet_b0", "convnext_tiny", "resnet18"):
        net = models.create(f"tv.{name}", 10).eval()
        with torch.no_grad():
            _, feats = net.forward_features(torch.randn(1, 3, 64, 64))
        shapes[name] = [tuple(f.shape[1:]) for f in feats]
    # resolution-bounded stages; mobilenet/efficientnet keep the 1x1 expand conv in the last stage
    assert shapes["mobilenet_v2"] == [(16, 32, 32), (24, 16, 16), (32, 8, 8), (96, 4, 4), (1280, 2, 2)]
    assert shapes["efficientnet_b0"][-1] == (1280, 2, 2) and len(shapes["efficientnet_b0"]) == 5
    assert shapes["convnext_tiny"] == [(96, 16, 16), (192, 8, 8), (384, 4, 4), (768, 2, 2)]
    assert shapes["resnet18"] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]


def test_torchvision_reset_restores_constant_parameters():
    net = models.create("tv.convnext_tiny", 10)
    stage = copy.deepcopy(net.stages[-1])
    block = next(m for m in stage.modules() if hasattr(m, "layer_scale"))
    init = block.layer_scale.detach().clone()
    with torch.no_grad():
        block.layer_scale.fill_(0.5)
    net.reset_parameters(stage)
    assert torch.equal(block.layer_scale.detach(), init)


def test_torchvision_weights_file(tmp_path):
    original = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "r18.pt"
    torch.save(original.state_dict(), path)
    net = models.create("tv.resnet18", 10, weights=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), original(x))
        gray = models.create("tv.resnet18", 10, in_channels=1, weights=str(path)).eval()
        g = torch.randn(1, 1, 64, 64)
        torch.testing.assert_close(gray(g), original(g.expand(1, 3, 64, 64)))
    with pytest.raises(SokdError, match=r"fc\.weight"):
        models.create("tv.resnet18", 100, weights=str(path))
    with pytest.raises(SokdError, match="does not exist"):
        models.create("tv.resnet18", 10, weights=str(tmp_path / "missing.pt"))


def test_from_torchvision_refuses_non_chain_models():
    class TwoBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, 2, 1)
            self.b = nn.Conv2d(8, 8, 3, 2, 1)
            self.c = nn.Conv2d(8, 8, 3, 2, 1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = self.a(x)
            x = self.b(x) + self.c(self.b(x)).mean()
            return self.fc(x.mean((2, 3)))

    with pytest.raises(SokdError, match="adapt"):
        models.from_torchvision(TwoBranch())


def test_from_torchvision_handles_simple_chains_and_keeps_mode():
    model = nn.Sequential()  # children run in order: stem, two stride-2 stages, classifier
    model.add_module("stem", nn.Conv2d(3, 8, 3, padding=1))
    model.add_module("s1", nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()))
    model.add_module("s2", nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU()))
    model.add_module("avgpool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", nn.Flatten(1))
    model.add_module("fc", nn.Linear(32, 5))
    model.train()
    net = models.from_torchvision(model)
    assert net.num_stages == 2 and model.training and net.training
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net.eval()(x), model.eval()(x))


def test_register_and_adapt():
    @models.register("tiny_test_net", overwrite=True)
    def tiny(num_classes, in_channels=3, width=8):
        return models.adapt(nn.Conv2d(in_channels, width, 3, padding=1),
                            [nn.Sequential(nn.Conv2d(width, width, 3, 2, 1), nn.ReLU()),
                             nn.Sequential(nn.Conv2d(width, width, 3, 2, 1), nn.ReLU())],
                            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(width, num_classes)))

    assert "tiny_test_net" in models.list_models()
    net = models.create("tiny_test_net", 3, in_channels=1, width=4)
    _check_staged(net, torch.randn(2, 1, 28, 28), 3)
    with pytest.raises(SokdError, match="already registered"):
        models.register("tiny_test_net")(lambda num_classes, in_channels=3: net)

    @models.register("not_staged_test_net", overwrite=True)
    def plain(num_classes, in_channels=3):
        return nn.Linear(4, num_classes)

    with pytest.raises(SokdError, match="adapt"):
        models.create("not_staged_test_net", 3)
    with pytest.raises(SokdError):
        models.adapt(nn.Identity(), [], nn.Identity())


def test_timm_missing_is_a_sokd_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # behaves as not installed
    with pytest.raises(SokdError, match=r"pip install sokd\[timm\]"):
        models.create("timm.resnet18", 10)
