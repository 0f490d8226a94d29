"""Feature and relational distillation terms (method.features): the term machinery (`terms`) and
the kinds that keep state of their own beside the simple pair losses, each in its own module
(`crd`: contrastive memory banks, `nd`: KD++'s class centres, `reviewkd`: attention-based fusion of
stages). Importing this package registers every built-in kind."""
from .terms import KINDS, FeatureSpec, FeatureTerms, TermContext, default_weight, register_kind
from . import crd, nd, reviewkd  # noqa: E402,F401  (register the "crd", "nd" and "reviewkd" kinds)

__all__ = ["KINDS", "FeatureSpec", "FeatureTerms", "TermContext", "default_weight", "register_kind", "crd", "nd",
           "reviewkd"]
