"""Published CIFAR teacher files (RepDistiller / mdistiller layout) load into the sokd zoo.

Each reference network below is a small, independent re-implementation of a published CIFAR
architecture: its module attribute names are the published files' key names, its forward pass
is the published one (fixed-window pooling, shortcut placement, VGG's pool-between-blocks). A
file written from it in the released format (`{'model': state_dict, ...}`) must load through
`sokd.models.create(..., weights=PATH)` and give the reference's logits on a batch.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sokd
from sokd.cli import main
from sokd.errors import SokdError
from sokd.models.published import LAYOUT, PUBLISHED_ROOTS, family_name, published_keys

from .conftest import tiny_config, write_config


def bn(c):
    return nn.BatchNorm2d(c)


def conv(cin, cout, k=3, stride=1, groups=1, bias=False):
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)


# ------------------------------------------------------------------ WideResNet (wrn_D_W)
class RefWrnUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1, self.bn2, self.conv2 = bn(cin), conv(cin, cout, 3, stride), bn(cout), conv(cout, cout)
        self.convShortcut = conv(cin, cout, 1, stride) if cin != cout else None

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class RefWrnGroup(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[RefWrnUnit(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class RefWrn(nn.Module):
    def __init__(self, depth, width, classes):
        super().__init__()
        n, w = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = conv(3, 16)
        self.block1, self.block2, self.block3 = (RefWrnGroup(n, w[i], w[i + 1], s) for i, s in enumerate((1, 2, 2)))
        self.bn1, self.fc = bn(w[3]), nn.Linear(w[3], classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(F.avg_pool2d(F.relu(self.bn1(x)), 8).flatten(1))


# ------------------------------------------------------------------ CIFAR ResNet and ResNet50
class RefBasic(nn.Module):
    def __init__(self, cin, cout, stride, shortcut_name="downsample"):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = conv(cin, cout, 3, stride), bn(cout), conv(cout, cout), bn(cout)
        proj = nn.Sequential(conv(cin, cout, 1, stride), bn(cout)) if (stride != 1 or cin != cout) else None
        setattr(self, shortcut_name, proj)
        self.shortcut_name = shortcut_name

    def forward(self, x):
        proj = getattr(self, self.shortcut_name)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if proj is None else proj(x)))


class RefCifarResNet(nn.Module):
    def __init__(self, depth, widths, classes):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1, self.bn1 = conv(3, widths[0]), bn(widths[0])
        cin = widths[0]
        for i in range(3):
            units = []
            for j in range(n):
                units.append(RefBasic(cin, widths[i + 1], 2 if (i > 0 and j == 0) else 1))
                cin = widths[i + 1]
            setattr(self, f"layer{i + 1}", nn.Sequential(*units))
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.avg_pool2d(x, 8).flatten(1))


class RefBottleneck(nn.Module):
    def __init__(self, cin, planes, stride):
        super().__init__()
        cout = 4 * planes
        self.conv1, self.bn1 = conv(cin, planes, 1), bn(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3, stride), bn(planes)
        self.conv3, self.bn3 = conv(planes, cout, 1), bn(cout)
        self.shortcut = (nn.Sequential(conv(cin, cout, 1, stride), bn(cout)) if (stride != 1 or cin != cout)
                         else nn.Sequential())

    def forward(self, x):
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class RefResNet50(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.conv1, self.bn1 = conv(3, 64), bn(64)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            units = []
            for j in range(n):
                units.append(RefBottleneck(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = 4 * planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*units))
        self.linear = nn.Linear(2048, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ------------------------------------------------------------------ VGG with BN, FC layers removed
class RefVGG(nn.Module):
    def __init__(self, cfg, classes):
        super().__init__()
        cin = 3
        for k, widths in enumerate(cfg):
            layers = []
            for w in widths:
                layers += [conv(cin, w, bias=True), bn(w), nn.ReLU()]
                cin = w
            setattr(self, f"block{k}", nn.Sequential(*layers[:-1]))  # each block ends at its BN
        self.classifier = nn.Linear(512, classes)

    def forward(self, x):
        h = x.shape[2]
        x = F.relu(self.block0(x))
        for k in (1, 2, 3):
            x = F.relu(getattr(self, f"block{k}")(F.max_pool2d(x, 2)))
        if h == 64:
            x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ------------------------------------------------------------------ MobileNetV2 ("mobile_half")
class RefInverted(nn.Module):
    def __init__(self, cin, cout, stride, t):
        super().__init__()
        hid = cin * t
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(conv(cin, hid, 1), bn(hid), nn.ReLU(), conv(hid, hid, 3, stride, groups=hid),
                                  bn(hid), nn.ReLU(), conv(hid, cout, 1), bn(cout))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class RefMobileNetV2(nn.Module):
    def __init__(self, classes, t=6, width=0.5):
        super().__init__()
        groups = [(1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2), (t, 96, 3, 1), (t, 160, 3, 2),
                  (t, 320, 1, 1)]
        cin = int(32 * width)
        self.conv1 = nn.Sequential(conv(3, cin, 3, 2), bn(cin), nn.ReLU())
        self.blocks = nn.ModuleList()
        for e, c, n, s in groups:
            units = []
            for j in range(n):
                units.append(RefInverted(cin, int(c * width), s if j == 0 else 1, e))
                cin = int(c * width)
            self.blocks.append(nn.Sequential(*units))
        self.conv2 = nn.Sequential(conv(cin, 1280, 1), bn(1280), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(1280, classes))

    def forward(self, x):
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        x = F.avg_pool2d(self.conv2(x), 2, ceil_mode=True)
        return self.classifier(x.flatten(1))


# ------------------------------------------------------------------ ShuffleNet V1 / V2
def shuffle(x, g):
    n, c, h, w = x.shape
    return x.reshape(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class RefShuffleV1Unit(nn.Module):
    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        mid, self.g1, self.stride = cout // 4, (1 if cin == 24 else groups), stride
        self.conv1, self.bn1 = conv(cin, mid, 1, groups=self.g1), bn(mid)
        self.conv2, self.bn2 = conv(mid, mid, 3, stride, groups=mid), bn(mid)
        self.conv3, self.bn3 = conv(mid, cout, 1, groups=groups), bn(cout)

    def forward(self, x):
        out = shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class RefShuffleV1(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.conv1, self.bn1 = conv(3, 24, 1), bn(24)
        cin = 24
        for i, (planes, n) in enumerate(zip((240, 480, 960), (4, 8, 4))):
            units = []
            for j in range(n):
                units.append(RefShuffleV1Unit(cin, planes - (cin if j == 0 else 0), 2 if j == 0 else 1, 3))
                cin = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*units))
        self.linear = nn.Linear(960, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(F.avg_pool2d(x, 4).flatten(1))


class RefShuffleV2Down(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.conv1, self.bn1 = conv(cin, cin, 3, 2, groups=cin), bn(cin)
        self.conv2, self.bn2 = conv(cin, mid, 1), bn(mid)
        self.conv3, self.bn3 = conv(cin, mid, 1), bn(mid)
        self.conv4, self.bn4 = conv(mid, mid, 3, 2, groups=mid), bn(mid)
        self.conv5, self.bn5 = conv(mid, mid, 1), bn(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        return shuffle(torch.cat([left, F.relu(self.bn5(self.conv5(right)))], 1), 2)


class RefShuffleV2Unit(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.half = h = c // 2
        self.conv1, self.bn1 = conv(h, h, 1), bn(h)
        self.conv2, self.bn2 = conv(h, h, 3, groups=h), bn(h)
        self.conv3, self.bn3 = conv(h, h, 1), bn(h)

    def forward(self, x):
        keep, work = x[:, :self.half], x[:, self.half:]
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(work)))))
        return shuffle(torch.cat([keep, F.relu(self.bn3(self.conv3(out)))], 1), 2)


class RefShuffleV2(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.conv1, self.bn1 = conv(3, 24, 1), bn(24)
        cin = 24
        for i, (cout, n) in enumerate(zip((116, 232, 464), (3, 7, 3))):
            setattr(self, f"layer{i + 1}", nn.Sequential(RefShuffleV2Down(cin, cout),
                                                         *[RefShuffleV2Unit(cout) for _ in range(n)]))
            cin = cout
        self.conv2, self.bn2, self.linear = conv(464, 1024, 1), bn(1024), nn.Linear(1024, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(self.layer3(self.layer2(self.layer1(x))))))
        return self.linear(F.avg_pool2d(x, 4).flatten(1))


VGG_CFG = {"vgg8": [[64], [128], [256], [512], [512]],
           "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]}

# every published family, its released teachers (wrn_40_2, resnet56, resnet32x4, vgg13, resnet50)
# and the CRD students of other widths; resnet110 / resnet20 / wrn_40_1 differ only in depth
REFERENCES = {  # sokd name -> published-architecture reference
    "wrn_40_2": lambda c: RefWrn(40, 2, c),
    "wrn_16_2": lambda c: RefWrn(16, 2, c),
    "resnet56": lambda c: RefCifarResNet(56, (16, 16, 32, 64), c),
    "resnet32x4": lambda c: RefCifarResNet(32, (32, 64, 128, 256), c),
    "resnet8x4": lambda c: RefCifarResNet(8, (32, 64, 128, 256), c),
    "resnet50": RefResNet50,
    "vgg13": lambda c: RefVGG(VGG_CFG["vgg13"], c),
    "vgg8": lambda c: RefVGG(VGG_CFG["vgg8"], c),
    "mobilenetv2": RefMobileNetV2,
    "shufflenetv1": RefShuffleV1,
    "shufflenetv2": RefShuffleV2,
}


def trained_like(ref: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, as a trained file has: statistics
    from one batch (momentum 1), then random scales and shifts. Returns the net in eval mode."""
    torch.manual_seed(1)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    ref.train()
    with torch.no_grad():
        ref(torch.randn(4, 3, 32, 32))
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            elif isinstance(m, nn.Linear):
                m.bias.normal_(0, 0.1)
    return ref.eval()


def released_file(tmp_path, ref: nn.Module, name="ckpt_epoch_240.pth", drop_counter=False, prefix=""):
    """A file in RepDistiller's release format: {'epoch', 'model': state_dict, 'accuracy', 'optimizer'}."""
    state = {prefix + k: v for k, v in ref.state_dict().items()
             if not (drop_counter and k.endswith("num_batches_tracked"))}
    path = tmp_path / name
    torch.save({"epoch": 240, "model": state, "accuracy": 75.61, "optimizer": {"state": {}, "param_groups": []}},
               path)
    return path


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.mark.parametrize("arch", sorted(REFERENCES))
def test_a_published_file_loads_and_gives_the_original_architectures_logits(arch, tmp_path):
    ref = trained_like(REFERENCES[arch](100))
    path = released_file(tmp_path, ref)
    net = sokd.models.create(arch, num_classes=100, weights=str(path)).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = ref(x), net(x)
    assert want.std() > 1e-2  # a batch whose logits differ, not a degenerate all-equal output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert sokd.models.spec_of(net)["kwargs"] == {}  # the file is a loading step, not part of the spec


def test_every_zoo_architecture_has_a_published_name_for_every_tensor():
    for arch in sokd.models.CIFAR_MODELS:
        with torch.device("meta"):  # names and shapes only
            net = sokd.models.create(arch, num_classes=10)
        keys = published_keys(net)
        assert keys is not None and set(keys) == set(net.state_dict())
        assert len(set(keys.values())) == len(keys)  # one-to-one
        roots = frozenset(k.split(".", 1)[0] for k in keys.values())
        assert PUBLISHED_ROOTS[family_name(net)] == roots


def test_legacy_files_without_batch_counters_and_dataparallel_prefixes_load(tmp_path):
    ref = trained_like(REFERENCES["resnet8x4"](100))
    x = torch.randn(2, 3, 32, 32)
    for path in (released_file(tmp_path, ref, "old.pth", drop_counter=True),
                 released_file(tmp_path, ref, "dp.pth", prefix="module.")):
        net = sokd.models.create("resnet8x4", num_classes=100, weights=str(path)).eval()
        with torch.no_grad():
            torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-5)


def test_a_plain_sokd_state_dict_loads_through_weights_too(tmp_path):
    net = trained_like(sokd.models.create("wrn_16_1", num_classes=10))
    torch.save(net.state_dict(), tmp_path / "mine.pt")
    again = sokd.models.create("wrn_16_1", num_classes=10, weights=str(tmp_path / "mine.pt")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))


def refused(arch, path, num_classes=100) -> str:
    with pytest.raises(SokdError) as err:
        sokd.models.create(arch, num_classes=num_classes, weights=str(path))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_files_that_do_not_fit_are_refused_in_one_line(tmp_path):
    wrn = released_file(tmp_path, REFERENCES["wrn_40_2"](100), "wrn.pth")
    assert "holds a RepDistiller/mdistiller WideResNet (wrn_D_W), not a CIFAR ResNet" in refused("resnet56", wrn)
    msg = refused("wrn_16_2", wrn)
    assert "of another depth or width" in msg and "block1.layer.2.bn1.weight" in msg
    assert "does not fit this network (shape mismatch: head.4.weight (file (100, 128), model (10, 128))" in refused(
        "wrn_40_2", wrn, 10)

    torch.save({"model": {"encoder.weight": torch.zeros(1), "decoder.bias": torch.zeros(1)}}, tmp_path / "x.pth")
    msg = refused("resnet8", tmp_path / "x.pth")
    assert msg.startswith("model 'resnet8': unknown weights layout in ") and "encoder.weight, decoder.bias" in msg

    basic = {f"{m}.weight": torch.zeros(1) for m in ("conv1", "bn1", "layer1.0.conv1", "layer2.0.conv1",
                                                     "layer3.0.conv1", "layer4.0.conv2", "linear")}
    torch.save({"model": basic}, tmp_path / "resnet18.pth")
    assert "basic-block CIFAR ResNet18/34" in refused("resnet50", tmp_path / "resnet18.pth")

    distiller = {"student.conv1.weight": torch.zeros(1), "teacher.conv1.weight": torch.zeros(1)}
    torch.save({"model": distiller}, tmp_path / "latest")
    assert "student_best" in refused("resnet8", tmp_path / "latest")


def test_a_refused_file_leaves_no_trace_and_a_published_teacher_trains_a_student(tmp_path, capsys):
    ref = trained_like(RefCifarResNet(14, (16, 16, 32, 64), 4))
    good = released_file(tmp_path, ref, "teacher.pth")
    torch.save({"model": {"fc.weight": torch.zeros(4, 64)}}, tmp_path / "bad.pth")
    cfg = tiny_config(tmp_path, "kd", train={"epochs": 1, "seed": 0},
                      teacher={"arch": "resnet14", "checkpoint": None, "weights": str(tmp_path / "bad.pth")})
    assert main(["train", str(write_config(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown weights layout" in err
    assert not (tmp_path / "runs").exists()

    cfg["teacher"]["weights"] = str(good)
    assert main(["train", str(write_config(tmp_path, cfg))]) == 0
    assert (tmp_path / "runs" / "kd" / "summary.json").is_file()


def test_the_loader_says_which_layout_it_read(tmp_path):
    from sokd.models.published import load_weights
    ref = trained_like(REFERENCES["vgg8"](10))
    net = sokd.models.create("vgg8", num_classes=10)
    assert load_weights(net, released_file(tmp_path, ref), "vgg8") == LAYOUT == "RepDistiller/mdistiller"
    torch.save(net.state_dict(), tmp_path / "own.pt")
    assert load_weights(net, tmp_path / "own.pt", "vgg8") == "sokd"
