"""The strong view: RandAugment with random magnitudes, then Cutout, batched on uint8 NCHW tensors.

This is the strong augmentation of FixMatch-style semi-supervised code, which MLKD (Jin et al.,
CVPR 2023) uses for its second view of CIFAR-100: after the usual pad-crop-flip, each image gets
two operations drawn with replacement from the 14 below, each with a magnitude drawn uniformly
from the operation's own range (the "m" of RandAugment is unused there), and then a Cutout square
of side U(0, 0.5) × width filled with (125, 123, 114).

    AutoContrast, Equalize, Identity; Brightness, Color, Contrast, Sharpness (PIL enhance factor
    in [0.05, 0.95]); Posterize (4..8 bits); Rotate (±30°); ShearX/Y (±0.3); Solarize (threshold
    0..256); TranslateX/Y (±0.3 of the size)

Every image draws its own operations and magnitudes from the generator it is given, so a batch's
strong view is a pure function of (seed, epoch, rank, batch): a resumed run sees the same views.
Operations run per group of images sharing an operation, as tensor ops (no per-image Python).
Geometric operations sample with nearest neighbours and fill uncovered pixels with grey 128.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CUTOUT_FILL = (125, 123, 114)
GEOMETRIC_FILL = 128.0
OPS_PER_IMAGE = 2


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: degenerate + factor · (x − degenerate), clamped to [0, 255]."""
    f = factor.view(-1, 1, 1, 1)
    return (degenerate + f * (x - degenerate)).clamp_(0, 255)


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _enhance_factor(u: torch.Tensor) -> torch.Tensor:
    return 0.05 + 0.9 * u


def _brightness(x, u):
    return _blend(x, torch.zeros_like(x), _enhance_factor(u))


def _color(x, u):
    return _blend(x, _grey(x), _enhance_factor(u))


def _contrast(x, u):
    mean = _grey(x)[:, :1].mean(dim=(1, 2, 3), keepdim=True).round()
    return _blend(x, mean.expand_as(x), _enhance_factor(u))


def _sharpness(x, u):
    c = x.shape[1]
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13.0
    smooth = F.conv2d(x, kernel.view(1, 1, 3, 3).repeat(c, 1, 1, 1), padding=1, groups=c).round()
    smooth[..., 0, :], smooth[..., -1, :] = x[..., 0, :], x[..., -1, :]   # PIL keeps the border
    smooth[..., :, 0], smooth[..., :, -1] = x[..., :, 0], x[..., :, -1]
    return _blend(x, smooth, _enhance_factor(u))


def _posterize(x, u):
    bits = (4 + (u * 5).floor().clamp(max=4)).view(-1, 1, 1, 1)   # 4..8
    step = torch.pow(2.0, 8 - bits)
    return (x / step).floor() * step


def _solarize(x, u):
    threshold = (u * 256).view(-1, 1, 1, 1)
    return torch.where(x >= threshold, 255 - x, x)


def _tv_functional():
    """torchvision's v2 functional ops, imported when a strong view is first drawn: importing
    torchvision pulls in torch._dynamo, a second or more at every start of the command line."""
    from torchvision.transforms.v2 import functional
    return functional


def _autocontrast(x, u):
    return _tv_functional().autocontrast(x.to(torch.uint8)).float()


def _equalize(x, u):
    return _tv_functional().equalize(x.to(torch.uint8)).float()


def _identity(x, u):
    return x


def _affine(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Each image resampled at matrix @ (col, row, 1) in pixel coordinates about its centre
    (nearest neighbour); pixels from outside the image are grey."""
    n, _, h, w = x.shape
    to_norm = torch.tensor([[2.0 / w, 0, 0], [0, 2.0 / h, 0]], device=x.device)
    from_norm = torch.tensor([[w / 2.0, 0, 0], [0, h / 2.0, 0], [0, 0, 1.0]], device=x.device)
    full = torch.cat([matrix, torch.tensor([0, 0, 1.0], device=x.device).expand(n, 1, 3)], dim=1)
    theta = to_norm @ full @ from_norm
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    inside = F.grid_sample(torch.ones_like(x[:, :1]), grid, mode="nearest", align_corners=False)
    out = F.grid_sample(x, grid, mode="nearest", align_corners=False)
    return torch.where(inside > 0.5, out, torch.full_like(out, GEOMETRIC_FILL))


def _signed(u: torch.Tensor, limit: float) -> torch.Tensor:
    return (2 * u - 1) * limit


def _matrix(n: int, device, a=None, b=None, c=None, d=None, tx=None, ty=None) -> torch.Tensor:
    m = torch.zeros(n, 2, 3, device=device)
    m[:, 0, 0] = 1 if a is None else a
    m[:, 0, 1] = 0 if b is None else b
    m[:, 1, 0] = 0 if c is None else c
    m[:, 1, 1] = 1 if d is None else d
    m[:, 0, 2] = 0 if tx is None else tx
    m[:, 1, 2] = 0 if ty is None else ty
    return m


def _rotate(x, u):
    angle = _signed(u, 30.0) * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    return _affine(x, _matrix(len(x), x.device, a=cos, b=-sin, c=sin, d=cos))


def _shear_x(x, u):
    return _affine(x, _matrix(len(x), x.device, b=_signed(u, 0.3)))


def _shear_y(x, u):
    return _affine(x, _matrix(len(x), x.device, c=_signed(u, 0.3)))


def _translate_x(x, u):
    return _affine(x, _matrix(len(x), x.device, tx=_signed(u, 0.3) * x.shape[-1]))


def _translate_y(x, u):
    return _affine(x, _matrix(len(x), x.device, ty=_signed(u, 0.3) * x.shape[-2]))


OPS = (_autocontrast, _brightness, _color, _contrast, _equalize, _identity, _posterize, _rotate,
       _sharpness, _shear_x, _shear_y, _solarize, _translate_x, _translate_y)


def cutout(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A square of side U(0, 0.5) × width at a uniform centre, filled with CUTOUT_FILL (clipped)."""
    n, c, h, w = x.shape
    draws = torch.rand(3, n, generator=generator, device=x.device)
    side = (draws[0] * 0.5 * w).floor()
    cy, cx = (draws[1] * h).floor(), (draws[2] * w).floor()
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    top, left = (cy - side / 2).floor().view(n, 1, 1), (cx - side / 2).floor().view(n, 1, 1)
    size = side.view(n, 1, 1)
    hole = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    fill = torch.tensor(CUTOUT_FILL if c == 3 else (sum(CUTOUT_FILL) / 3.0,) * c, device=x.device)
    return torch.where(hole[:, None], fill.view(1, c, 1, 1), x)


def strong_view(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """uint8 (N,C,H,W) -> uint8: OPS_PER_IMAGE random operations per image, then Cutout."""
    n = x.shape[0]
    out = x.float()
    ops = torch.randint(0, len(OPS), (OPS_PER_IMAGE, n), generator=generator, device=x.device)
    magnitudes = torch.rand(OPS_PER_IMAGE, n, generator=generator, device=x.device)
    for slot in range(OPS_PER_IMAGE):
        for k in ops[slot].unique().tolist():
            chosen = (ops[slot] == k).nonzero().squeeze(1)
            out[chosen] = OPS[k](out[chosen], magnitudes[slot, chosen]).round()
    return cutout(out, generator).round().clamp_(0, 255).to(torch.uint8)
