"""The Python API: SOKD in a hand-written training loop (what `sokd train` does, minus the engine).

    python examples/train_loop.py [--steps 20] [--teacher runs/teacher/model.pt]

Uses sokd's synthetic data set (no download); swap in your own DataLoader of (images, labels).
Without --teacher, the teacher is trained for a few steps first (stand-in for a real teacher).
"""
from __future__ import annotations

import argparse

import torch

import sokd
from sokd.data import DataConfig
from sokd.data import create as create_data


def accuracy(method, test) -> dict[str, float]:
    """Test top-1 (%) of every network the method reports (student, teacher, kbm)."""
    method.eval()
    correct, n = {}, 0
    for images, labels in test:
        for role, logits in method.predict(images).items():
            correct[role] = correct.get(role, 0) + int((logits.argmax(1) == labels).sum())
        n += labels.numel()
    method.train()
    return {role: 100.0 * c / n for role, c in correct.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--teacher", default=None, help="a trained resnet14 model file (sokd train output)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = create_data(DataConfig(name="synthetic", synthetic_size=512, synthetic_shape=[3, 32, 32],
                                  synthetic_classes=10, batch_size=32, eval_batch_size=128))

    def loader(steps):  # endless epochs of (images, labels) batches
        epoch = 0
        while True:
            data.train.set_epoch(epoch)
            for batch in data.train:
                if steps == 0:
                    return
                steps -= 1
                yield batch
            epoch += 1

    teacher = sokd.models.create("resnet14", num_classes=data.num_classes)
    if args.teacher:  # load your trained weights into it
        teacher.load_state_dict(torch.load(args.teacher, map_location="cpu", weights_only=True)["state_dict"])
    else:
        vanilla = sokd.methods.create("vanilla", model=teacher)
        optimizer = torch.optim.SGD(vanilla.param_groups(lr=0.05), momentum=0.9, weight_decay=5e-4)
        for images, labels in loader(args.steps):
            out = vanilla(images, labels)
            optimizer.zero_grad(); out["loss"].backward(); optimizer.step()

    student = sokd.models.create("resnet8", num_classes=data.num_classes)
    method = sokd.methods.create("sokd", teacher=teacher, student=student, T=4, kbm_stages=1)
    # param_groups holds only what learns: the student and the KBM, never the frozen teacher
    optimizer = torch.optim.SGD(method.param_groups(lr=0.05), momentum=0.9, weight_decay=5e-4)
    method.train()
    losses = []
    for step, (images, labels) in enumerate(loader(args.steps), 1):
        out = method(images, labels)          # {"loss", "terms": {name: tensor}, "logits": {role: tensor}}
        optimizer.zero_grad(); out["loss"].backward(); optimizer.step()
        losses.append(out["loss"].item())
        if step == 1 or step % 5 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {losses[-1]:.4f}")
    top1 = accuracy(method, data.test)
    print("test top-1: " + "  ".join(f"{role} {acc:.1f}%" for role, acc in top1.items()))
    return {"losses": losses, "top1": top1}


if __name__ == "__main__":
    main()
