"""sokd: Semi-Online Knowledge Distillation and the baselines it is judged against.

    import sokd
    teacher = sokd.models.create("wrn_40_2", num_classes=100)
    student = sokd.models.create("wrn_40_1", num_classes=100)
    method = sokd.methods.create("sokd", teacher=teacher, student=student)
"""
from . import methods, models
from .errors import SokdError

__version__ = "0.1.0"
__all__ = ["models", "methods", "SokdError", "__version__"]
