"""Triton kernels for the LoRA-Pre and LoRA-Pro optimizer steps (importable as ``lit_lowrank.kernels``).

- :mod:`~lit_lowrank.kernels.dispatch`: ``use_triton`` semantics ("auto" / True / False) and the torch
  fallback with one warning when Triton is missing or broken, and the kernels' self-check against the torch
  reference. Importing it does not import triton. The self-check's comparison (tolerances, the worst output) is
  :mod:`~lit_lowrank.kernels.output_check`.
- :mod:`~lit_lowrank.kernels.lora_pro_full`: the fused LoRA-Pro full-mode step (moments of ``g~`` and the
  projections of the Adam direction, tile by tile). Imports triton; load it through the dispatcher.
- :mod:`~lit_lowrank.kernels.lora_pre_adam`: the LoRA-Pre Adam step's p x q work in two passes (the factors'
  regression products and the parameter update from the reconstructed moments, then the second moment's
  products); the r x r pseudo-inverses stay in torch. Imports triton; load it through the dispatcher. Its
  autotuning glue and launchers live there, the ``triton.jit`` kernels and their tilings in
  :mod:`~lit_lowrank.kernels.lora_pre_adam_jit` (which it imports).
- :mod:`~lit_lowrank.kernels.batched_launch`: the host-side glue of a launch over L same-shape tensors (pointer
  tables of their addresses, the checks that they share one layout, scratch buffers), imported by
  ``lora_pre_adam``. Not a kernel module and does not import triton.

Each kernel equals a torch reference in ``lit_lowrank.optim`` to fp32 rounding and is tested against it
on CPU with ``TRITON_INTERPRET=1`` (``tests/kernels``).
"""

if __name__ == "kernels":
    # Imported as the top-level `kernels`: Python put the repository root on sys.path (`python -c`, a script or a
    # notebook started there). That name belongs to Hugging Face's kernel hub package, which transformers imports
    # (`from kernels import ...`); hand the import over to it, or fail as if this folder were not there.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.realpath(_os.path.join(_os.path.dirname(__file__), _os.pardir))
    _elsewhere = [entry for entry in _sys.path if _os.path.realpath(entry or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ folder is lit_lowrank.kernels)",
                                  name="kernels")
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # what the import statement returns once this file has run
    _spec.loader.exec_module(_module)
