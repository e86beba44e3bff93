"""Plain-tensor views of FSDP2 (DTensor) parameters, for optimizers whose math is not element-wise.

Under ``fully_shard`` every parameter, gradient and state tensor is a DTensor holding one shard of rows.
Element-wise updates can run on the local shards as they are; products that mix rows (Gram matrices,
``B^T g``) need either the full small tensor (gather) or a sum over ranks (all-reduce). These helpers
are the only place that knows about DTensor; on ordinary tensors each is the identity.

Example:
    >>> import torch
    >>> x = torch.arange(6.0).view(3, 2)
    >>> full(x) is x and local(x) is x and local_part(x * 2, like=x).equal(x * 2)
    True
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor, Shard, distribute_tensor = (), None, None


def is_sharded(obj: object) -> bool:
    """Whether ``obj`` is split over ranks: a DTensor; a module holding FSDP-wrapped submodules; a Lightning
    ``Trainer`` whose strategy shards (FSDP or ModelParallel) over more than one process. Anything else: False."""
    if isinstance(obj, torch.Tensor):
        return isinstance(obj, DTensor)
    if isinstance(obj, torch.nn.Module):
        return any(type(module).__name__.startswith("FSDP") for module in obj.modules())
    strategy = getattr(obj, "strategy", None)
    if strategy is None:
        return False
    name = type(strategy).__name__
    return obj.world_size > 1 and ("FSDP" in name or "ModelParallel" in name)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather for a DTensor shard; a collective: call on all ranks)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard as a plain tensor sharing storage with the DTensor (in-place updates reach it)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def local_part(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The rows of a full ``value`` that this rank's shard of ``like`` holds (no communication)."""
    if not is_sharded(like):
        return value
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None).to_local()


def process_group(tensors: Iterable[torch.Tensor]) -> dist.ProcessGroup | None:
    """The group over which the first sharded tensor is split, or None when nothing is sharded."""
    for tensor in tensors:
        if is_sharded(tensor):
            mesh = tensor.device_mesh
            if mesh.ndim != 1:
                raise NotImplementedError("LoRA-Pro/LoRA-Pre support FSDP2 on a 1-D data-parallel mesh only")
            return mesh.get_group()
    return None


def all_reduce_(value: torch.Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or ``op``) ``value`` over ``group`` in place; nothing to do without a group."""
    if group is not None:
        dist.all_reduce(value, op=op, group=group)
    return value


class RowShards:
    """How an FSDP2 parameter is split into row blocks over a 1-D mesh, with the two collectives a
    low-rank update needs: a sum over ranks of row-mixing products (``B^T g``, ``B^T B``, r x q or r x r) and,
    for Muon's orthogonalisation only, the full matrix from its row blocks. State that is split like the
    parameter (``p x k``) is created here with only this rank's rows allocated.

    Example (single process, nothing sharded):
        >>> RowShards.of(torch.zeros(4, 3)) is None
        True
    """

    def __init__(self, param: DTensor) -> None:
        if tuple(param.placements) != (Shard(0),):
            raise NotImplementedError(
                f"low-rank optimizer state supports parameters sharded by rows (FSDP2's Shard(0)), got placements "
                f"{param.placements}. HINT: use fully_shard's default placement."
            )
        self.param = param
        self.group = process_group([param])

    @classmethod
    def of(cls, param: torch.Tensor) -> RowShards | None:
        return cls(param) if is_sharded(param) else None

    def sum_(self, value: torch.Tensor) -> torch.Tensor:
        return all_reduce_(value, self.group)

    def rows_of(self, value: torch.Tensor) -> DTensor:
        """A full ``p x k`` tensor as a DTensor split like the parameter (this rank keeps its rows)."""
        return distribute_tensor(value, self.param.device_mesh, self.param.placements, src_data_rank=None)

    def sum_parts_(self, *parts: torch.Tensor) -> list[torch.Tensor]:
        """Sum several partial products over ranks in one all-reduce (packed along their last dimension)."""
        packed = self.sum_(torch.cat(parts, dim=-1))
        return list(packed.split([part.shape[-1] for part in parts], dim=-1))

    def row_range(self) -> tuple[int, int]:
        """This rank's rows ``[start, stop)`` of the parameter, without communication.

        Shard(0) splits like ``torch.chunk``: blocks of ``ceil(p / world)`` rows in mesh order, so the last ranks
        may hold fewer rows or none.
        """
        rows, world = self.param.shape[0], self.param.device_mesh.size()
        block = -(-rows // world)
        start = min(self.param.device_mesh.get_local_rank() * block, rows)
        stop = min(start + block, rows)
        held = local(self.param).shape[0]
        if stop - start != held:  # the rows of the moments must be those of the parameter, or updates mix rows
            raise NotImplementedError(f"expected {stop - start} rows of {rows} on this rank (torch.chunk split), "
                                      f"the parameter shard holds {held}")
        return start, stop

    def columns_of(self, stack_t: torch.Tensor) -> torch.Tensor:
        """This rank's columns of transposed full factors ``(..., k, p)`` (its rows of ``U`` or ``B``): a view."""
        start, stop = self.row_range()
        return stack_t[..., start:stop]

    def zeros(self, columns: int, dtype: torch.dtype) -> DTensor:
        """A ``p x columns`` DTensor of zeros split like the parameter; each rank allocates only its rows."""
        start, stop = self.row_range()
        return self._whole(torch.zeros((stop - start, columns), dtype=dtype, device=local(self.param).device))

    def gather(self, local_rows: torch.Tensor) -> torch.Tensor:
        """The full ``p x k`` matrix from every rank's row block (an all-gather)."""
        return self._whole(local_rows).full_tensor()

    def _whole(self, local_rows: torch.Tensor) -> DTensor:
        """Every rank's row block as one ``p x k`` DTensor split like the parameter (no communication)."""
        shape = (self.param.shape[0], local_rows.shape[1])
        return DTensor.from_local(local_rows, self.param.device_mesh, self.param.placements, run_check=False,
                                  shape=torch.Size(shape), stride=(shape[1], 1))

    def local_rows(self, value: torch.Tensor) -> torch.Tensor:
        return self.rows_of(value).to_local()
