"""LoRA-Pre: optimizers whose states for weight matrices are kept as low-rank factors.

- :class:`LoRAPreAdamW`: AdamW with both moments factored (``2 (p + q) r`` state elements per matrix).
- :class:`LoRAPreMuon`: Muon with its momentum buffer factored (``(p + q) r``).
- :func:`lowrank_param_groups`: which tensors of a model are factored (the rest get AdamW in the same optimizer).

The per-matrix steps, which a fused kernel may replace, are :func:`lora_pre_adam_update_` and
:func:`lora_pre_muon_update_`. The method as implemented: ``docs/lora-pre.md``.

Example:
    >>> import torch
    >>> from lit_lowrank.optim.lora_pre import LoRAPreAdamW
    >>> model = torch.nn.Linear(64, 32)
    >>> optimizer = LoRAPreAdamW(model.parameters(), lr=1e-3, rank=8)
    >>> model(torch.randn(4, 64)).sum().backward()
    >>> optimizer.step()
    >>> optimizer.state_bytes().total == 4 * (2 * (32 + 64) * 8 + 2 * 32)  # factors + the bias's AdamW moments
    True
"""

from lit_lowrank.optim.groups import lowrank_param_groups, param_group_names
from lit_lowrank.optim.lora_pre_adam import LoRAPreAdamW
from lit_lowrank.optim.lora_pre_adam_update import lora_pre_adam_update_
from lit_lowrank.optim.lora_pre_base import StateBytes
from lit_lowrank.optim.lora_pre_muon import LoRAPreMuon
from lit_lowrank.optim.lora_pre_muon_update import lora_pre_muon_update_, newton_schulz_orthogonalize

__all__ = [
    "LoRAPreAdamW",
    "LoRAPreMuon",
    "StateBytes",
    "lora_pre_adam_update_",
    "lora_pre_muon_update_",
    "lowrank_param_groups",
    "newton_schulz_orthogonalize",
    "param_group_names",
]
