"""DoRA (weight-decomposed LoRA, Liu et al. 2024) as PEFT computes it: ``LoRAConfig(dora=True)`` / ``use_dora=True``.

The adapted weight is split into a direction and a trainable magnitude per output unit::

    W' = m * (W + s B A) / ||W + s B A||        (the norm of each output unit's weight row: dim=1 of out x in)

``m`` (``lora_magnitude_vector``, PEFT's key on disk too) starts at ``||W + s B A||``, so training starts at ``W``.
As in PEFT (and section 4.3 of the paper) the norm is treated as a constant: it is detached, and so is ``B A``
inside it. The forward is PEFT's ``DoraLinearLayer.forward`` term for term, dropout included: with dropout active
the base weight's share is recomputed from the dropped-out input, which PEFT does and the formula above hides.
LoRA-Pro refuses DoRA adapters (``use_dora = True``): its closed form is derived for ``W + s B A`` only.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lit_lowrank.adapters.lora import LoRALinear


class DoRALinear(LoRALinear):
    """A frozen ``nn.Linear`` / ``Conv1D`` with a DoRA adapter: ``lora_A``, ``lora_B`` and ``lora_magnitude_vector``.

    Example:
        >>> layer = DoRALinear(nn.Linear(8, 4), r=2, alpha=4.0)
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(layer(x), layer.base_layer(x), atol=1e-6)  # B = 0 and m = ||W||: the output is unchanged
        True
        >>> layer.lora_magnitude_vector.shape, layer.use_dora
        (torch.Size([4]), True)
    """

    #: Read by optimizers that only handle plain LoRA pairs (LoRA-Pro refuses such modules).
    use_dora = True

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        if not base_layer.weight.is_floating_point():
            raise ValueError(f"DoRA needs the dense base weight (its row norms), and this "
                             f"{type(base_layer).__name__} holds a {base_layer.weight.dtype} (quantized) one. HINT: "
                             "load the base unquantized, or use plain LoRA (dora=False) on a quantized base.")
        super().__init__(base_layer, r, alpha, dropout, rslora)
        self.lora_magnitude_vector = nn.Parameter(self._initial_magnitude())
        # m / ||W + s B A|| of the unmerged weight, kept from merge() for unmerge(); a buffer so that it follows
        # .to(device), not persistent: a state dict never holds it
        self.register_buffer("_merged_factor", None, persistent=False)

    def reset_lora_parameters(self, init: str = "default") -> None:
        """Re-initialise A and B, then the magnitude to ``||W + s B A||`` (PEFT computes it after the init too)."""
        super().reset_lora_parameters(init)
        if "lora_magnitude_vector" in self._parameters:  # not yet during LoRAAdapter.__init__
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self._initial_magnitude())

    @torch.no_grad()
    def _initial_magnitude(self) -> torch.Tensor:
        weight = self.base_weight()
        lora_weight = self.lora_B @ self.lora_A
        return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).to(weight.dtype)

    def base_weight(self) -> torch.Tensor:
        """The base weight as out x in (``Conv1D`` stores it transposed)."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def weight_norm(self, dtype: torch.dtype) -> torch.Tensor:
        """``||W + s B A||`` per output unit, in ``dtype``, detached (no gradient flows through the norm)."""
        lora_weight = (self.lora_B @ self.lora_A).detach().to(dtype)
        weight = self.base_weight().to(dtype)
        return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).to(dtype).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        x = x.to(self.lora_A.dtype)
        factor = (self.lora_magnitude_vector / self.weight_norm(x.dtype)).view(1, -1)
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            x = self.lora_dropout(x)
            base_result = F.linear(x, self.base_weight().to(x.dtype))
        else:  # the base layer's own output, without its bias
            bias = self.base_layer.bias
            base_result = result if bias is None else result - bias
        lora_result = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return (result + (factor - 1) * base_result + factor * lora_result * self.scaling).to(result.dtype)

    def merge(self) -> None:
        """Replace the base weight by ``m * (W + s B A) / ||W + s B A||`` (formed in fp32, rounded once)."""
        with torch.no_grad():
            weight = self.base_layer.weight
            merged, self._merged_factor = dora_merged_weight(weight, self.lora_A, self.lora_B,
                                                             self.lora_magnitude_vector, self.scaling,
                                                             self.fan_in_fan_out)
            weight.copy_(merged.to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """``W = W' / (m / ||W + s B A||) - s B A`` with the factor of the merge (the norm of the unmerged weight)."""
        if self._merged_factor is None:
            raise ValueError("this DoRA adapter was not merged by merge(); nothing to unmerge")
        with torch.no_grad():
            weight = self.base_layer.weight
            rows = weight.float().T if self.fan_in_fan_out else weight.float()
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            base = rows / self._merged_factor.view(-1, 1) - delta
            weight.copy_((base.T if self.fan_in_fan_out else base).to(weight.dtype))
        self._merged_factor = None
        self.merged = False

    @contextmanager
    def replacing_factors(self) -> Iterator[None]:
        """Replace ``lora_A``, ``lora_B`` or ``lora_magnitude_vector`` inside; a merged layer is unmerged for the
        block and merged again after it (DoRA's merge is not additive, so this rounds twice in a low-precision base).

        Example:
            >>> layer = DoRALinear(nn.Linear(4, 4), r=2, alpha=2.0)
            >>> layer.merge()
            >>> with layer.replacing_factors():
            ...     _ = nn.init.normal_(layer.lora_B)
            >>> x = torch.randn(3, 4)
            >>> merged = layer(x)
            >>> layer.unmerge()
            >>> torch.allclose(layer(x), merged, atol=1e-5)
            True
        """
        if not self.merged:
            yield
            return
        self.unmerge()
        try:
            yield
        finally:
            self.merge()

    def _base_deltas(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise TypeError("a DoRA weight is not the base weight plus a delta; use merge() / dora_merged_weight()")


def dora_merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor,
                       scaling: float, fan_in_fan_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m / ||W + s B A|| * (W + s B A), m / ||W + s B A||)`` in fp32, the weight in ``weight``'s layout
    (``fan_in_fan_out``: stored in x out, as GPT-2's ``Conv1D``).

    Example:
        >>> W, A, B = torch.randn(4, 6), torch.randn(2, 6), torch.randn(4, 2)
        >>> merged, factor = dora_merged_weight(W, A, B, magnitude=torch.full((4,), 3.0), scaling=0.5)
        >>> torch.allclose(merged.norm(dim=1), torch.full((4,), 3.0))  # each output row has norm m
        True
    """
    rows = weight.float().T if fan_in_fan_out else weight.float()
    combined = rows + (lora_B.float() @ lora_A.float()) * scaling
    factor = magnitude.float() / torch.linalg.norm(combined, dim=1)
    merged = factor.view(-1, 1) * combined
    return (merged.T if fan_in_fan_out else merged), factor
