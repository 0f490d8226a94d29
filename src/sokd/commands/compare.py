"""sokd compare SPEC: every variant x seed of a comparison, resumable and on many workers, then
its table of paired differences."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="compare methods: one teacher per seed, every variant x seed, paired statistics",
                       description="Run (or continue) the grid of a comparison spec and write its table. "
                                   "SPEC is a YAML file or preset:NAME (preset:fmnist, preset:cifar100-cpu).")
    p.add_argument("spec", help="a compare spec (YAML) or preset:NAME")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the spec's base config (e.g. data.root=DIR)")
    p.add_argument("--out", default=None, help="the folder of the runs (default: the spec's out, else runs/compare/NAME)")
    p.add_argument("--workers", type=int, default=1, help="runs at once on this machine (threads are split between them)")
    p.add_argument("--worker", action="store_true",
                   help="one worker of many sharing --out (e.g. a SLURM array on NFS): run what no one else holds, "
                        "then stop; the table is written once everything is finished")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: CPUs / workers)")
    p.add_argument("--variants", default=None, metavar="NAME,...",
                   help="run only these variants (and the teachers they need), e.g. to finish some before "
                        "others; the table covers every finished run")
    p.add_argument("--seeds", default=None, metavar="N,...",
                   help="run only these seeds of the spec (with their teachers); the table covers every finished run")
    p.add_argument("--table", action="store_true", help="only write the table of what has finished")
    p.add_argument("--plan", action="store_true", help="list the runs and their state; run nothing")
    p.set_defaults(run=run)


def run(args) -> int:
    from .. import compare
    from ..compare.workers import finished
    from ..data.config import usable_cpus
    from ..errors import SokdError
    if args.workers < 1:
        raise SokdError(f"--workers must be at least 1, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise SokdError(f"--threads must be at least 1, got {args.threads}")
    grid = compare.load(args.spec, args.overrides, args.out)
    if args.variants is not None:
        grid.select([v.strip() for v in args.variants.split(",") if v.strip()])
    if args.seeds is not None:
        try:
            seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
        except ValueError:
            raise SokdError(f"--seeds takes seeds separated by commas (e.g. --seeds 0,1), got '{args.seeds}'") from None
        grid.select_seeds(seeds)
    for name, seed in grid.runs():   # every run config is valid before anything starts
        grid.config(name, seed)
    if args.plan:
        from ..compare.workers import Claims, failed_note, finished, run_name
        claims = Claims(grid.out)
        for name, seed in grid.runs():
            rd = grid.run_dir(name, seed)
            state = ("finished" if finished(grid, name, seed) else
                     f"held by {claims.holder(run_name(name, seed))['worker']}" if claims.holder(run_name(name, seed))
                     else "failed, will retry" if failed_note(grid, name, seed).exists()
                     else "started, will resume" if (rd / "last.pt").exists() else "to run")
            print(f"{run_name(name, seed):<28} {state}")
        return 0
    if not args.table:
        threads = args.threads or (max(1, usable_cpus() // args.workers) if args.workers > 1 else None)
        failures = compare.run_workers(grid, args.workers, threads)
        if failures:
            print(f"{len(failures)} run(s) failed; rerun the same command to retry them:")
            for line in failures:
                print(f"  {line}")
    result = compare.summarise(grid)
    selected_done = all(finished(grid, name, seed) for name, seed in grid.runs())
    if args.worker and not selected_done:
        print(f"{result['runs_finished']} of {result['runs_expected']} runs finished; other workers hold the rest")
        return 0
    compare.write(grid)
    return 0 if selected_done or args.table else 1
