"""One training engine for every method: precision, memory format, DDP, schedules, checkpoints."""
from ..files import atomic_save, load_state_strict, safe_load
from .distributed import DistContext
from .evaluate import evaluate
from .loop import FitContext, NonFiniteLoss, fit
from .precision import autocast, resolve_device
from .signals import Interrupted

__all__ = ["fit", "FitContext", "evaluate", "DistContext", "NonFiniteLoss", "Interrupted",
           "atomic_save", "safe_load", "load_state_strict", "autocast", "resolve_device"]
