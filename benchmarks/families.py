#!/usr/bin/env python3
"""One epoch of every architecture family as teacher and as student, through `sokd train`.

    .venv/bin/python benchmarks/families.py [--per-class 100] [--out runs/families] [--json FILE]

For each family (timm ViT, distilled DeiT, a ViT given a distillation token, Swin, PVT-v2,
MaxViT; Hugging Face ViT, DeiT, Swin, ConvNeXt, ResNet folders built from small configs and
written by save_pretrained, offline): a teacher of the family is trained for one epoch (vanilla),
then distilled into a resnet8 by kd and by sokd (the bridge is a copy of the family's last stage
and head); and a resnet8 teacher (one epoch) is distilled into a student of the family by kd and
sokd (and deit where the family has a distillation token). Fashion-MNIST, padded to 32x32, a
class-stratified subset. It prints one row per family: test top-1 after one epoch of each run
(a smoke test of every pairing at small scale, not a result about the methods) and seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

#: families whose students have DeiT's distillation token and head (method deit)
DISTILLATION_TOKEN = ("timm DeiT (distilled)", "timm ViT + distillation token")
VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2}


def timm_families() -> dict[str, tuple[str, dict]]:
    return {
        "timm ViT": ("timm.vit_tiny_patch16_224", dict(VIT)),
        "timm DeiT (distilled)": ("timm.deit_tiny_distilled_patch16_224", dict(VIT)),
        "timm ViT + distillation token": ("timm.vit_tiny_patch16_224", {**VIT, "distillation_token": True}),
        "timm Swin": ("timm.swin_tiny_patch4_window7_224", {"img_size": 32, "window_size": 2, "depths": [1, 1, 2],
                                                            "embed_dim": 32, "num_heads": [1, 2, 4]}),
        "timm PVT-v2": ("timm.pvt_v2_b0", {}),
        "timm MaxViT": ("timm.maxvit_pico_rw_256", {"img_size": 32}),
    }


def hf_families(folder: Path, channels: int, classes: int) -> dict[str, tuple[str, dict]]:
    import torch
    import transformers as T
    vit = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
               intermediate_size=128, num_labels=classes, num_channels=channels)
    makers = {
        "HF ViT": lambda: T.ViTForImageClassification(T.ViTConfig(**vit)),
        "HF DeiT": lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**vit)),
        "HF Swin": lambda: T.SwinForImageClassification(T.SwinConfig(
            image_size=32, patch_size=2, embed_dim=32, depths=[1, 1, 2], num_heads=[1, 2, 4], window_size=2,
            num_labels=classes, num_channels=channels)),
        "HF ConvNeXt": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            num_stages=3, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], num_labels=classes, num_channels=channels)),
        "HF ResNet": lambda: T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], num_labels=classes,
            num_channels=channels)),
    }
    out = {}
    for name, make in makers.items():
        path = folder / name.replace(" ", "_")
        if not path.exists():
            torch.manual_seed(0)
            make().save_pretrained(path)
        out[name] = (f"hf:{path}", {})
    return out


def config(name: str, out: Path, per_class: int, method: str, roles: dict) -> dict:
    return {"name": name, "method": {"name": method}, **roles,
            "data": {"name": "fashion_mnist", "train_per_class": per_class, "test_limit": 1000, "pad_to": 32,
                     "mean": [0.2860], "std": [0.3530], "batch_size": 64},
            "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
            "schedule": {"name": "constant"},
            "train": {"epochs": 1, "seed": 0, "precision": "auto", "threads": 1, "compile": False},
            "output": {"dir": str(out / name), "progress": False, "tensorboard": False}}


def train(cfg: dict, out: Path) -> dict:
    """Train one run (or read it when it finished before); its summary."""
    from sokd import cli
    run = Path(cfg["output"]["dir"])
    if not (run / "summary.json").exists():
        path = out / f"{cfg['name']}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        t0 = time.time()
        if cli.main(["train", str(path)]) != 0:
            return {"failed": True}
        (run / "seconds.txt").write_text(f"{time.time() - t0:.1f}")
    summary = json.loads((run / "summary.json").read_text())
    summary["seconds"] = float((run / "seconds.txt").read_text()) if (run / "seconds.txt").exists() else None
    return summary


def hf_round_trip(run: Path) -> float:
    """Largest logit difference between the trained student as sokd's model file and as the
    Hugging Face folder the run wrote beside it (`from_pretrained`), on a batch of images."""
    import torch
    import transformers
    from sokd import artifacts
    path = run / "student.pt"
    ours = artifacts.rebuild_model(artifacts.load(path), str(path)).eval()
    theirs = transformers.AutoModelForImageClassification.from_pretrained(run / "student_hf").eval()
    x = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((ours(x) - theirs(pixel_values=x).logits).abs().max())


def top1(summary: dict, role: str) -> str:
    if summary.get("failed"):
        return "failed"
    net = summary["networks"].get(role) or {}
    return f"{net['top1_final']:.1f}" if "top1_final" in net else "—"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=100, help="training images per class")
    ap.add_argument("--out", default="runs/families")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help="families whose name contains this text")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    families = {**timm_families(), **hf_families(out / "hf", channels=1, classes=10)}
    if args.only:
        families = {k: v for k, v in families.items() if args.only.lower() in k.lower()}
    cnn_teacher = train(config("cnn-teacher", out, args.per_class, "vanilla", {"model": {"arch": "resnet8"}}), out)
    cnn_model = str(out / "cnn-teacher" / "model.pt")
    rows = []
    for label, (arch, kwargs) in families.items():
        slug = label.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus")
        net = {"arch": arch, **({"kwargs": kwargs} if kwargs else {})}
        row = {"family": label, "arch": arch}
        teacher = train(config(f"{slug}-teacher", out, args.per_class, "vanilla", {"model": net}), out)
        row["teacher"] = top1(teacher, "model")
        row["teacher_s"] = teacher.get("seconds")
        trained = {**net, "checkpoint": str(out / f"{slug}-teacher" / "model.pt")}
        for method in ("kd", "sokd"):
            s = train(config(f"{slug}-teacher-{method}", out, args.per_class, method,
                             {"teacher": trained, "student": {"arch": "resnet8"}}), out)
            row[f"to_cnn_{method}"] = top1(s, "student")
            if method == "sokd":
                row["to_cnn_sokd_kbm"] = top1(s, "kbm")
        student_methods = ["kd", "sokd"] + (["deit"] if label in DISTILLATION_TOKEN else [])
        for method in student_methods:
            name = f"{slug}-student-{method}"
            s = train(config(name, out, args.per_class, method,
                             {"teacher": {"arch": "resnet8", "checkpoint": cnn_model}, "student": net}), out)
            row[f"from_cnn_{method}"] = top1(s, "student")
            if arch.startswith("hf:") and not s.get("failed"):
                row[f"hf_round_trip_{method}"] = hf_round_trip(out / name)
        rows.append(row)
        print(json.dumps(row), flush=True)
    header = ("| family | teacher (vanilla) | → resnet8 kd | → resnet8 sokd (bridge) | resnet8 → kd | "
              "resnet8 → sokd | resnet8 → deit |")
    print(f"\nresnet8 teacher after one epoch: {top1(cnn_teacher, 'model')}\n")
    print(header + "\n|" + "---|" * 7)
    for r in rows:
        print(f"| {r['family']} | {r['teacher']} | {r['to_cnn_kd']} | {r['to_cnn_sokd']} (bridge {r['to_cnn_sokd_kbm']}) "
              f"| {r['from_cnn_kd']} | {r['from_cnn_sokd']} | {r.get('from_cnn_deit', '—')} |")
    trips = {f"{r['family']} ({k.rsplit('_', 1)[1]})": v for r in rows for k, v in r.items()
             if k.startswith("hf_round_trip_")}
    if trips:
        print("\nHugging Face round trip (student.pt vs from_pretrained(student_hf), max |logit difference|): "
              + ", ".join(f"{k} {v:.2e}" for k, v in trips.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"cnn_teacher": top1(cnn_teacher, "model"), "rows": rows}, indent=1))
    return 0 if all("failed" not in json.dumps(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
