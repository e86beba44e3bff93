"""LoRA-Pro: the :class:`LoRAPro` optimizer and :func:`apply_lora_pro_` (``optimizer.py``), the closed form of the
adapter gradients (``closed_form.py``), adapter pairs stacked for batched solves (``pairs.py``), what a step plans
and may skip (``plans.py``) and full mode's per-stack step, which a fused kernel may replace (``update.py``).
The method as implemented: ``docs/lora-pro.md``."""

from lit_lowrank.optim.lora_pro.closed_form import equivalent_gradient, lora_pro_gradients
from lit_lowrank.optim.lora_pro.optimizer import LoRAPro, apply_lora_pro_
from lit_lowrank.optim.lora_pro.update import full_mode_update

__all__ = ["LoRAPro", "apply_lora_pro_", "equivalent_gradient", "full_mode_update", "lora_pro_gradients"]
