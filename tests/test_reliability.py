"""Never lose a run, never accept bad input silently."""
from __future__ import annotations

import gzip
import os
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sokd.engine import safe_load
from sokd.files import atomic_save
from sokd.errors import SokdError

from .conftest import tiny_config, write_config
from .test_reliability_files import GatedRun, gated_config, metric_rows

PY = [sys.executable, "-m", "sokd"]


def sokd_cli(*args, timeout=300):
    return subprocess.run(PY + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


# -- kill -9 at named points, resume, same final metrics -----------------------------------------
# 3 epochs of 8 steps; the gated_resnet8 plugin pauses the run at an exact forward and the test
# kills it there: (gate, the epoch last.pt holds at that moment; None: no checkpoint yet)
KILL_POINTS = {
    "before-first-checkpoint": ("train:4", None),    # epoch 1 step 4: the run starts again
    "mid-epoch": ("train:12", 1),                    # epoch 2 step 4
    "during-evaluation": ("aftertrain:16", 1),       # epoch 2 trained, evaluated, not yet saved
    "epoch-boundary": ("train:17", 2),               # epoch 3 step 1: epoch 2's files all written
    "during-last-evaluation": ("aftertrain:24", 2),  # epoch 3 trained, the run's final files to come
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg, run_dir = gated_config(tmp, "reference")
    proc = sokd_cli("train", cfg)
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_at_a_named_point_then_resume_matches_uninterrupted(tmp_path, uninterrupted, point):
    gate, saved_epoch = KILL_POINTS[point]
    cut_cfg, cut_dir = gated_config(tmp_path, "killed")
    run = GatedRun(tmp_path, cut_cfg, gate)
    run.wait_reached()
    run.proc.send_signal(signal.SIGKILL)
    code, _, _ = run.finish()
    assert code == -signal.SIGKILL
    if saved_epoch is None:  # killed before the first checkpoint: start again
        assert not (cut_dir / "last.pt").exists()
        resumed = sokd_cli("train", cut_cfg, "output.overwrite=true")
    else:
        last = safe_load(cut_dir / "last.pt")  # the last good checkpoint always loads
        assert (last["epoch"], last["step"]) == (saved_epoch, 0)
        resumed = sokd_cli("train", cut_cfg, "output.resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert metric_rows(cut_dir) == metric_rows(uninterrupted)
    a, b = safe_load(uninterrupted / "last.pt")["method"], safe_load(cut_dir / "last.pt")["method"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# SIGTERM / SIGINT at exact steps (first, second, late, early): tests/test_reliability_files.py


# -- malicious checkpoints are refused --------------------------------------------------------------
class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "sokd-model", "state_dict": {}, "payload": Exploit(marker)}, evil)
    with pytest.raises(SokdError, match="refused"):
        safe_load(evil)
    assert not marker.exists()
    proc = sokd_cli("eval", evil)
    assert proc.returncode == 2 and "refused" in proc.stderr and not marker.exists()
    raw = tmp_path / "raw.pt"  # a bare pickle, not even a torch zip file
    raw.write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(SokdError):
        safe_load(raw)
    assert not marker.exists()


def test_atomic_save_leaves_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_save({"a": Boom()}, path)
    assert torch.equal(safe_load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# -- every bad input: one line, non-zero exit, nothing half-written ---------------------------------
def _idx(path, arr, code=0x08):
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, teacher_file):
    """(name, config-dict mutator or argv, expected message fragment)."""
    d = tmp_path_factory.mktemp("bad")
    good_teacher = teacher_file
    # a checkpoint of another architecture / number of classes
    other = d / "other_arch.pt"
    ck = safe_load(good_teacher)
    atomic_save({**ck, "arch": "resnet8",
                 "state_dict": {k: v[:1] if v.dim() else v for k, v in ck["state_dict"].items()}}, other)
    trunc = d / "truncated.pt"
    trunc.write_bytes(good_teacher.read_bytes()[:2000])
    garbage = d / "garbage.pt"
    garbage.write_bytes(random.Random(0).randbytes(4096))
    # data files
    fm = d / "fmnist_corrupt"
    fm.mkdir()
    for split, n in (("train", 20), ("t10k", 10)):
        _idx(fm / f"{split}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
        _idx(fm / f"{split}-labels-idx1-ubyte.gz", np.zeros(n))
    raw = gzip.decompress((fm / "train-images-idx3-ubyte.gz").read_bytes())
    (fm / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    labels_bad = d / "labels.npz"
    np.savez(labels_bad, x_train=np.zeros((8, 8, 8, 3), np.uint8), y_train=np.full(8, 200),
             x_test=np.zeros((4, 8, 8, 3), np.uint8), y_test=np.zeros(4, np.int64))
    empty = d / "empty.npz"
    np.savez(empty, x_train=np.zeros((0, 8, 8, 3), np.uint8), y_train=np.zeros(0, np.int64),
             x_test=np.zeros((4, 8, 8, 3), np.uint8), y_test=np.zeros(4, np.int64))
    npz_corrupt = d / "corrupt.npz"
    npz_corrupt.write_bytes(b"PK\x03\x04" + random.Random(1).randbytes(200))
    pk = d / "cifar-10-batches-py"
    pk.mkdir()
    (pk / "data_batch_1").write_bytes(b"\x80\x04not a pickle at all")
    taken = d / "taken_run"
    taken.mkdir()
    (taken / "last.pt").write_bytes(b"x")
    (taken / "config.yaml").write_text("name: other\n")
    blocker = d / "a_file"
    blocker.write_text("x")
    model_as_last = d / "model_as_last"
    model_as_last.mkdir()
    (model_as_last / "last.pt").write_bytes(good_teacher.read_bytes())
    (model_as_last / "config.yaml").write_text("name: x\n")
    metrics_dir = d / "metrics_dir"
    (metrics_dir / "metrics.jsonl").mkdir(parents=True)
    raising = d / "raising_plugin.py"
    raising.write_text("raise RuntimeError('plugin is broken')\n")
    broken = d / "syntax_plugin.py"
    broken.write_text("def f(:\n")
    one_image_class = d / "one_image_class.npz"
    np.savez(one_image_class, x_train=np.zeros((9, 8, 8, 3), np.uint8), y_train=np.array([0] * 8 + [1]),
             x_test=np.zeros((4, 8, 8, 3), np.uint8), y_test=np.array([0, 1, 0, 1]))
    folder = d / "folder"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (folder / split / c).mkdir(parents=True)
            for i in range(2):
                from PIL import Image
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / split / c / f"{i}.png")
    readers = d / "bad_readers.py"
    readers.write_text(
        "import numpy as np\nimport sokd\n"
        "x = np.zeros((40, 8, 8, 3), np.uint8)\n"
        "@sokd.data.register('labels_off')\n"
        "def labels_off(root=None):\n"
        "    return {'train': (x, np.full(40, 9)), 'test': (x[:4], np.zeros(4, int)), 'classes': ['a', 'b']}\n"
        "@sokd.data.register('float_images')\n"
        "def float_images(root=None):\n"
        "    return (x.astype('float32'), np.zeros(40, int)), (x[:4], np.zeros(4, int))\n")
    not_hf = d / "not_hf"
    not_hf.mkdir()
    hf_dir = d / "hf"
    try:
        import datasets
        split = datasets.Dataset.from_dict({"image": [np.zeros((8, 8, 3), np.uint8)] * 2, "label": [0, 1]})
        datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(hf_dir))
    except ImportError:
        pass
    teacher = f"teacher.checkpoint={good_teacher}"
    return [
        ("unknown config key", ["vanilla", "train.epoch=3"], "unknown config key 'train.epoch' (did you mean 'epochs'?)"),
        ("wrong value type", ["vanilla", "train.epochs=many"], "bad value for 'train.epochs'"),
        ("unknown compile mode", ["vanilla", "train.compile=fast"],
         "bad value for 'train.compile': use auto, false, true, max-autotune or reduce-overhead (got 'fast')"),
        ("zero sync_every", ["vanilla", "train.sync_every=0"], "bad value for 'train.sync_every'"),
        ("unknown model", ["vanilla", "model.arch=resnet9"], "unknown model 'resnet9'"),
        ("unknown method", ["vanilla", "method.name=sokdd"], "unknown method 'sokdd'"),
        ("unknown data set", ["vanilla", "data.name=fmnist"], "unknown data set data.name='fmnist' (did you mean 'fashion_mnist'?)"),
        ("missing teacher checkpoint", ["kd", "teacher.checkpoint=/nonexistent/teacher.pt"], "not found"),
        ("no teacher checkpoint at all", ["kd", "teacher.checkpoint=null"], "needs a trained teacher"),
        ("checkpoint of another architecture", ["kd", f"teacher.checkpoint={other}"], "does not fit"),
        ("checkpoint with another number of classes", ["kd", teacher, "data.synthetic_classes=7"], "shape mismatch"),
        ("truncated checkpoint", ["kd", f"teacher.checkpoint={trunc}"], "corrupt or truncated"),
        ("corrupt checkpoint", ["kd", f"teacher.checkpoint={garbage}"], "corrupt or truncated"),
        ("data set not found", ["vanilla", "data.name=fashion_mnist", f"data.root={d}/nowhere"], "apt-get install dataset-fashion-mnist"),
        ("corrupt IDX file", ["vanilla", "data.name=fashion_mnist", f"data.root={fm}"], "train-images-idx3-ubyte"),
        ("corrupt npz file", ["vanilla", "data.name=cifar10", f"data.root={npz_corrupt}"], "corrupt.npz"),
        ("corrupt pickle", ["vanilla", "data.name=cifar10", f"data.root={pk}"], "data_batch_1"),
        ("labels out of range", ["vanilla", "data.name=cifar10", f"data.root={labels_bad}"], "label"),
        ("empty data set", ["vanilla", "data.name=cifar10", f"data.root={empty}"], "empty"),
        ("run dir holds another run", ["vanilla", f"output.dir={taken}"], "already holds a run"),
        ("unwritable output dir", ["vanilla", f"output.dir={blocker}/run"], "output"),
        ("kbm_stages > teacher stages", ["sokd", teacher, "method.kbm_stages=3"], "kbm_stages=3 but the teacher has 3 stages"),
        ("feature term on missing stage", ["sokd", teacher, "method.features=[{kind: at, stages: [4]}]"], "student stage 4"),
        ("empty feature-stage list", ["kd", teacher, "method.features=[{kind: at, stages: []}]"], "method.features.0.stages"),
        ("unknown feature kind", ["kd", teacher, "method.features=[{kind: spp}]"], "unknown feature kind 'spp' (did you mean 'sp'?)"),
        ("bad feature-kind option", ["kd", teacher, "method.features=[{kind: rkd, options: {w_angel: 1}}]"], "w_angel"),
        ("unknown logit distance", ["kd", teacher, "method.logit_loss=dkl"], "method.logit_loss"),
        ("standardised DIST", ["sokd", teacher, "method.logit_loss=dist", "method.logit_standardize=true"], "composes with logit_loss kl or dkd"),
        ("logit option without distillation", ["vanilla", "method.logit_loss=dkd"], "has no distillation term"),
        ("negative warm-up", ["kd", teacher, "method.warmup_epochs=-1"], "method.warmup_epochs"),
        ("negative term weight", ["kd", teacher, "method.weights={student_kd: -1}"], "must be >= 0"),
        ("negative lr decay", ["vanilla", "schedule.gamma=-0.1"], "bad value for 'schedule.gamma'"),
        ("negative per-role lr", ["vanilla", "optim.lr_per_role={model: -0.1}"], "the lr of role 'model' must be > 0"),
        ("unknown per-role lr role", ["sokd", teacher, "optim.lr_per_role={kmb: 0.01}"], "names role 'kmb' (did you mean 'kbm'?)"),
        ("unsorted milestones", ["vanilla", "schedule.milestones=[5, 2]"], "strictly increasing"),
        ("infinite temperature", ["kd", teacher, "method.T=.inf"], "'method.T': it must be a finite number"),
        ("NaN learning rate", ["vanilla", "optim.lr=.nan"], "'optim.lr': it must be a finite number"),
        ("unknown output.dir placeholder", ["vanilla", "output.dir=runs/{nmae}"], "unknown placeholder {nmae}"),
        ("imports file that raises", ["vanilla", f"imports=[{raising}]"], "raised RuntimeError while being imported"),
        ("imports file with a syntax error", ["vanilla", f"imports=[{broken}]"], "syntax_plugin.py' line 1 has a syntax error"),
        ("last.pt replaced by a model file", ["vanilla", f"output.dir={model_as_last}", "output.resume=true"], "is not a run checkpoint"),
        ("metrics.jsonl is a directory", ["vanilla", f"output.dir={metrics_dir}", "output.resume=true"], "is not a regular file"),
        ("images too small for the network", ["vanilla", "model.arch=vgg8", "data.synthetic_shape=[3, 2, 2]",
                                              "data.crop_padding=0"], "cannot take this data"),
        ("val_split outside (0, 1)", ["vanilla", "data.val_split=1.5"], "data.val_split must be a fraction between 0 and 1"),
        ("val_split leaving a class empty", ["vanilla", "data.name=cifar10", f"data.root={one_image_class}",
                                             "data.val_split=0.5"], "leaves class 1 (1 training image(s)) without"),
        ("in-memory folder above the memory cap", ["vanilla", "data.name=imagefolder", f"data.root={folder}",
                                                   "data.in_memory=true", "data.memory_cap_gb=0.0000001"],
         "above data.memory_cap_gb=1e-07; raise the cap or set data.in_memory=false"),
        ("registered data set with bad labels", ["vanilla", f"imports=[{readers}]", "data.name=labels_off"],
         "train label 9 is outside 0..1"),
        ("registered data set with float images", ["vanilla", f"imports=[{readers}]", "data.name=float_images"],
         "must be a uint8 image array, got dtype float32"),
        ("hf directory that is not a saved data set", ["vanilla", "data.name=hf", f"data.root={not_hf}"],
         "is not a saved Hugging Face data set"),
    ] + ([("hf data set without the named column", ["vanilla", "data.name=hf", f"data.root={hf_dir}", "data.hf.image=img"],
           "but not img; set data.hf.image")] if hf_dir.exists() else [])


def test_bad_inputs_give_one_line_errors_and_write_nothing(bad_inputs, tmp_path, capsys):
    """In-process `sokd train` (the CLI's own main) for speed; one subprocess checks the same."""
    from sokd.cli import main
    table, failures = [], []
    for name, (method, *overrides), expected in bad_inputs:
        cfg = tiny_config(tmp_path, method, name=name.replace(" ", "_"))
        run_dir = tmp_path / "runs" / cfg["name"]
        cfg["output"]["dir"] = str(run_dir)
        path = write_config(tmp_path, cfg, "bad.yaml")
        capsys.readouterr()
        code = main(["train", str(path), *overrides])
        msg = capsys.readouterr().err.strip()
        table.append((name, msg))
        ok = (code == 2 and len(msg.splitlines()) == 1 and msg.startswith("sokd: error:")
              and expected in msg)
        if not any(o.startswith("output.dir") for o in overrides):
            ok = ok and not run_dir.exists()
        if not ok:
            failures.append((name, code, msg[-400:]))
    Path(os.environ.get("SOKD_BAD_INPUT_TABLE", tmp_path / "table.md")).write_text(
        "| bad input | what the user sees |\n|---|---|\n"
        + "".join(f"| {n} | `{m}` |\n" for n, m in table))
    assert not failures, failures


def test_bad_input_in_a_real_process_is_one_line_and_exit_2(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, "vanilla"))
    proc = sokd_cli("train", path, "schedule.milestones=[3, 1]")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "strictly increasing" in proc.stderr


def test_debug_flag_shows_traceback(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, "vanilla"))
    proc = sokd_cli("--debug", "train", path, "model.arch=resnet9")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
