"""Ways into libraries that have their own training loops or factories (timm's optimizer registry).

transformers' ``Trainer`` and Lightning projects need nothing here: they take the optimizers and callbacks as they
are (``docs/integrations.md``).
"""
from lit_lowrank.integrations.timm import TIMM_OPTIMIZERS, register_timm_optimizers

__all__ = ["TIMM_OPTIMIZERS", "register_timm_optimizers"]
