"""sokd models: every zoo model with parameter count and MACs at an input size."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list models with params and MACs")
    p.add_argument("--input", default="3x32x32", help="CxHxW, default 3x32x32")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--filter", default="", help="only names containing this text")
    p.add_argument("--tv", nargs="*", default=[], metavar="NAME",
                   help="also list these torchvision models (e.g. resnet18 mobilenet_v2)")
    p.set_defaults(run=run)


def run(args) -> int:
    from .. import models
    from ..errors import SokdError
    from .table import render
    try:
        shape = tuple(int(v) for v in args.input.lower().split("x"))
        assert len(shape) == 3 and min(shape) > 0
    except (ValueError, AssertionError):
        raise SokdError(f"--input '{args.input}' is not CxHxW, e.g. 3x32x32 or 1x28x28") from None
    names = [n for n in models.list_models() if args.filter in n] + [f"tv.{n}" for n in args.tv]
    rows = []
    for name in names:
        net = models.create(name, num_classes=args.classes, in_channels=shape[0])
        info = models.model_info(net, input_shape=shape)
        rows.append([name, f"{info['params'] / 1e6:.2f}M", f"{info['macs'] / 1e6:.1f}M", net.num_stages])
    print(f"input {'x'.join(map(str, shape))}, {args.classes} classes")
    print(render(["model", "params", "MACs", "stages"], rows))
    return 0
