"""Image-folder pipeline figures: images/s streamed vs in memory, and the uint8 stream vs float32.

    .venv/bin/python benchmarks/folder_pipeline.py export  DIR      # cifar100.npz -> DIR/{train,test}/<class>/*.jpg
    .venv/bin/python benchmarks/folder_pipeline.py stream  DIR [--workers 1 2] [--augment imagenet]
    .venv/bin/python benchmarks/folder_pipeline.py memory  DIR      # cold decode + warm epoch from the cache

`stream` times one pass over the training batches (no model), so it measures what the data
layer can feed. Run it with another sokd on PYTHONPATH to compare versions of the pipeline; it
uses only config keys every version knows unless --augment is given. Figures are printed, never
asserted: compare them as ratios measured in one session on one machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT.parent / "shared" / "data" / "cifar100.npz"


def export(out: Path, npz: Path, quality: int) -> None:
    import numpy as np
    from PIL import Image

    arrays = np.load(npz, allow_pickle=False)
    names = [str(n) for n in arrays["class_names"]]
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        for c in names:
            (out / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(len(y)):
            Image.fromarray(x[i]).save(out / split / names[int(y[i])] / f"{i:05d}.jpg", quality=quality)
        print(f"{split}: {len(y)} images -> {out / split}", flush=True)


def _bundle(root: Path, workers: int, extra: dict):
    import torch
    from sokd import data
    from sokd.data.config import DataConfig

    torch.set_num_threads(1)
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=32, batch_size=128, num_workers=workers, **extra)
    return data.create(cfg, seed=0)


def _pass(source, limit: int | None) -> tuple[int, float]:
    t0, n = time.perf_counter(), 0
    for b, (x, _) in enumerate(source):
        n += x.shape[0]
        if limit is not None and b + 1 >= limit:
            break
    return n, time.perf_counter() - t0


def stream(root: Path, workers: list[int], augment: str | None, batches: int | None) -> None:
    extra = {"in_memory": False, "augment": augment} if augment else {}
    for w in workers:
        bundle = _bundle(root, w, extra)
        _pass(bundle.train, 3)                       # start the workers, fill the prefetch queue
        n, dt = _pass(bundle.train, batches)
        print(f"stream  workers={w}  augment={augment or 'default'}: {n} images in {dt:.1f} s = "
              f"{n / dt:.0f} images/s", flush=True)


def memory(root: Path, workers: int, cache: Path) -> None:
    import shutil
    shutil.rmtree(cache, ignore_errors=True)      # a cache this script wrote on an earlier call
    t0 = time.perf_counter()
    bundle = _bundle(root, workers, {"in_memory": True, "cache_dir": str(cache)})
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    bundle = _bundle(root, workers, {"in_memory": True, "cache_dir": str(cache)})
    warm = time.perf_counter() - t0
    n, dt = _pass(bundle.train, None)
    print(f"memory  decode+cache (cold) {cold:.1f} s; load from cache (warm) {warm:.1f} s; one epoch of "
          f"batches {n} images in {dt:.1f} s = {n / dt:.0f} images/s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["export", "stream", "memory"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--npz", type=Path, default=NPZ)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--augment", default=None)
    ap.add_argument("--batches", type=int, default=None, help="batches per timed pass (default: one epoch)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/sokd-folder-bench-cache"))
    args = ap.parse_args()
    if args.what == "export":
        export(args.dir, args.npz, args.quality)
    elif args.what == "stream":
        stream(args.dir, args.workers, args.augment, args.batches)
    else:
        memory(args.dir, args.workers[-1], args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
