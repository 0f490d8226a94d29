"""Feature and relational distillation terms (method.features): the term machinery (`terms`) and
the kinds that keep state of their own beside the simple pair losses, each in its own module
(`crd`: contrastive memory banks, `nd`: KD++'s class centres, `ofa`: OFA-KD's stage
branches to the logits, `reviewkd`: attention-based fusion of
stages). Importing this package registers every built-in kind."""
from .terms import KINDS, FeatureSpec, FeatureTerms, TermContext, default_weight, register_kind
from . import crd, nd, ofa, reviewkd  # noqa: E402,F401  (register the kinds with state of their own)

__all__ = ["KINDS", "FeatureSpec", "FeatureTerms", "TermContext", "default_weight", "register_kind", "crd", "nd", "ofa",
           "reviewkd"]
