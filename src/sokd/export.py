"""Export a trained network to TorchScript or ONNX, with its preprocessing, checked for parity.

    export(checkpoint, "onnx" | "torchscript", role=None, out=None, opset=None) -> ExportResult
    read_metadata(path) -> the recorded `sokd.json` dict of an exported file

`checkpoint` is a model file (student.pt, teacher_branch.pt, model.pt: format "sokd-model") or a
run checkpoint (last.pt / best.pt: format "sokd-run"; `role` picks the network, default the
method's primary one; for SOKD `teacher_branch` is the frozen teacher trunk + knowledge bridge
module as one classifier). The exported model maps float32 NCHW images, normalised as in training
(`(uint8 / 255 - mean) / std` per channel), to logits; the batch dimension is dynamic. Its
metadata (`sokd.json`: TorchScript extra file / ONNX metadata_props) records the input shape,
mean/std, class count and names, arch and role.

The file is serialised in memory, checked against the free space of the target's file system,
written to a temporary name next to the target, loaded back (torch.jit.load /
onnxruntime on the CPU) and run on a batch of the data set's test split; only if its logits match
the PyTorch network's to `tolerance` (max absolute difference, default 1e-4) is it renamed into
place. Otherwise the temporary file is deleted and a SokdError says by how much it disagreed.

The target is only ever a new file or, with `overwrite=True` (`--overwrite`), an earlier sokd
export of the same format (`check_target`): a run's files, checkpoints, model files and anything
else are never replaced, and a symbolic link at the target is refused, never written through.
A file sokd export wrote is recognised by its `sokd.json` metadata (`sniff`), without loading
it, so `sokd eval` / `sokd export` given one say what it is and how to run it.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import artifacts, models
from .errors import SokdError, suggest

FORMATS = ("torchscript", "onnx")
EXTENSIONS = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}
DEFAULT_OPSET = 17
TOLERANCE = 1e-4
METADATA_KEY = artifacts.EXPORT_METADATA
INPUT_NAME, OUTPUT_NAME = artifacts.EXPORT_INPUT, artifacts.EXPORT_OUTPUT
_TRACE_BATCH = 2  # traced/exported with this batch, verified with another: proves the batch axis is free


@dataclass
class Exportable:
    """One network rebuilt from a checkpoint, with what an exported file records about it."""

    net: nn.Module
    role: str
    arch: dict                  # {"arch", "num_classes", "in_channels", "kwargs"}
    preprocess: dict            # {"shape", "mean", "std"} the network was trained with
    data_cfg: object            # sokd.data.DataConfig of the checkpoint's data set
    source: dict = field(default_factory=dict)


@dataclass
class ExportResult:
    path: Path
    format: str
    opset: int | None
    max_abs_diff: float
    images: int
    metadata: dict

    def summary(self) -> str:
        kind = f"onnx, opset {self.opset}" if self.format == "onnx" else self.format
        return (f"wrote {self.path} ({kind}): max |logit diff| vs PyTorch on {self.images} test images "
                f"= {self.max_abs_diff:.1e}")


class _Logits(nn.Module):
    """`net(images)` -> logits only: a fixed one-tensor-in, one-tensor-out signature to export."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


# ---------------------------------------------------------------- rebuilding the network
def load_exportable(checkpoint: str | os.PathLike, role: str | None = None) -> Exportable:
    """The network `role` of a run checkpoint, or the one network of a model file, in eval mode."""
    from . import runner
    opened = runner.open_checkpoint(checkpoint, "export")
    pick = _from_run if opened.format == artifacts.RUN_FORMAT else _from_model_file
    return pick(opened, role)


def _from_model_file(opened, role: str | None) -> Exportable:
    (name, net), = opened.networks.nets.items()
    if role is not None and role != name:
        raise SokdError(f"'{opened.path}' is a model file holding only the '{name}' network; --role picks a "
                        f"network of a run checkpoint (last.pt / best.pt), so drop --role or export "
                        f"from the run checkpoint")
    return Exportable(net.eval(), name, models.spec_of(net), _preprocess(opened.trained), opened.data_cfg,
                      {"checkpoint": opened.path, "format": artifacts.MODEL_FORMAT,
                       "method": opened.cfg.method.name if opened.cfg is not None else None})


def _from_run(opened, role: str | None) -> Exportable:
    from .models.staged import StagedNet
    method, path = opened.networks, opened.path
    candidates = {name: (arch_role, module) for name, (arch_role, module) in method.standalone().items()}
    for r, net in method.nets.items():
        if r not in candidates and isinstance(net, StagedNet):
            candidates[r] = (r, net)
    if role is None:
        role = method.primary if method.primary in candidates else next(iter(candidates))
    if role not in candidates:
        if role in method.nets:
            declared = method.role(role)
            whole = f"export --role {declared.file} (it as one model) or " if declared.file else "export "
            raise SokdError(f"role '{role}' of '{path}' is not a classifier of images on its own"
                            f"{f' ({declared.part})' if declared.part else ''}; {whole}one of: "
                            f"{', '.join(candidates)}")
        raise SokdError(f"checkpoint '{path}' has no network '{role}'{suggest(role, candidates)}; "
                        f"--role must be one of: {', '.join(candidates)}")
    arch_role, module = candidates[role]
    return Exportable(module.eval(), role, models.spec_of(method.nets[arch_role]), _preprocess(opened.trained),
                      opened.data_cfg, {"checkpoint": path, "format": artifacts.RUN_FORMAT,
                                        "method": opened.cfg.method.name, "epoch": opened.ckpt.get("epoch")})


def _preprocess(record: dict) -> dict:
    """The input an exported network takes, from a checkpoint's data record."""
    return {"shape": list(record["shape"]), "mean": list(record["mean"]), "std": list(record["std"])}


def _test_images(item: Exportable, n: int, overrides: dict | None):
    """Up to `n` images of the test split (CPU float32, normalised as in training) and class names."""
    from . import data as data_layer
    from .data.config import DataConfig
    # one test batch of (at least) n images is all the check needs
    data_cfg = DataConfig.from_dict({**item.data_cfg.model_dump(), "eval_batch_size": n, **(overrides or {})})
    try:
        bundle = data_layer.create(data_cfg, device="cpu")
    except SokdError as err:
        raise SokdError(f"{err} (sokd export needs the test split for its parity check; data.KEY=VALUE "
                        f"after the checkpoint overrides the data section)") from None
    if list(bundle.shape) != list(item.preprocess["shape"]):
        raise SokdError(f"the test images are {'x'.join(map(str, bundle.shape))} but the network was "
                        f"trained on {'x'.join(map(str, item.preprocess['shape']))}; drop the data "
                        f"overrides that change the image size")
    trained_for = item.arch["num_classes"]
    if bundle.num_classes != trained_for:
        raise SokdError(f"'{item.source.get('checkpoint')}' was trained for {trained_for} classes but data "
                        f"set {bundle.name} has {bundle.num_classes}; export it with the data it was "
                        f"trained on (drop the data overrides that change the classes)")
    chunks, have = [], 0
    for images, _ in bundle.test:
        chunks.append(images.float().contiguous())
        have += images.shape[0]
        if have >= n:
            break
    if not chunks:
        raise SokdError(f"the test split of {bundle.name} is empty; export needs test images for its check")
    return torch.cat(chunks)[:n], list(bundle.class_names)


def metadata(item: Exportable, class_names: list[str] | None = None) -> dict:
    """What an exported file records about its network (stored as JSON under `sokd.json`)."""
    from . import __version__
    shape = list(item.preprocess["shape"])
    return {
        "format": artifacts.EXPORT_FORMAT, "version": 1, "sokd_version": __version__,
        "arch": item.arch["arch"], "role": item.role, "kwargs": item.arch["kwargs"],
        "num_classes": item.arch["num_classes"], "in_channels": item.arch["in_channels"],
        "input": {"name": INPUT_NAME, "shape": shape, "layout": "NCHW", "dtype": "float32",
                  "batch": "dynamic", "mean": list(item.preprocess["mean"]),
                  "std": list(item.preprocess["std"]),
                  "normalize": "x = (image_uint8 / 255 - mean) / std, per channel"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", item.arch["num_classes"]],
                   "meaning": "logits (apply softmax for probabilities)"},
        "class_names": class_names,
        "data": getattr(item.data_cfg, "name", None),
        "source": item.source,
    }


# ---------------------------------------------------------------- writing and checking files
def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise SokdError(f"unknown export format '{fmt}'{suggest(str(fmt), FORMATS)}; valid: {', '.join(FORMATS)}")
    return fmt


def _check_opset(opset: int | None, fmt: str) -> int | None:
    if fmt != "onnx":
        if opset is not None:
            raise SokdError("--opset applies to --format onnx only; drop it for torchscript")
        return None
    lo, hi, _ = _opset_limits()
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        raise SokdError(f"--opset {opset} is not supported by this torch; use {lo}..{hi} (default {DEFAULT_OPSET})")
    return opset


def _opset_limits() -> tuple[int, int, int]:
    """(lowest, highest) opset torch.onnx exports, and the highest of its TorchScript-based exporter."""
    try:
        from torch.onnx import _constants as c
        return c.ONNX_MIN_OPSET, c.ONNX_MAX_OPSET, getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
    except (ImportError, AttributeError):
        return 7, 23, 20


def require_onnx() -> None:
    """SokdError unless onnx and onnxruntime are importable."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise SokdError(f"ONNX export needs the onnx and onnxruntime packages ({err}); "
                        f"install them with: pip install sokd[export]") from None


def output_path(checkpoint: str | os.PathLike, role: str, fmt: str, out: str | os.PathLike | None) -> Path:
    """Where to write: `out` (a file, or a directory to put `<role><ext>` in), default next to the checkpoint."""
    default_name = f"{role}{EXTENSIONS[fmt]}"
    if out is None:
        path = Path(checkpoint).parent / default_name
    else:
        path = Path(out).expanduser()
        if path.is_dir():
            path = path / default_name
    parent = path.parent
    if not parent.is_dir():
        raise SokdError(f"cannot write '{path}': directory '{parent}' does not exist; create it or pass "
                        f"--out in an existing directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SokdError(f"cannot write '{path}': directory '{parent}' is not writable; pass --out PATH "
                        f"in a writable directory")
    if path.exists() and path.resolve() == Path(checkpoint).resolve():
        raise SokdError(f"--out '{path}' is the checkpoint being exported; choose another file name")
    return path


def _quiet():
    """Silence exporter chatter (deprecation warnings, progress prints, onnxscript logging)."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    buf = io.StringIO()
    stack.enter_context(contextlib.redirect_stdout(buf))
    stack.enter_context(contextlib.redirect_stderr(buf))
    for name in ("onnxscript", "torch.onnx", "torch.export", "torch._dynamo"):
        logger = logging.getLogger(name)
        old = logger.level
        logger.setLevel(logging.CRITICAL)
        stack.callback(logger.setLevel, old)
    return stack


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def _torchscript_bytes(model: nn.Module, example: torch.Tensor, meta_json: str) -> bytes:
    """The traced TorchScript archive as bytes (serialised in memory: its C++ writer aborts the
    process when a file system fills up under it)."""
    try:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
    except Exception as err:
        raise SokdError(f"TorchScript tracing failed ({_first_line(err)}); "
                        f"try --format onnx") from None
    buffer = io.BytesIO()
    with _quiet():
        torch.jit.save(traced, buffer, _extra_files={METADATA_KEY: meta_json})
    return buffer.getvalue()


def _onnx_bytes(model: nn.Module, example: torch.Tensor, meta_json: str, opset: int) -> tuple[bytes, int]:
    """The ONNX model (with its metadata) as bytes, serialised in memory, and its opset."""
    import onnx
    common = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    attempts = []
    if opset <= _opset_limits()[2]:  # the TorchScript-based exporter: fast and mature on CPU
        attempts.append(("torchscript exporter", dict(
            dynamo=False, dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})))
    attempts.append(("dynamo exporter", dict(
        dynamo=True, external_data=False, dynamic_shapes=({0: torch.export.Dim("batch")},))))
    errors = []
    for label, options in attempts:
        buffer = io.BytesIO()
        try:
            with _quiet(), torch.no_grad():
                torch.onnx.export(model, (example,), buffer, **common, **options)
            break
        except Exception as err:
            errors.append(f"{label}: {_first_line(err)}")
    else:
        raise SokdError(f"ONNX export failed at opset {opset} ({'; '.join(errors)}); try another --opset "
                        f"or --format torchscript")
    proto = onnx.load_model_from_string(buffer.getvalue())
    proto.metadata_props.add(key=METADATA_KEY, value=meta_json)
    opset = next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))
    return proto.SerializeToString(), opset


def run_exported(path: str | os.PathLike, fmt: str, images: torch.Tensor) -> torch.Tensor:
    """Logits of an exported file on `images` (TorchScript: torch.jit.load; ONNX: onnxruntime CPU)."""
    if fmt == "torchscript":
        with _quiet():
            module = torch.jit.load(str(path), map_location="cpu")
        module.eval()
        with torch.no_grad():
            return module(images)
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0])


def read_metadata(path: str | os.PathLike) -> dict:
    """The `sokd.json` metadata recorded in an exported TorchScript or ONNX file."""
    path = Path(path)
    if not path.is_file():
        raise SokdError(f"exported model '{path}' not found")
    if zipfile.is_zipfile(path):  # TorchScript archives are zip files
        extra = {METADATA_KEY: ""}
        with _quiet():
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        text = extra[METADATA_KEY]
    else:
        require_onnx()
        import onnx
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as err:
            raise SokdError(f"'{path}' is neither a TorchScript nor an ONNX file ({type(err).__name__})") from None
        text = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), "")
    if not text:
        raise SokdError(f"'{path}' holds no {METADATA_KEY} metadata; it was not written by sokd export")
    return json.loads(text)


# ---------------------------------------------------------------- recognising exported files
sniff = artifacts.sniff_export
describe_export = artifacts.describe_export
refuse_exported = artifacts.refuse_export


def check_target(path: Path, fmt: str, overwrite: bool) -> None:
    """SokdError unless an export may be written at `path`: a new name, or with `overwrite` an
    earlier sokd export of the same format. A run's files (config.yaml, last.pt, metrics.jsonl,
    ...), sokd checkpoints and model files, other exports and anything else are never replaced, and
    a symbolic link is refused (renaming over it would drop the link; writing through it would
    change the file it points to)."""
    path = Path(path)
    other = f"pass --out another file (e.g. '{path.parent / _default_name(path, fmt)}')"
    if path.is_symlink():
        raise SokdError(f"--out '{path}' is a symbolic link; sokd export never writes through a link, so "
                        f"{other}")
    if path.name in artifacts.RUN_FILES or path.name.startswith(".sokd"):
        raise SokdError(f"'{path}' is a run file name ({path.name}); sokd export never writes over a run's "
                        f"files, even with --overwrite, so {other}")
    if not os.path.lexists(path):
        return
    found = sniff(path) if path.is_file() else None
    if found is None or found[0] != fmt:
        if found is not None:
            what = describe_export(*found)
        elif not path.is_file():
            what = "not a regular file"
        else:
            what = "a sokd checkpoint or model file" if _is_sokd_checkpoint(path) else "not a sokd export"
        raise SokdError(f"'{path}' exists and is {what}; sokd export replaces only its own {fmt} exports "
                        f"(even with --overwrite), so {other}")
    if not overwrite:
        raise SokdError(f"'{path}' already holds {describe_export(*found)}; pass --overwrite to replace it, "
                        f"or --out another file")


def _default_name(path: Path, fmt: str) -> str:
    """A free name beside `path` for the suggestion in `check_target`'s messages."""
    stem = path.name.split(".")[0] or "model"
    for n in range(1, 100):
        name = f"{stem}-{n}{EXTENSIONS[fmt]}"
        if not os.path.lexists(path.parent / name):
            return name
    return f"{stem}-new{EXTENSIONS[fmt]}"


def _is_sokd_checkpoint(path: Path) -> bool:
    """A run checkpoint or model file (read as plain tensors; nothing is executed)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a checkpoint
        return False
    return isinstance(obj, dict) and artifacts.kind(obj) is not None


#: what to do when an exported file does not fit
_NO_SPACE_FIX = "free space or pass --out elsewhere"


def _write_temp(data: bytes, path: Path) -> str:
    """`data` written and fsynced to a new temporary file next to `path`; its name.

    A file that cannot fit is refused before anything is written; a full disk met while writing
    removes the temporary file. Both are a one-line SokdError.
    """
    from .files import check_free_space, make_temp, write_bytes
    check_free_space(path, len(data), _NO_SPACE_FIX)
    try:
        fd, tmp = make_temp(path, _NO_SPACE_FIX)
    except OSError as err:
        raise SokdError(f"cannot write '{path}' ({err.strerror}); pass --out PATH in a writable directory") from None
    try:
        try:
            write_bytes(fd, data, path, _NO_SPACE_FIX)
        finally:
            os.close(fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def export_network(item: Exportable, fmt: str, path: Path, images: torch.Tensor, *,
                   opset: int | None = None, tolerance: float = TOLERANCE,
                   class_names: list[str] | None = None, overwrite: bool | None = None) -> ExportResult:
    """Write `item.net` to `path` atomically after checking its logits on `images` against PyTorch.

    `overwrite`: None leaves the target to the caller; True / False checks it (`check_target`)
    again just before the rename, so a file that appeared during the export is not replaced.
    """
    from .files import commit_file
    fmt = _check_format(fmt)
    opset = _check_opset(opset, fmt)
    meta = metadata(item, class_names)
    meta_json = json.dumps(meta, sort_keys=True)
    model = _Logits(item.net).eval()
    images = images.detach().to("cpu", torch.float32).contiguous()
    example = images[:_TRACE_BATCH].clone()
    if fmt == "onnx":
        data, opset = _onnx_bytes(model, example, meta_json, opset)
    else:
        data = _torchscript_bytes(model, example, meta_json)
    tmp = _write_temp(data, path)
    try:
        with torch.no_grad():
            ref = model(images)
        try:
            got = run_exported(tmp, fmt, images)
        except Exception as err:
            raise SokdError(f"the exported {fmt} model fails to run ({_first_line(err)}); "
                            f"nothing was written") from None
        if got.shape != ref.shape:
            raise SokdError(f"the exported {fmt} model returns shape {tuple(got.shape)}, PyTorch "
                            f"{tuple(ref.shape)}; nothing was written")
        diff = (got.float() - ref.float()).abs().max().item()
        if not diff <= tolerance:  # also catches NaN
            raise SokdError(f"the exported {fmt} model disagrees with PyTorch: max |logit diff| {diff:.2e} > "
                            f"{tolerance:.0e} on {images.shape[0]} test images; nothing was written "
                            f"(try the other --format{' or another --opset' if fmt == 'onnx' else ''})")
        if overwrite is not None:
            check_target(path, fmt, overwrite)
        commit_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ExportResult(path=path, format=fmt, opset=opset, max_abs_diff=diff, images=int(images.shape[0]),
                        metadata=meta)


def export(checkpoint: str | os.PathLike, fmt: str, *, role: str | None = None,
           out: str | os.PathLike | None = None, opset: int | None = None, images: int = 64,
           tolerance: float = TOLERANCE, data_overrides: dict | None = None,
           overwrite: bool = False) -> ExportResult:
    """Export one network of `checkpoint` to `fmt` ("torchscript" | "onnx"); see the module docstring.

    `images`: how many test images the parity check uses; `data_overrides`: data.KEY values for
    rebuilding the test split (e.g. {"root": "/data/fmnist"}); `overwrite`: replace an earlier
    export of this format at the target (nothing else is ever replaced, see `check_target`).
    """
    fmt = _check_format(fmt)
    opset = _check_opset(opset, fmt)
    if fmt == "onnx":
        require_onnx()
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise SokdError(f"--images must be a positive integer, got {images!r}")
    if not tolerance > 0:
        raise SokdError(f"--tolerance must be positive, got {tolerance!r}")
    if out is not None:  # fail on a bad --out before the slow part
        early = output_path(checkpoint, role or "model", fmt, out)
        if role is not None or not Path(out).expanduser().is_dir():
            check_target(early, fmt, overwrite)
    item = load_exportable(checkpoint, role)
    path = output_path(checkpoint, item.role, fmt, out)
    check_target(path, fmt, overwrite)
    batch, class_names = _test_images(item, images, data_overrides)
    return export_network(item, fmt, path, batch, opset=opset, tolerance=tolerance, class_names=class_names,
                          overwrite=overwrite)


__all__ = ["FORMATS", "DEFAULT_OPSET", "TOLERANCE", "METADATA_KEY", "Exportable", "ExportResult", "check_target",
           "describe_export", "export", "export_network", "load_exportable", "metadata", "output_path",
           "read_metadata", "refuse_exported", "run_exported", "require_onnx", "sniff"]
