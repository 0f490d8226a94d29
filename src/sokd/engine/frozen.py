"""Frozen networks run as inference networks: BatchNorm folded away, weights cast once.

A frozen teacher never learns, yet a plain training step runs it like any module: every
BatchNorm is a separate pass over the activations, and under autocast every convolution casts
its fp32 weights to bf16 again on every call (autocast caches casts of leaf tensors that require
grad only; a frozen weight is cast anew each time). `prepare` turns each frozen role of a method
into an inference network for the duration of a run:

- Roles the method runs in inference mode throughout (`Method.inference_roles`: frozen, BatchNorm
  on running statistics in training and evaluation alike, e.g. KD's teacher) get every
  BatchNorm that directly follows a convolution folded into that convolution: the convolution
  computes `conv(x) * g / sqrt(v + eps) + (b - m) * g / sqrt(v + eps) + beta` with one kernel,
  and the BatchNorm passes its input on. Pairs are found by running one batch with hooks (a
  BatchNorm whose input is the very tensor a convolution returned), so any architecture built
  from `nn.Conv2d` and `nn.BatchNorm2d` is covered, whatever its forward looks like.
- Every frozen role (also a teacher whose BatchNorm uses batch statistics, SOKD's reference
  `teacher_bn: train`) gets its convolution and linear weights cast once to the step's
  precision: the same rounding autocast applies each step, so those numerics are unchanged.

When the run compiles its step (`train.compile`), each inference role is also compiled on its
own, as an inference graph with inductor's freezing: its weights become constants, so inductor
folds what is left of BatchNorm, fuses convolution, bias and ReLU and lays the weights out once
for the CPU's or GPU's kernels (on a 2-core AVX-512 BF16 EPYC, bf16, timed in rounds: wrn_40_2's
forward 1.07x the eager folded one, about 10 s to compile; its convolutions already run near the
matmul peak there). The step's own graph calls it as an opaque function (a graph break
around the teacher call), since a frozen graph cannot live inside a graph that also trains.
Entry points compiled: `forward`, `forward_features`, `forward_trunk`, `forward_tail` (what methods
call on a network), each when first called.

The saved state is untouched: folded and cast weights are non-persistent buffers beside the
original parameters, which stay as they were (checkpoints, model files and `state_dict` keys do
not change). The folds are checked against the original on the batch that found the pairs
(every stage output and the logits, fp32) before they are used; a group of folds that changes
them is split and retried, so a pair whose convolution output is also used elsewhere stays as it
was (the run's first line counts it). `release` restores every module at the end of the run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

#: relative tolerance of the fp32 check of a folded network against the original
FOLD_RTOL = 1e-3


def _low_precision(module, x) -> bool:
    """Whether this call runs under autocast to the dtype `module`'s cast weights have."""
    cast = module.cast_weight
    return (cast is not None and torch.is_autocast_enabled(x.device.type)
            and torch.get_autocast_dtype(x.device.type) == cast.dtype)


class PreparedConv2d(nn.Conv2d):
    """A frozen nn.Conv2d computing with its folded weights (`folded_*`, fp32) and, under
    autocast, with copies cast once (`cast_*`); all are buffers beside its parameters, which
    stay what `state_dict` holds. Outside autocast it computes in fp32 as before."""

    def forward(self, x):
        if _low_precision(self, x):
            w, b = self.cast_weight, self.cast_bias
        elif self.folded_weight is not None:
            w, b = self.folded_weight, self.folded_bias
        else:
            w, b = self.weight, self.bias
        if self.padding_mode != "zeros":
            return self._conv_forward(x, w, b)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


class PreparedLinear(nn.Linear):
    """A frozen nn.Linear computing, under autocast, with a copy of its weights cast once."""

    def forward(self, x):
        if _low_precision(self, x):
            return F.linear(x, self.cast_weight, self.cast_bias)
        return F.linear(x, self.weight, self.bias)


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm folded into the convolution before it: passes its input on."""

    def forward(self, x):
        return x


@dataclass
class InferenceNetworks:
    """What `prepare` changed, so `release` can put it back; `notes` say what was done."""

    swapped: list[tuple[nn.Module, type, tuple[str, ...]]] = field(default_factory=list)
    entry_points: list[tuple[nn.Module, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def release(self) -> None:
        for module, name in self.entry_points:
            module.__dict__.pop(name, None)
        self.entry_points.clear()
        for module, cls, buffers in reversed(self.swapped):
            module.__class__ = cls
            for name in buffers:
                module._buffers.pop(name, None)
                module._non_persistent_buffers_set.discard(name)
        self.swapped.clear()

    def _swap(self, module: nn.Module, cls: type, **buffers: torch.Tensor | None) -> None:
        self.swapped.append((module, type(module), tuple(buffers)))
        for name, value in buffers.items():
            module.register_buffer(name, value, persistent=False)
        module.__class__ = cls

    @property
    def line(self) -> str:
        return "; ".join(self.notes)


def _compute_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def conv_bn_pairs(net: nn.Module, images: torch.Tensor) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(convolution, BatchNorm) pairs where the BatchNorm's input is the tensor the convolution
    returned, seen by running `images` through `net` (no grad). Each convolution output is kept
    alive for the pass, so no later tensor can take its id; a module seen in two pairs (called
    twice with different partners) is left out."""
    produced: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []
    hooks = []

    def conv_hook(module, _inputs, output):
        produced[id(output)] = (module, output)

    def bn_hook(module, inputs):
        hit = produced.get(id(inputs[0]))
        if hit is not None and hit[1] is inputs[0]:
            pairs.append((hit[0], module))

    for m in net.modules():
        if type(m) is nn.Conv2d:
            hooks.append(m.register_forward_hook(conv_hook))
        elif type(m) is nn.BatchNorm2d and m.track_running_stats and m.running_mean is not None:
            hooks.append(m.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad():
            _outputs(net, images)
    finally:
        for h in hooks:
            h.remove()
        produced.clear()
    uses: dict[int, int] = {}
    for conv, bn in pairs:
        for m in (conv, bn):
            uses[id(m)] = uses.get(id(m), 0) + 1
    return [(c, b) for c, b in pairs if uses[id(c)] == 1 and uses[id(b)] == 1]


def _outputs(net: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor the network's comparison covers: stage outputs and logits when it has them."""
    if hasattr(net, "forward_features"):
        logits, feats = net.forward_features(images)
        return [logits, *feats]
    out = net(images)
    return [out] if torch.is_tensor(out) else [t for t in out if torch.is_tensor(t)]


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_mean)
    shift = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
    inv = scale / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight.detach()
    weight = w * inv.reshape(-1, *([1] * (w.dim() - 1)))
    if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last):
        weight = weight.contiguous(memory_format=torch.channels_last)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return weight, (bias - bn.running_mean) * inv + shift


def _same(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return len(before) == len(after) and all(
        a.shape == b.shape and float((a.float() - b.float()).abs().max()) <= FOLD_RTOL * max(1.0, float(a.abs().max()))
        for a, b in zip(before, after))


def prepare(method, images: torch.Tensor, precision: str, enabled: bool = True,
            compile: bool | str = False) -> InferenceNetworks:
    """Fold and cast the frozen roles of `method` (see the module docstring); `images`: one
    batch on the method's device, used to find and check the folds; `compile`: the run's
    `train.compile` setting (true: inference roles are compiled with freezing as well)."""
    prepared = InferenceNetworks()
    if not enabled:
        return prepared
    dtype = _compute_dtype(precision)
    inference = set(method.inference_roles)
    for role in method.frozen:
        net = method.nets[role] if role in method.nets else None
        if net is None:
            continue
        folds, left = _fold(net, images, prepared) if role in inference else (0, 0)
        casts = _cast(net, dtype, prepared) if dtype is not None else 0
        compiled = role in inference and compile and _compile_inference(net, compile, prepared)
        done = ([f"{folds} BatchNorm folded" + (f" ({left} left: folding would change the outputs)" if left else "")]
                if folds or left else []) + ([f"weights cast once to {precision}"] if casts else []) \
            + (["compiled as a frozen inference graph"] if compiled else [])
        if done:
            prepared.notes.append(f"frozen {role}: " + ", ".join(done))
    return prepared


def _fold(net: nn.Module, images: torch.Tensor, prepared: InferenceNetworks) -> tuple[int, int]:
    """Fold every (convolution, BatchNorm) pair whose folding leaves the network's outputs as
    they were; the number folded. Pairs are tried all at once, and a group that changes the
    outputs is split in halves and tried again, so the pairs that cannot be folded (a
    convolution's raw output also used elsewhere, e.g. as a residual) are found in a few
    passes and left as they are. Returns (pairs folded, pairs left)."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            before = [t.clone() for t in _outputs(net, images)]
        pairs = conv_bn_pairs(net, images)

        def attempt(group) -> int:
            start = len(prepared.swapped)
            for conv, bn in group:
                weight, bias = _folded(conv, bn)
                prepared._swap(conv, PreparedConv2d, folded_weight=weight, folded_bias=bias,
                               cast_weight=None, cast_bias=None)
                prepared._swap(bn, FoldedBatchNorm2d)
            with torch.no_grad():
                if _same(before, _outputs(net, images)):
                    return len(group)
            InferenceNetworks(prepared.swapped[start:]).release()
            del prepared.swapped[start:]
            if len(group) == 1:
                return 0
            half = len(group) // 2
            return attempt(group[:half]) + attempt(group[half:])

        folded = attempt(pairs) if pairs else 0
        return folded, len(pairs) - folded
    finally:
        net.train(was_training)


def _cast(net: nn.Module, dtype: torch.dtype, prepared: InferenceNetworks) -> int:
    """Copies of every convolution's and linear layer's weights (folded ones where folded) cast
    once to `dtype`, the rounding autocast would apply to them on every call."""
    def low(t):
        return t.detach().to(dtype) if t is not None else None

    count = 0
    for m in net.modules():
        if isinstance(m, PreparedConv2d):
            m.cast_weight, m.cast_bias = low(m.folded_weight), low(m.folded_bias)
        elif type(m) is nn.Conv2d:
            prepared._swap(m, PreparedConv2d, folded_weight=None, folded_bias=None,
                           cast_weight=low(m.weight), cast_bias=low(m.bias))
        elif type(m) is nn.Linear:
            prepared._swap(m, PreparedLinear, cast_weight=low(m.weight), cast_bias=low(m.bias))
        else:
            continue
        count += 1
    return count


#: what methods call on a network; each is compiled on first call
ENTRY_POINTS = ("forward", "forward_features", "forward_trunk", "forward_tail")


def _calling(compiled):
    """A plain function calling `compiled`: `torch.compiler.disable` given a compiled function
    itself would strip the compilation and run the original eagerly."""
    def call(*args, **kwargs):
        return compiled(*args, **kwargs)
    return call


def _compile_inference(net: nn.Module, setting, prepared: InferenceNetworks) -> bool:
    """Compile `net`'s entry points as frozen inference graphs, called from the step's graph as
    opaque functions (`torch.compiler.disable`)."""
    from . import compiled as step_compile
    options = {"freezing": True, **({"max_autotune": True} if setting == "max-autotune" else {})}
    for name in ENTRY_POINTS:
        bound = getattr(net, name, None)
        if bound is None or name in net.__dict__:
            continue
        if step_compile.BACKEND != "inductor":   # tests: graph capture without code generation
            compiled = torch.compile(bound, backend=step_compile.BACKEND)
        else:
            compiled = torch.compile(bound, options=options)
        net.__dict__[name] = torch.compiler.disable(_calling(compiled))
        prepared.entry_points.append((net, name))
    return True
