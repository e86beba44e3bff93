"""A block in which reading a tensor's value on the host raises: the CPU stand-in for "this step never syncs".

On an accelerator a host read (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``...) waits for the
device. On CPU tensors nothing waits, so such a read would go unnoticed; :func:`no_host_reads` turns the Python-level
ones into errors while the block runs. It cannot see reads made inside C++ (a boolean-mask index, ``nonzero``); on
CUDA, ``torch.cuda.set_sync_debug_mode("error")`` catches those (``tests/kernels`` does, natively).

:func:`host_reads_allowed` lifts the ban inside the block, for work that stands for the device itself: Triton's
interpreter runs a kernel launch on the host, reading its tensors.
"""
import contextlib

import torch

#: The Tensor methods that read values on the host.
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


class HostRead(AssertionError):
    """A tensor's value was read on the host inside :func:`no_host_reads`."""


_allowed = [0]  # depth of host_reads_allowed blocks; the ban applies at 0


@contextlib.contextmanager
def host_reads_allowed():
    _allowed[0] += 1
    try:
        yield
    finally:
        _allowed[0] -= 1


@contextlib.contextmanager
def no_host_reads():
    """Within the block each of :data:`HOST_READS` raises :class:`HostRead` (outside :func:`host_reads_allowed`)."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    own = {name: torch.Tensor.__dict__[name] for name in HOST_READS if name in torch.Tensor.__dict__}

    def guard(name, original):
        def read(self, *args, **kwargs):
            if _allowed[0]:
                return original(self, *args, **kwargs)
            raise HostRead(f"Tensor.{name} read a tensor on the host (shape {tuple(self.shape)})")

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, guard(name, original))
    try:
        yield
    finally:  # as it was: torch.Tensor's own attribute back, or the inherited one visible again
        for name in HOST_READS:
            if name in own:
                setattr(torch.Tensor, name, own[name])
            else:
                delattr(torch.Tensor, name)


class AllowedLaunch:
    """A Triton kernel whose launches (``kernel[grid](...)``) run inside :func:`host_reads_allowed`: the
    interpreter's host-side emulation of the device."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            with host_reads_allowed():
                return launch(*args, **kwargs)

        return run
