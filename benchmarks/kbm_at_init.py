#!/usr/bin/env python3
"""Does SOKD's bridge reproduce a trained teacher at init? (`kbm_init: teacher`)

    .venv/bin/python benchmarks/kbm_at_init.py TEACHER_MODEL.pt [--stages 1 2] [--images 256]

Builds SOKD on the teacher (a sokd model file) with a resnet8 student and the bridge initialised
as a copy of the teacher's last stage(s) and head, and prints, per bridge depth, the largest
difference between the bridge's and the teacher's logits and their argmax agreement on random
images of the teacher's input shape (eval mode). A copy must agree exactly.
"""
from __future__ import annotations

import argparse

import torch

import sokd
from sokd import artifacts, methods


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher")
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args()
    ckpt = artifacts.load(args.teacher)
    teacher = artifacts.rebuild_model(ckpt, args.teacher).eval()
    shape = tuple((ckpt.get("data") or {}).get("shape") or ())
    if len(shape) != 3:
        raise SystemExit(f"{args.teacher} records no input shape; pass a sokd model file (model.pt)")
    student = sokd.models.create("resnet8", num_classes=int(ckpt["num_classes"]), in_channels=shape[0])
    sizes = [len(s) if hasattr(s, "__len__") else 1 for s in teacher.stages]
    x = torch.randn(args.images, *shape, generator=torch.Generator().manual_seed(0))
    for k in args.stages:
        method = methods.create("sokd", teacher=teacher, student=student, kbm_init="teacher", kbm_stages=k,
                                input_shape=shape).eval()
        with torch.no_grad():
            out = method.predict(x)
        teacher_params = {q.data_ptr() for q in teacher.parameters()}
        bridge = list(method.nets["kbm"].parameters())
        shared = sum(q.data_ptr() in teacher_params for q in bridge)
        trainable = sum(q.numel() for q in bridge if q.requires_grad)
        diff = (out["kbm"] - out["teacher"]).abs().max().item()
        agree = (out["kbm"].argmax(1) == out["teacher"].argmax(1)).float().mean().item() * 100
        print(f"kbm_stages={k} (the teacher's last {k} stage(s) of {sizes} blocks/layers, + its head): "
              f"max |KBM - teacher| logit {diff:.2e} over {args.images} images, argmax agreement {agree:.1f}%; "
              f"the bridge: {trainable} trainable parameters, {shared} tensors shared with the teacher")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
