"""sokd export CHECKPOINT --format torchscript|onnx: a standalone model file, checked for parity."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a network to TorchScript or ONNX (checked against PyTorch)",
        description="Export one network of a run checkpoint (last.pt / best.pt; --role picks it) or a model "
                    "file (student.pt, teacher_branch.pt, model.pt) to TorchScript or ONNX. The file records "
                    "its preprocessing (input shape, mean/std, classes) as sokd.json metadata, and is only "
                    "kept if its logits match PyTorch's on a batch of the test split (max |diff| <= tolerance).")
    p.add_argument("checkpoint", help="run checkpoint or model file")
    p.add_argument("overrides", nargs="*", metavar="data.key=value",
                   help="data overrides for the test split used by the check, e.g. data.root=/data/fmnist")
    p.add_argument("--format", required=True, metavar="{torchscript,onnx}", help="torchscript or onnx")
    p.add_argument("--role", default=None,
                   help="network of a run checkpoint: student, teacher_branch (SOKD: frozen trunk + KBM), "
                        "teacher, model, peer ... (default: the method's primary network)")
    p.add_argument("--out", default=None,
                   help="output file or directory (default: <role>.onnx / <role>.torchscript.pt next to "
                        "the checkpoint); an existing file is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier sokd export of this format at the target (a run's files, "
                        "checkpoints and any other file are never replaced)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="a plugin (module name or .py file) to import first, as a config's imports: do; "
                        "needed for a checkpoint trained with plugins, which sokd never imports on its own "
                        "(repeatable)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--images", type=int, default=64, help="test images for the parity check (default 64)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest accepted |logit difference| vs PyTorch (default 1e-4)")
    p.set_defaults(run=run)


def run(args) -> int:
    from .. import export
    from ..config import data_overrides, import_plugins
    data = data_overrides(args.overrides, "export")
    import_plugins(args.imports)  # the user's own choice, as a config's imports:
    result = export.export(args.checkpoint, args.format, role=args.role, out=args.out, opset=args.opset,
                           images=args.images, tolerance=args.tolerance, data_overrides=data or None,
                           overwrite=args.overwrite)
    meta = result.metadata
    inp = meta["input"]
    print(result.summary())
    print(f"  {meta['role']} ({meta['arch']}, {meta['num_classes']} classes): input float32 "
          f"Nx{'x'.join(map(str, inp['shape']))} = (uint8 / 255 - mean) / std, mean {_fmt(inp['mean'])} "
          f"std {_fmt(inp['std'])}; recorded as {export.METADATA_KEY} metadata")
    return 0


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
