"""Host-side glue for launching one kernel over a batch of L separate, same-shape tensors.

A batched kernel (:mod:`lit_lowrank.kernels.lora_pre_adam`) does the work of L matrices in one launch. Operands
the caller already keeps stacked, such as the optimizer's fp32 factors, reach it as one contiguous tensor
(:func:`fp32_stack`). The model's parameters and gradients are L separate tensors, and copying them into a stack
would double the traffic of a memory-bound step, so they reach it as a *pointer table* (:func:`pointer_table`):
an (L,) int64 tensor of their addresses on the device, from which a program loads its layer's entry. The kernel
is specialised on one dtype and one stride pair per table, so :func:`pointer_batch` refuses a batch whose
members differ in either. Scratch buffers come from a caller's provider (:data:`Scratch`, the optimizer's
``Workspace.get``) or, without one, from :func:`allocate`.

A leaf that imports torch and the standard library only: nothing here needs triton, so, like
:mod:`~lit_lowrank.kernels.dispatch`, it imports where triton is missing. It is no kernel module (the dispatcher
never loads it by name); the kernel modules import it.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

__all__ = ["ALIGNMENT", "MATRIX_DTYPES", "TABLE_CACHE_SIZE", "PointerBatch", "Scratch", "allocate", "fp32_stack",
           "pointer_batch", "pointer_table"]

Scratch = Callable[[str, tuple[int, ...], torch.dtype, torch.device], torch.Tensor]
"""A buffer provider, ``(role, shape, dtype, device) -> Tensor`` (the optimizer's ``Workspace.get``)."""

#: Pointer tables kept (:func:`pointer_table`): two per same-shape group (parameters, gradients) with room for
#: gradients that move between steps; each is a few bytes per layer.
TABLE_CACHE_SIZE = 128
#: Addresses 16-byte aligned (every allocation; not every view) let Triton vectorise the loads of W and g; a kernel
#: sees that alignment for a tensor argument but not for a pointer it loads from a table, so it is passed along.
ALIGNMENT = 16
#: The dtypes a batch of matrices may have (a kernel module maps them to its Triton dtypes).
MATRIX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_tables_lock = threading.Lock()


class PointerBatch(NamedTuple):
    """L same-shape matrices as a kernel takes them."""

    table: torch.Tensor
    """Their addresses, (L,) int64 on their device (:func:`pointer_table`)."""
    dtype: torch.dtype
    """Their one dtype, one of :data:`MATRIX_DTYPES`."""
    aligned: bool
    """Whether every address is a multiple of :data:`ALIGNMENT`."""


def pointer_table(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors' addresses as an (L,) int64 tensor on their device, cached per tuple of addresses (LRU).

    Parameters never move and gradients rarely do, so a steady state builds no table. Built without a host sync:
    on CUDA copied from pinned memory, asynchronously (the caching host allocator keeps the pinned block until the
    copy is done). A cached table holds addresses only, so it stays right for whatever tensors sit at those
    addresses; it is used on the stream that built it or later on (the optimizer steps on one stream). Under CUDA
    graphs the tables must exist before capture (the warm-up steps build them).
    """
    device = tensors[0].device
    addresses = tuple(t.data_ptr() for t in tensors)
    key = (device, addresses)
    with _tables_lock:
        table = _tables.get(key)
        if table is not None:
            _tables.move_to_end(key)
            return table
    if device.type == "cuda":
        table = torch.tensor(addresses, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)
    else:
        table = torch.tensor(addresses, dtype=torch.int64, device=device)
    with _tables_lock:
        _tables[key] = table
        while len(_tables) > TABLE_CACHE_SIZE:
            _tables.popitem(last=False)
    return table


def pointer_batch(tensors: Sequence[torch.Tensor], what: str) -> PointerBatch:
    """The pointer table of L same-shape matrices, their dtype and whether all are 16-byte aligned.

    One dtype, shape, stride pair and device for all: the kernel is specialised on them, not per layer, so a
    batch that mixes them is refused (``ValueError`` naming ``what``) rather than read with the wrong layout.
    """
    first = tensors[0]
    if first.dim() != 2 or first.dtype not in MATRIX_DTYPES:
        raise ValueError(f"{what}: 2-d fp32, bf16 or fp16 matrices expected, got {first.dtype} {tuple(first.shape)}")
    layout = (first.shape, first.dtype, first.stride(), first.device)
    for tensor in tensors[1:]:
        if (tensor.shape, tensor.dtype, tensor.stride(), tensor.device) != layout:
            raise ValueError(f"{what}: one shape, dtype, stride pair and device for all, got {layout[:3]} and "
                             f"{(tensor.shape, tensor.dtype, tensor.stride())}")
    aligned = all(t.data_ptr() % ALIGNMENT == 0 for t in tensors)
    return PointerBatch(pointer_table(tensors), first.dtype, aligned)


def fp32_stack(tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """``tensor`` as the contiguous fp32 stack of ``shape`` a kernel indexes by offsets (a copy if strided).

    The kernel finds a layer's slice by arithmetic on ``shape``, so any other shape or dtype is refused
    (``ValueError`` naming ``what``) instead of being read out of bounds.
    """
    if tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
        raise ValueError(f"{what}: fp32 of shape {shape} expected, got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor.contiguous()


def allocate(role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The :data:`Scratch` provider used when a launcher is given none: a fresh, uninitialised buffer per call
    (``role`` is ignored; a caller's provider uses it to keep one buffer per role across calls)."""
    return torch.empty(shape, dtype=dtype, device=device)
