"""LoRA-Pro's efficient-mode gradient rewrite in front of whatever optimizer a LightningModule uses."""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lit_lowrank.optim import LoRAPro, apply_lora_pro_
from lit_lowrank.optim.lora_pro.pairs import adapter_pairs


class LoRAProGradients(Callback):
    """Replace each adapter's (grad A, grad B) by LoRA-Pro's closed-form pair before every optimizer step.

    Lightning calls ``on_before_optimizer_step`` after AMP has unscaled the gradients and before gradient
    clipping, so the rewrite sees true gradients and clipping sees the rewritten ones. Works in front of SGD,
    AdamW, 8-bit optimizers...; not together with the ``LoRAPro`` optimizer, which rewrites them itself.
    The adapters are lit_lowrank's (``inject_lora``, the ``LoRAAdapters`` callback) or PEFT's LoRA layers
    (``peft.get_peft_model``); adapters LoRA-Pro cannot update (DoRA, several active PEFT adapters) stop the fit
    with an error, and a module without trainable adapters gets a warning, once: its training is plain training.

    Args:
        damping: relative eigenvalue floor of the Gram-matrix inverses (see ``lora_pro_gradients``).

    Example:
        >>> import torch
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> net = inject_lora(torch.nn.Sequential(torch.nn.Linear(6, 6)), LoRAConfig(r=2, target_modules=["0"]))
        >>> net(torch.randn(4, 6)).sum().backward()
        >>> raw = net[0].lora_B.grad.clone()
        >>> LoRAProGradients().on_before_optimizer_step(None, net, torch.optim.SGD(net.parameters(), lr=0.1))
        >>> torch.allclose(net[0].lora_B.grad, raw)  # rewritten: (1/s^2) g_B (A A^T)^-1 when B = 0
        False
    """

    def __init__(self, damping: float = 1e-8) -> None:
        self.damping = damping
        self._warned = False

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if isinstance(optimizer, LoRAPro):
            raise ValueError("LoRAProGradients would rewrite the gradients a second time: the LoRAPro optimizer "
                             "already does it. HINT: drop the callback, or use it with a plain optimizer.")
        rewritten = apply_lora_pro_(pl_module, damping=self.damping)
        if not rewritten and not self._warned and not adapter_pairs(pl_module):
            self._warned = True
            rank_zero_warn(f"LoRAProGradients found no trainable LoRA adapters in {type(pl_module).__name__}, so it "
                           "leaves the gradients as they are. HINT: add adapters before the first step (the "
                           "LoRAAdapters callback, inject_lora or peft.get_peft_model) or drop the callback.")
