"""`sokd` command line: parse, call the runner/commands, print. Knows no tensors.

User mistakes (SokdError) are printed as one line and exit with status 2; `--debug` shows the
traceback. An interrupted run exits 128+signal after saving a resumable checkpoint.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

from .errors import SokdError

COMMANDS = ("train", "eval", "models", "demo", "bench", "report", "compare", "export")


def build_parser() -> argparse.ArgumentParser:
    import importlib
    parser = argparse.ArgumentParser(prog="sokd", description="Semi-Online Knowledge Distillation and baselines")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f".commands.{name}", __package__)
        module.add_parser(sub)
    return parser



def main(argv: list[str] | None = None) -> int:
    """Run one command. Called without `argv` (the `sokd` process itself), the signal handler
    stays installed until the process exits; with `argv` (in-process callers) it is restored."""
    from .engine import signals
    real_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    with signals.process_guard(restore=not real_process):
        if real_process:
            signals.stop_with_parent()
        try:
            code = _run(argv, debug)
            sys.stdout.flush()  # a reader that went away shows up here, not at interpreter exit
        except BrokenPipeError:
            return _stdout_closed(real_process)
        late = signals.late_signal()
        if late is not None and code == 0:
            print(f"sokd: {signals.late_message(late)}", file=sys.stderr)
        return code


def _stdout_closed(real_process: bool) -> int:
    """The reader of our output went away (`sokd models | head -3`): stop quietly, as a process
    killed by SIGPIPE would, with its exit status 128+SIGPIPE. Python ignores SIGPIPE and raises
    BrokenPipeError instead; standard output is pointed at /dev/null so the interpreter's final
    flush does not raise it again (the recipe in Python's `signal` documentation)."""
    if real_process:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
    return 128 + signal.SIGPIPE


def _run(argv: list[str], debug: bool) -> int:
    from .engine.signals import ForcedStop, Interrupted, Stopped
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.run(args) or 0)
    except SokdError as err:
        if debug:
            traceback.print_exc()
        print(f"sokd: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # handled once, in main
    except (Interrupted, ForcedStop, Stopped) as err:
        print(f"sokd: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("sokd: interrupted (SIGINT)", file=sys.stderr)
        return 130
    except Exception as err:  # an exception that is sokd's fault, not the user's
        if debug:
            raise
        print(f"sokd: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback "
              f"and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
