"""CRD: its formulas on hand-built tensors, the sample indices it needs from every data source and
from DDP ranks, training runs with kd and sokd, bf16, and an exact kill-and-resume."""
from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sokd
from sokd import config, data, runner
from sokd.cli import main
from sokd.data import augment
from sokd.data.config import DataConfig
from sokd.engine import Interrupted, safe_load
from sokd.engine import loop as loop_mod
from sokd.errors import SokdError
from sokd.methods.features import crd

from .conftest import stop_after_checks, tiny_config, write_config
from .test_distributed import failure, torchrun
from .test_folder_faults import write_folder
from .test_reliability_files import GATE_PLUGIN, GatedRun

SMALL = {"nce_k": 64, "feat_dim": 16}  # tiny-data options: the defaults' banks work too, only slower


def crd_config(tmp_path: Path, method: str, teacher_file, name: str | None = None, **sections) -> dict:
    cfg = tiny_config(tmp_path, method, name=name or f"{method}_crd", **sections)
    cfg["teacher"]["checkpoint"] = str(teacher_file)
    cfg["method"]["features"] = [{"kind": "crd", "options": dict(SMALL)}]
    cfg["output"]["dir"] = str(tmp_path / "runs" / cfg["name"])
    return cfg


def nce_loss(p: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Paper Eq. 18 for p (B, K+1), column 0 the positive, the rest negatives, written directly:
    the reference the engine's fused loss-and-gradient is checked against."""
    b, k = p.shape[0], p.shape[1] - 1
    noise = k / float(num_samples)  # K * P_n
    log_pos = torch.log(p[:, 0] / (p[:, 0] + noise + crd.EPS))
    log_neg = torch.log(noise / (p[:, 1:] + noise + crd.EPS))
    return -(log_pos.sum() + log_neg.sum()) / b


# -- the formulas -------------------------------------------------------------------------------
def test_memory_update_is_momentum_then_normalisation_on_the_batch_rows_only():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    before = memory.clone()
    index = torch.tensor([2, 0])
    emb = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    crd.update_memory(memory, index, emb, momentum=0.5)
    row2 = torch.tensor([0.5 * 0.6 + 0.0, 0.5 * 0.8 + 0.5])     # (0.3, 0.9)
    row0 = torch.tensor([0.5, -0.5])
    assert torch.allclose(memory[2], row2 / row2.norm())
    assert torch.allclose(memory[0], row0 / row0.norm())
    assert torch.equal(memory[1], before[1]) and torch.equal(memory[3], before[3])


def test_nce_loss_is_its_formula_on_a_tiny_case():
    p = torch.tensor([[0.5, 0.1, 0.3], [2.0, 0.05, 0.0]])
    n = 10  # K = 2 negatives, P_n = 1/10, K P_n = 0.2
    c, e = 0.2, crd.EPS
    expected = -(math.log(0.5 / (0.5 + c + e)) + math.log(c / (0.1 + c + e)) + math.log(c / (0.3 + c + e))
                 + math.log(2.0 / (2.0 + c + e)) + math.log(c / (0.05 + c + e)) + math.log(c / (0.0 + c + e))) / 2
    assert nce_loss(p, n).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dense", [True, False])
def test_memory_nce_sets_z_once_and_its_gradient_is_autograds(monkeypatch, dense):
    """Both ways of scoring (one matmul over the bank, or gathered rows in chunks) give the loss
    and gradient of the direct computation exp(M[c] . v / tau) / Z -> nce_loss."""
    monkeypatch.setattr(crd, "_DENSE_MAX", 1 << 24 if dense else 0)
    monkeypatch.setattr(crd, "_CHUNK_ELEMENTS", 1 << 22 if dense else 7 * 8)  # 7 rows a chunk
    g = torch.Generator().manual_seed(0)
    n, b, d, k, tau = 40, 5, 8, 30, 0.07
    memory = F.normalize(torch.randn(n, d, generator=g), dim=1)
    v = F.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_()
    contrast = crd.sample_contrast(torch.randperm(n, generator=g)[:b], n, k)
    z = torch.tensor([-1.0])
    loss = crd._MemoryNCE.apply(v, memory, contrast, z, tau, n)
    (grad,) = torch.autograd.grad(loss, v)

    ref_v = v.detach().clone().requires_grad_()
    e = torch.exp(torch.einsum("bkd,bd->bk", memory[contrast], ref_v) / tau)
    ref_z = e.detach().mean() * n
    ref = nce_loss(e / ref_z, n)
    (ref_grad,) = torch.autograd.grad(ref, ref_v)
    assert z.item() == pytest.approx(ref_z.item(), rel=1e-5)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-5)
    # Z, once set, is kept: a second batch scores against the first batch's Z
    again = crd._MemoryNCE.apply(v, memory, contrast, z, tau, n)
    assert z.item() == pytest.approx(ref_z.item(), rel=1e-5) and again.item() == pytest.approx(loss.item())


def test_negatives_skip_the_anchor_follow_the_global_rng_and_k_is_capped():
    index = torch.tensor([0, 3, 4])
    torch.manual_seed(7)
    a = crd.sample_contrast(index, 5, 400)
    torch.manual_seed(7)
    b = crd.sample_contrast(index, 5, 400)
    assert torch.equal(a, b) and torch.equal(a[:, 0], index)
    assert (a[:, 1:] != index[:, None]).all() and a.min() >= 0 and a.max() < 5
    for row, anchor in zip(a[:, 1:], index.tolist()):  # every other index is drawn
        assert set(row.tolist()) == set(range(5)) - {anchor}
    teacher, student = sokd.models.create("resnet14", num_classes=4), sokd.models.create("resnet8", num_classes=4)
    method = sokd.methods.create("kd", teacher=teacher, student=student, input_shape=(3, 16, 16),
                                 num_samples=6, features=[{"kind": "crd"}])
    term = method.features.modules_by_term["student_crd"]
    assert term.k == 5 and method.needs_index and method.term_weights["student_crd"] == 0.8
    state = method.state_dict()
    for key in ("memory_s", "memory_t", "z"):
        assert f"features.modules_by_term.student_crd.{key}" in state
    assert state["features.modules_by_term.student_crd.memory_s"].shape == (6, 128)
    with pytest.raises(SokdError, match="training-set size"):
        sokd.methods.create("kd", teacher=teacher, student=student, input_shape=(3, 16, 16),
                            features=[{"kind": "crd"}])
    with pytest.raises(SokdError, match="index"):
        method(torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.int64))


def test_bf16_autocast_gives_a_finite_fp32_loss():
    torch.manual_seed(0)
    teacher, student = sokd.models.create("resnet14", num_classes=4), sokd.models.create("resnet8", num_classes=4)
    method = sokd.methods.create("kd", teacher=teacher, student=student, input_shape=(3, 16, 16),
                                 num_samples=32, features=[{"kind": "crd", "options": SMALL}])
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    for step in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = method(x, y, index=torch.arange(8 * step, 8 * step + 8))
        term = out["terms"]["student_crd"]
        assert term.dtype == torch.float32 and torch.isfinite(term) and torch.isfinite(out["loss"])
        out["loss"].backward()
    term = method.features.modules_by_term["student_crd"]
    assert term.embed_s.weight.grad is not None and term.embed_t.weight.grad is not None
    assert all(p.grad is None for p in method.nets["teacher"].parameters())
    assert (term.z > 0).all() and term.memory_s.dtype == torch.float32
    norms = term.memory_s.norm(dim=1)
    assert torch.allclose(norms[:16], torch.ones(16), atol=1e-5)      # rows of the two batches
    assert not torch.allclose(norms[16:], torch.ones(16), atol=1e-5)  # rows never seen


# -- indices from the data ------------------------------------------------------------------------
def _indexed_epoch(source, epoch: int, start: int = 0):
    source.set_epoch(epoch)
    batches = list(source.iter_from(start))
    assert all(len(b) == 3 for b in batches)
    return batches


def test_in_memory_source_yields_subset_positions_consistently():
    cfg = DataConfig(name="synthetic", synthetic_size=64, synthetic_shape=[1, 8, 8], synthetic_classes=4,
                     train_per_class=10, train_limit=30, batch_size=8, drop_last=False,
                     crop_padding=0, hflip=False)
    bundle = data.create(cfg, seed=3)
    full = data.create(cfg.model_copy(update={"train_per_class": None, "train_limit": None}), seed=3)
    assert bundle.train_size == 30
    src = bundle.train
    plain = list(src)  # without with_index: (images, labels) as before
    assert all(len(b) == 2 for b in plain)
    src.with_index = True
    seen = {}
    for epoch in (0, 1):
        batches = _indexed_epoch(src, epoch)
        index = torch.cat([i for _, _, i in batches])
        assert sorted(index.tolist()) == list(range(30))       # every subset position once
        for x, y, i in batches:                                 # index names the sample
            assert torch.equal(y, src.labels[i])
            assert torch.equal(x, augment._affine(src.images[i], src._scale, src._shift, torch.contiguous_format))
        seen[epoch] = index
        tail = _indexed_epoch(src, epoch, start=2)              # mid-epoch resume: the same tail
        assert torch.equal(torch.cat([i for _, _, i in tail]), torch.cat([i for _, _, i in batches[2:]]))
    assert not torch.equal(seen[0], seen[1])                    # shuffled per epoch
    pool = sokd.data.arrays.first_per_class(full.train.labels, 10)
    kept = pool[sokd.data.subsets.stratified_subset(full.train.labels[pool], 30, cfg.split_seed)]
    assert torch.equal(src.images, full.train.images[kept])     # positions in the subset, not the file
    shards = []
    for rank in (0, 1):                                         # rank-strided for DDP
        r = data.create(cfg, seed=3, rank=rank, world_size=2).train
        r.with_index = True
        shards.append(torch.cat([i for _, _, i in _indexed_epoch(r, 1)]))
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    assert sorted(shards[0].tolist() + shards[1].tolist()) == list(range(30))


def test_image_folder_source_yields_subset_positions(tmp_path):
    root = write_folder(tmp_path / "imgs", n_train=4, n_val=1)
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=16, batch_size=4, train_per_class=3,
                     drop_last=False, num_workers=0, in_memory=False)
    bundle = data.create(cfg, seed=1)
    src = bundle.train
    assert bundle.train_size == 9 and len(src.dataset) == 9
    targets = [src.dataset.dataset.targets[j] for j in src.dataset.indices]
    src.with_index = True
    for epoch in (0, 1):
        batches = _indexed_epoch(src, epoch)
        index = torch.cat([i for _, _, i in batches])
        assert sorted(index.tolist()) == list(range(9))
        for _, y, i in batches:
            assert y.tolist() == [targets[j] for j in i.tolist()]
        tail = _indexed_epoch(src, epoch, start=1)
        assert all(torch.equal(a[2], b[2]) and torch.equal(a[0], b[0]) for a, b in zip(tail, batches[1:]))


RECORD_PLUGIN = '''
"""Each rank records the indices its crd term is called with and, at exit, the term's state."""
import atexit, os
import torch
from sokd.methods.features import crd

_seen, _term = [], []
_forward = crd.CRDTerm.forward


def _recording(self, student_feats, target_feats, batch):
    _seen.append(batch["index"].detach().cpu().clone())
    _term[:] = [self]
    return _forward(self, student_feats, target_feats, batch)


crd.CRDTerm.forward = _recording
atexit.register(lambda: torch.save(
    {"index": _seen, "state": {k: v.detach().clone() for k, v in _term[0].state_dict().items()}},
    os.path.join(OUT, "rank%s.pt" % os.environ["RANK"])))
'''


def test_two_ranks_see_disjoint_indices_and_keep_identical_banks(tmp_path, teacher_file):
    """Under DDP the index keyword reaches the method through the wrapper, the ranks' indices
    tile the training set, and every rank applies every rank's memory updates: the banks agree
    on both ranks and with last.pt, and every row was updated (unit norm)."""
    cfg = crd_config(tmp_path, "kd", teacher_file, train={"epochs": 1, "threads": 1})
    cfg["data"]["batch_size"] = 16
    (tmp_path / "record.py").write_text(RECORD_PLUGIN.replace("OUT", repr(str(tmp_path))))
    cfg["imports"] = [str(tmp_path / "record.py")]
    proc = torchrun(2, write_config(tmp_path, cfg))
    assert proc.returncode == 0, failure(proc.stderr)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    index = [torch.cat(r["index"]) for r in ranks]
    assert len(ranks[0]["index"]) == len(ranks[1]["index"]) == 8
    assert not set(index[0].tolist()) & set(index[1].tolist())
    assert sorted(index[0].tolist() + index[1].tolist()) == list(range(256))
    saved = safe_load(Path(cfg["output"]["dir"]) / "last.pt")["method"]
    prefix = "features.modules_by_term.student_crd."
    for key in ("memory_s", "memory_t", "z"):
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        assert torch.equal(ranks[0]["state"][key], saved[prefix + key]), key
    for key in ("memory_s", "memory_t"):
        assert torch.allclose(saved[prefix + key].norm(dim=1), torch.ones(256), atol=1e-5)


# -- training runs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kd", "sokd"])
def test_one_epoch_train_and_eval(tmp_path, teacher_file, method, capsys, one_thread):
    cfg = crd_config(tmp_path, method, teacher_file, train={"epochs": 1, "threads": 1})
    assert main(["train", str(write_config(tmp_path, cfg))]) == 0
    run_dir = Path(cfg["output"]["dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["term_weights"]["student_crd"] == 0.8
    row = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert math.isfinite(row["train"]["terms"]["student_crd"]) and row["train"]["terms"]["student_crd"] > 0
    state = safe_load(run_dir / "last.pt")
    assert state["data"]["train_size"] == 256
    assert (state["method"]["features.modules_by_term.student_crd.z"] > 0).all()
    capsys.readouterr()
    assert main(["eval", str(run_dir / "last.pt"), "--json"]) == 0  # rebuilt with its banks
    assert "student" in json.loads(capsys.readouterr().out)["roles"]


def _states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("wall_time_s", None)
        for k in ("images_per_s", "seconds"):
            r.get("train", {}).pop(k, None)
    return rows


def test_kill_and_resume_is_exact_including_the_memory_banks(tmp_path, teacher_file, monkeypatch):
    """kd + crd: a run stopped mid-epoch (checkpoint at epoch 2 step 3) and one SIGKILLed
    mid-epoch (resumes from the epoch-1 checkpoint) both end bit-identical to an uninterrupted
    run: weights, heads, memory banks, Z and every metric."""
    def make(name):
        cfg = crd_config(tmp_path, "kd", teacher_file, name=name, student={"arch": "gated_resnet8"},
                         imports=[GATE_PLUGIN], train={"epochs": 2, "seed": 3, "threads": 1})
        return cfg, Path(cfg["output"]["dir"])

    ref, ref_dir = make("ref")
    runner.train(config.build(ref))
    final = safe_load(ref_dir / "last.pt")["method"]
    assert not torch.equal(final["features.modules_by_term.student_crd.memory_s"],
                           final["features.modules_by_term.student_crd.memory_t"])

    # SIGKILL while epoch 2 runs: last.pt holds epoch 1, the resume replays epoch 2
    killed, killed_dir = make("killed")
    killed_yaml = write_config(tmp_path, killed, "killed.yaml")
    run = GatedRun(tmp_path, killed_yaml, "train:12")   # epoch 2, step 4 of 8
    run.wait_reached()
    run.proc.send_signal(signal.SIGKILL)
    code, _, _ = run.finish()
    assert code == -signal.SIGKILL and safe_load(killed_dir / "last.pt")["epoch"] == 1
    runner.train(config.build({**killed, "output": {**killed["output"], "resume": True}}))
    _states_equal(final, safe_load(killed_dir / "last.pt")["method"])
    assert _rows(killed_dir) == _rows(ref_dir)

    # stopped mid-epoch: last.pt holds epoch 2 step 3 (RNG, banks and Z of that step)
    cut, cut_dir = make("cut")
    real = loop_mod.StopRequest
    stop_after_checks(monkeypatch, 12)
    with pytest.raises(Interrupted):
        runner.train(config.build(cut))
    assert (safe_load(cut_dir / "last.pt")["epoch"], safe_load(cut_dir / "last.pt")["step"]) == (1, 3)
    monkeypatch.setattr(loop_mod, "StopRequest", real)
    runner.train(config.build({**cut, "output": {**cut["output"], "resume": True}}))
    _states_equal(final, safe_load(cut_dir / "last.pt")["method"])
    assert _rows(cut_dir) == _rows(ref_dir)
