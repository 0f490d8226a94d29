"""The files sokd saves, described in one place: their names, format markers and layouts.

* **Run directory names** (`LAST`, `BEST`, `CONFIG`, `METRICS`, `SUMMARY`: `RUN_FILES`) and a
  model file's name (`model_file_name`).

* **Run checkpoint** (`last.pt`, `best.pt`; format `sokd-run`): everything a resumption needs —
  the method's state (every role, under `nets.<role>.`), optimizer, schedule, scaler, RNG,
  epoch/step, history, the resolved config — and, so the file describes itself, each network's
  spec under `networks` and the data set's facts under `data`.
* **Model file** (`student.pt`, `teacher_branch.pt`, `model.pt`, ...; format `sokd-model`): one
  classifier on its own — its spec (`arch`, `num_classes`, `in_channels`, `kwargs`), `state_dict`,
  the preprocessing it was trained with, and the run's config.

* **Exports** (`sokd export`: TorchScript or ONNX; format `sokd-export`) carry `sokd.json`
  metadata; `sniff_export` recognises one without loading or running it, and `is_sokd_file`
  tells any file sokd wrote from one it did not.

Networks carry their spec from `models.create` (`models.spec_of`), so writers never need to be
told what a network is. The engine writes through `run_state` / `model_file`; eval, export,
teacher loading and resume read through `load`, `network_state` and `rebuild_model`.
Version 2 names the run checkpoint's network specs `networks`; version 1 files (which named them
`arch_of`, read by nothing) load unchanged.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import models
from .files import load_state_strict, safe_load
from .errors import SokdError

RUN_FORMAT = "sokd-run"
MODEL_FORMAT = "sokd-model"
EXPORT_FORMAT = "sokd-export"
VERSION = 2

LAST, BEST = "last.pt", "best.pt"
CONFIG, METRICS, SUMMARY = "config.yaml", "metrics.jsonl", "summary.json"
#: the files that make a directory hold a run
RUN_FILES = (CONFIG, LAST, BEST, METRICS, SUMMARY)
#: the name of an export's metadata (TorchScript extra file / ONNX metadata_props key)
EXPORT_METADATA = "sokd.json"
#: an export's one input (float32 NCHW images) and one output (logits)
EXPORT_INPUT, EXPORT_OUTPUT = "images", "logits"


def model_file_name(name: str) -> str:
    """The file a standalone network `name` (student, teacher_branch, ...) is saved as."""
    return f"{name}.pt"


#: a file inside a folder sokd wrote in its own format for another ecosystem (a Hugging Face
#: folder of a network loaded from one): its presence says the folder is sokd's to replace
NATIVE_MARK = ".sokd-written"


def native_folder_name(name: str) -> str:
    """The folder a standalone network `name` loaded from a Hugging Face folder is saved back as."""
    return f"{name}_hf"


def has_native_form(module) -> bool:
    """Whether `module` came from another library's folder and is saved back in its format too."""
    return bool(getattr(module, "native", None))


# --------------------------------------------------------------------------------- writing
def network_info(net: nn.Module) -> dict:
    """A network's spec plus its parameter count (what files and summaries record about it)."""
    spec = models.spec_of(net) or {}
    return {**spec, "params": sum(p.numel() for p in net.parameters())}


def data_facts(data) -> dict:
    """What a checkpoint records about its data set (a `DataBundle`)."""
    return {"name": data.name, "shape": list(data.shape), "mean": list(data.mean), "std": list(data.std),
            "num_classes": data.num_classes, "train_size": data.train_size, "fingerprint": data.fingerprint}


def run_state(*, method: nn.Module, epoch: int, step: int, data, config: dict, **training: Any) -> dict:
    """A run checkpoint. `training` holds the loop's resumable state (optimizer, scheduler,
    scaler, rng, history, accum, wall_time_s), stored as given."""
    return {"format": RUN_FORMAT, "version": VERSION, "epoch": epoch, "step": step,
            "method": method.state_dict(), **training, "config": config,
            "networks": {role: network_info(net) for role, net in method.nets.items()},
            "data": data_facts(data)}


def data_record(ckpt: dict) -> dict:
    """What a run checkpoint or model file records about the data its networks were trained on:
    name, shape, mean, std, num_classes (and, where recorded, train_size and fingerprint). A model
    file's `preprocess` (shape / mean / std: the images the network takes) wins over its data's."""
    record = dict(ckpt.get("data") or {})
    record.update(ckpt.get("preprocess") or {})   # what the network itself takes, where it differs
    if "num_classes" not in record and "num_classes" in ckpt:
        record["num_classes"] = ckpt["num_classes"]
    return record


def preprocess_of(module: nn.Module, data) -> dict:
    """The images `module` takes: the data's, or its own where the run adapted them for it."""
    adapter = getattr(module, "input_adapter", None)
    shape = list(data.shape)
    if adapter is None:
        return {"shape": shape, "mean": list(data.mean), "std": list(data.std)}
    if adapter.size is not None:
        shape = [shape[0], *adapter.size]
    return {"shape": shape, "mean": list(adapter.mean), "std": list(adapter.std)}


def model_file(name: str, module: nn.Module, spec_source: nn.Module, data, config: dict) -> dict:
    """A standalone classifier file for `module`, rebuilt as the architecture of `spec_source`
    (the same network, or e.g. the teacher for SOKD's trunk + KBM)."""
    info = {**network_info(spec_source), "params": sum(p.numel() for p in module.parameters())}
    return {"format": MODEL_FORMAT, "version": VERSION, "name": name, **info,
            "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
            "preprocess": preprocess_of(module, data),
            "data": data_facts(data),
            "config": config}


# --------------------------------------------------------------------------------- reading
def load(path: str | os.PathLike) -> dict:
    """A checkpoint or model file (weights only, no code run), its layout checked."""
    ckpt = safe_load(path)
    check_layout(ckpt, path)
    return ckpt


def kind(ckpt: dict) -> str | None:
    """RUN_FORMAT, MODEL_FORMAT, or None (e.g. a bare state dict)."""
    fmt = ckpt.get("format")
    return fmt if fmt in (RUN_FORMAT, MODEL_FORMAT) else None


def run_roles(ckpt: dict) -> list[str]:
    """The roles whose networks a run checkpoint holds."""
    return sorted({k.split(".")[1] for k in ckpt["method"] if k.startswith("nets.")})


def network_state(ckpt: dict, path: str, role: str | None = None) -> dict:
    """One network's state dict from a model file, from one role of a run checkpoint (default: the
    model or student), or a bare state dict as it is."""
    fmt = kind(ckpt)
    if fmt == MODEL_FORMAT:
        return ckpt["state_dict"]
    if fmt == RUN_FORMAT:
        roles = run_roles(ckpt)
        section = ckpt.get("config", {}).get("method") if isinstance(ckpt.get("config"), dict) else None
        method = str(section.get("name", "")) if isinstance(section, dict) else ""
        if role is None:
            from . import methods
            primary = methods.get(method).primary if method in methods.list_methods() else None
            role = next((r for r in (primary, "model", "student") if r in roles), roles[0] if roles else None)
        if role not in roles:
            raise SokdError(f"checkpoint '{path}' has no role '{role}'; it holds: {', '.join(roles)} "
                            f"(set checkpoint_role)")
        _refuse_part(ckpt, path, role, roles, method)
        prefix = f"nets.{role}."
        return {k[len(prefix):]: v for k, v in ckpt["method"].items() if k.startswith(prefix)}
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise SokdError(f"'{path}' is not a sokd checkpoint, model file or state dict")


def _refuse_part(ckpt: dict, path, role: str, roles: list[str], method: str) -> None:
    """SokdError when `role` is part of a network rather than a whole one (SOKD's KBM, ONE's
    branches and gate), naming the whole networks the file holds and, where the method declares
    one, the model file that holds the part as a classifier (`Role.part`, `Role.file`).

    A role is whole when the file records its spec and no role of the same spec holds more
    tensors: a part records the spec of the network whose last stage(s) and head it is, or none.
    """
    from . import methods
    specs = ckpt.get("networks") if isinstance(ckpt.get("networks"), dict) else {}
    sizes = {r: sum(k.startswith(f"nets.{r}.") for k in ckpt["method"]) for r in roles}

    def spec(r):
        s = specs.get(r)
        return (s.get("arch"), s.get("num_classes"), s.get("in_channels"), s.get("kwargs")) \
            if isinstance(s, dict) and s.get("arch") else None
    whole = [r for r in roles if spec(r) and not any(spec(o) == spec(r) and sizes[o] > sizes[r] for o in roles)]
    if not whole or role in whole:
        return
    declared = methods.role(method, role)
    owner = next((o for o in whole if spec(o) is not None and spec(o) == spec(role)), None)
    what = declared.part or (f"the {owner}'s last stage(s) and head" if owner else
                             "a part of the method, no classifier of images on its own")
    hint = (f"; for it as a classifier use its model file "
            f"{os.path.join(os.path.dirname(str(path)), model_file_name(declared.file))}" if declared.file else "")
    raise SokdError(f"role '{role}' of checkpoint '{path}' is not a whole network ({what}); whole networks in "
                    f"it: {', '.join(whole)} (set checkpoint_role to one of them){hint}")


def rebuild_model(ckpt: dict, path: str) -> nn.Module:
    """The network of a model file, built from its spec with its weights loaded.
    (Architectures registered by the run's `imports:` must be imported first.)"""
    net = models.create(ckpt["arch"], num_classes=ckpt["num_classes"], in_channels=ckpt["in_channels"],
                        **ckpt.get("kwargs", {}))
    load_state_strict(net, ckpt["state_dict"], f"model file '{path}'")
    return net


# ---------------------------------------------------------------------------- layout checks
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _sequence(v, n: int | None = None, item=(int, float)) -> bool:
    return (isinstance(v, (list, tuple)) and (n is None or len(v) == n)
            and all(isinstance(x, item) and not isinstance(x, bool) for x in v))


def _layout_problem(ckpt: dict) -> str | None:
    """What a run checkpoint or model file lacks for sokd eval / export to rebuild it, or None."""
    def tensors(key):
        state = ckpt.get(key)
        ok = isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in state.items())
        return None if ok else f"'{key}' is not a mapping of names to tensors"

    data = ckpt.get("data")
    if ckpt["format"] == RUN_FORMAT:
        if not isinstance(ckpt.get("config"), dict):
            return "'config' is missing or not a mapping"
        if not (isinstance(data, dict) and isinstance(data.get("name"), str) and _sequence(data.get("shape"), 3, int)
                and _sequence(data.get("mean")) and _sequence(data.get("std")) and _is_int(data.get("num_classes"))):
            return "'data' lacks name / shape / mean / std / num_classes"
        return tensors("method")
    for key, typ in (("arch", str), ("num_classes", int), ("in_channels", int)):
        if not isinstance(ckpt.get(key), typ) or isinstance(ckpt.get(key), bool):
            return f"'{key}' is missing or not a {typ.__name__}"
    if not isinstance(ckpt.get("kwargs", {}), dict) or not isinstance(ckpt.get("config") or {}, dict):
        return "'kwargs' or 'config' is not a mapping"
    pre = ckpt.get("preprocess")
    if not (isinstance(pre, dict) and _sequence(pre.get("shape"), 3, int) and _sequence(pre.get("mean"))
            and _sequence(pre.get("std"))):
        return "'preprocess' lacks shape / mean / std"
    if not (isinstance(data, dict) and isinstance(data.get("name"), str)):
        return "'data' lacks the data set's name"
    return tensors("state_dict")


def check_layout(ckpt: dict, path: str | os.PathLike) -> None:
    """SokdError unless a loaded run checkpoint / model file holds every entry (and a valid
    config) that rebuilding its networks reads; other contents pass unchecked."""
    if kind(ckpt) is None:
        return
    problem = _layout_problem(ckpt)
    if problem is None and ckpt.get("config"):
        from .config import PluginNeeded, stored_config
        try:
            stored_config(ckpt["config"], path)
        except PluginNeeded:
            raise
        except SokdError as err:
            problem = f"its config: {err}"
    if problem:
        raise SokdError(f"checkpoint '{path}' is damaged or was not written by this sokd ({problem}); "
                        f"use another copy, e.g. best.pt")


# ------------------------------------------------------------------ recognising sokd's files
#: how far from its end an ONNX export's metadata is looked for (it is the file's last entry)
_ONNX_TAIL = 1 << 20
_ONNX_MARK = f'"format": "{EXPORT_FORMAT}"'.encode()


def sniff_export(path: str | os.PathLike) -> tuple[str, dict] | None:
    """(format, `sokd.json` metadata) of a file `sokd export` wrote, else None.

    Nothing is loaded or run: a TorchScript export is a zip archive holding `*/extra/sokd.json`
    (a run checkpoint or model file, also a zip, has none), and an ONNX export ends with its
    metadata, JSON written with sorted keys (so it opens with `{"arch": `). A file that cannot be
    read is simply not an export; the metadata is {} when the marker is found but the JSON is not.
    """
    path = Path(path)
    try:
        if not path.is_file():
            return None
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith(f"/extra/{EXPORT_METADATA}")), None)
                if name is None:
                    return None
                meta = json.loads(archive.read(name).decode("utf-8"))
            return ("torchscript", meta) if isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT \
                else None
        with open(path, "rb") as f:
            head = f.read(1)
            f.seek(max(0, path.stat().st_size - _ONNX_TAIL))
            tail = f.read()
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError):
        return None
    if head != b"\x08":  # an ONNX ModelProto opens with its ir_version field (tag 0x08)
        return None
    mark = tail.rfind(_ONNX_MARK)
    if mark < 0:
        return None
    start = tail.rfind(b'{"arch": ', 0, mark)
    meta = {}
    if start >= 0:
        try:
            meta = json.JSONDecoder().raw_decode(tail[start:].decode("utf-8", "replace"))[0]
        except ValueError:
            pass
    return "onnx", (meta if isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT else {})


def is_sokd_file(path: str | os.PathLike) -> bool:
    """A run checkpoint or model file (its format recorded inside) or an export sokd wrote."""
    path = Path(path)
    if sniff_export(path) is not None:
        return True
    if not zipfile.is_zipfile(path):
        return False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not recognised as ours
        return False
    return isinstance(obj, dict) and kind(obj) is not None


def _how_to_run(path: Path, fmt: str, meta: dict) -> str:
    """One clause saying how to run an exported file, with its recorded preprocessing."""
    inp = meta.get("input") if isinstance(meta.get("input"), dict) else {}
    shape = "x".join(map(str, inp.get("shape") or [])) or "CxHxW"
    call = (f"torch.jit.load('{path}')(x)" if fmt == "torchscript" else
            f"onnxruntime.InferenceSession('{path}').run(['{EXPORT_OUTPUT}'], {{'{EXPORT_INPUT}': x}})")
    norm = ""
    if inp.get("mean") is not None and inp.get("std") is not None:
        norm = f", x = (uint8 / 255 - mean) / std with mean {_values(inp['mean'])} std {_values(inp['std'])}"
    return f"run it with {call} on float32 Nx{shape} images{norm}"


def _values(values) -> str:
    try:
        return "[" + ", ".join(f"{float(v):.4g}" for v in values) + "]"
    except (TypeError, ValueError):
        return str(values)


def describe_export(fmt: str, meta: dict) -> str:
    """'a TorchScript model written by sokd export (role student, resnet8, 4 classes)'."""
    kind = {"torchscript": "TorchScript", "onnx": "ONNX"}[fmt]
    facts = [f"role {meta['role']}" if meta.get("role") else "", str(meta.get("arch") or ""),
             f"{meta['num_classes']} classes" if meta.get("num_classes") else ""]
    facts = ", ".join(f for f in facts if f)
    return f"a{'n' if fmt == 'onnx' else ''} {kind} model written by sokd export" + (f" ({facts})" if facts else "")


def refuse_export(path: str | os.PathLike, command: str) -> None:
    """SokdError when `path` is a file sokd export wrote: `sokd eval` / `sokd export` read run
    checkpoints and model files, and an exported model would otherwise read as a corrupt one.
    The message says what the file is, how to run it, and which checkpoint it came from."""
    found = sniff_export(path)
    if found is None:
        return
    fmt, meta = found
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    origin = source.get("checkpoint")
    retry = (f"; or {command} the checkpoint it came from: sokd {command} {origin}" if origin else
             f"; sokd {command} reads run checkpoints (last.pt / best.pt) and model files (student.pt, ...)")
    raise SokdError(f"'{path}' is {describe_export(fmt, meta)}, not a checkpoint sokd {command} "
                    f"reads; {_how_to_run(Path(path), fmt, meta)}{retry}")


def software_versions() -> dict[str, str]:
    """The versions a result depends on (a comparison pairs only runs that share them)."""
    import importlib.metadata
    import torch
    try:
        ours = importlib.metadata.version("sokd")
    except importlib.metadata.PackageNotFoundError:
        ours = "unknown"
    return {"sokd": ours, "torch": torch.__version__}
