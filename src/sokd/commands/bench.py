"""sokd bench: training-step speed of every method for a teacher/student pair."""
from __future__ import annotations

import json
import os
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time the training step of each method (images/s, FLOPs, peak)")
    p.add_argument("--teacher", default="wrn_40_2")
    p.add_argument("--student", default="wrn_40_1")
    p.add_argument("--teacher-kwargs", default=None, metavar="YAML",
                   help="the teacher's constructor options, e.g. '{img_size: 32, patch_size: 4}' for a ViT")
    p.add_argument("--student-kwargs", default=None, metavar="YAML", help="the student's, the same way")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--input", default="3x32x32")
    p.add_argument("--methods", nargs="+", default=None, help="variants to time (default: the nine core ones; 'all' for every variant)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps-per-rep", type=int, default=3)
    p.add_argument("--no-plain", action="store_true", help="skip the plain-PyTorch SOKD baseline")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--fp32-too", nargs="*", default=[], metavar="VARIANT",
                   help="also time these variants in fp32 NCHW in the same run (e.g. vanilla)")
    p.add_argument("--compile", nargs="?", const="true", default=None,
                   choices=["true", "max-autotune", "reduce-overhead"],
                   help="also time every variant with its forward compiled as train.compile=MODE compiles it "
                        "(default mode: true); reports compile time and the gain over eager")
    p.add_argument("--json", default=None, help="write the results here (default: print only)")
    p.set_defaults(run=run)


def run(args) -> int:
    from .. import bench
    from ..errors import SokdError
    from ..table import render
    try:
        shape = tuple(int(v) for v in args.input.split("x"))
    except ValueError:
        raise SokdError(f"--input must be CxHxW with integer sizes (e.g. 3x32x32), got '{args.input}'") from None
    if args.json:
        _check_json_path(Path(args.json))
    kwargs = {role: _mapping(getattr(args, f"{role}_kwargs"), f"--{role}-kwargs") for role in ("teacher", "student")}
    res = bench.run(args.teacher, args.student, args.batch, args.device, args.precision,
                    not args.no_channels_last, args.classes, shape, args.methods, args.warmup,
                    args.reps, args.steps_per_rep, plain=not args.no_plain, memory=not args.no_memory,
                    fp32_too=args.fp32_too,
                    compile={None: False, "true": True}.get(args.compile, args.compile),
                    teacher_kwargs=kwargs["teacher"], student_kwargs=kwargs["student"])
    rows = [[r["name"], r["precision"] + ("+CL" if r["channels_last"] else ""), f"{r['images_per_s']:.1f}",
             f"{r['step_ms']:.1f}", f"{r['gflop_per_step']:.2f}", f"{r['gflop_per_s']:.0f}",
             f"{100 * r['peak_fraction']:.0f}%",
             "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}",
             "" if r.get("compile_s") is None else f"{r['compile_s']:.0f}"] for r in res["results"]]
    print(f"\n{args.teacher} -> {args.student}, batch {args.batch}, {res['device']}, "
          f"{res['threads']} threads; matmul peak {res['matmul_peak_gflops']:.0f} GFLOP/s ({args.precision})")
    print(render(["variant", "precision", "img/s", "ms/step", "GFLOP/step", "GFLOP/s", "of peak",
                  "peak MB", "compile s"], rows))
    for k, v in res["ratios"].items():
        print(f"  {k}: {v:.2f}" if isinstance(v, (int, float)) else f"  {k}: {v}")
    if args.json:
        from ..files import atomic_write_text, default_file_mode
        path = Path(args.json)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SokdError(f"cannot create the folder of --json '{path}' ({err.strerror}); pass a "
                            f"writable path") from None
        atomic_write_text(path, json.dumps(res, indent=2) + "\n", "free space or pass --json elsewhere",
                          default_file_mode())
        print(f"wrote {args.json}")
    return 0


def _mapping(text: str | None, flag: str) -> dict:
    """A YAML mapping given on the command line ({} when absent)."""
    import yaml
    from ..errors import SokdError
    if text is None:
        return {}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise SokdError(f"{flag} must be a YAML mapping, e.g. '{{img_size: 32, patch_size: 4}}', got '{text}'")
    return value


def _check_json_path(path: Path) -> None:
    """Refuse a --json path that cannot be written before the (minutes long) measurement starts."""
    from ..errors import SokdError
    if path.is_dir():
        raise SokdError(f"--json '{path}' is a directory; pass a file path such as {path / 'bench.json'}")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise SokdError(f"--json '{path}' cannot be written ('{parent}' is not a writable folder); "
                        f"pass a writable path")
