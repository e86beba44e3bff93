"""LoRA-Pre: optimizers whose states for weight matrices are kept as low-rank factors.

- :class:`LoRAPreAdamW`: AdamW with both moments factored (``2 (p + q) r`` state elements per matrix).
- :class:`LoRAPreMuon`: Muon with its momentum buffer factored (``(p + q) r``).
- :func:`lowrank_param_groups`: which tensors of a model are factored (the rest get AdamW in the same optimizer).

Each optimizer steps its matrices in batches of one shape (``batch.py``: stacked factors, one batched solve per
side, one ``_foreach`` write per batch), by one step function written once: ``adam_update.py``
(:func:`lora_pre_adam_update_` for one matrix; the two passes over ``g`` come from a torch backend,
``adam_passes.py``, or the Triton kernels, ``adam_kernel.py``; the step's scalars in ``adam_scalars.py``) and
``muon_update.py`` (:func:`lora_pre_muon_update_`). What both share: ``base.py`` (param groups, skips, state,
batching), ``hyperparameters.py`` (their checks), ``factors.py`` (factor init, damped pseudo-inverses, row chunks)
and ``groups.py`` (which tensors are factored). The method as implemented: ``docs/lora-pre.md``; why it is built
this way: ``docs/design.md``.

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

from lit_lowrank.optim.lora_pre.adam import LoRAPreAdamW
from lit_lowrank.optim.lora_pre.adam_update import lora_pre_adam_update_
from lit_lowrank.optim.lora_pre.groups import lowrank_param_groups, param_group_names
from lit_lowrank.optim.lora_pre.muon import LoRAPreMuon
from lit_lowrank.optim.lora_pre.muon_update import lora_pre_muon_update_, newton_schulz_orthogonalize
from lit_lowrank.optim.state import StateBytes

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
