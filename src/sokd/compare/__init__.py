"""`sokd compare`: a method comparison as one command — one teacher per seed shared by every
variant of that seed, every variant x seed run once (resumable, on any number of workers), and a
table of paired differences with their statistics. See spec.py (what a spec holds), workers.py
(how runs are claimed and run) and results.py (the table)."""
from .spec import Grid, Spec, load
from .results import summarise, write
from .workers import run_workers

__all__ = ["Grid", "Spec", "load", "summarise", "write", "run_workers"]
