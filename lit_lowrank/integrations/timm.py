"""LoRA-Pre in timm's optimizer factory: ``create_optimizer_v2(model, "lorapreadamw")`` after one registration.

timm splits the name it is given at underscores and keeps the last part (``lookahead_adamw`` is Lookahead around
``adamw``), so a name like ``lora_pre_adamw`` would silently build timm's plain AdamW: the names here have none.
"""
from __future__ import annotations

import inspect
from typing import Any

from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon

#: The names :func:`register_timm_optimizers` adds to timm's registry.
TIMM_OPTIMIZERS = ("lorapreadamw", "lorapremuon")


def timm_param_groups(params: Any) -> Any:
    """timm's param groups in LoRA-Pre's terms: a group timm marks ``use_fallback`` (its ``fallback_list`` and
    ``fallback_no_weight_decay`` options, as for timm's Muon) becomes an AdamW group (``lowrank=False``); in the
    others every 2-D tensor gets low-rank state and the rest AdamW. Tensors rather than groups pass unchanged.

    Example:
        >>> import torch
        >>> weight, bias = torch.nn.Parameter(torch.zeros(3, 8)), torch.nn.Parameter(torch.zeros(3))
        >>> groups = timm_param_groups([{"params": [weight], "weight_decay": 0.05},
        ...                             {"params": [bias], "weight_decay": 0.0, "use_fallback": True}])
        >>> [(group["weight_decay"], group.get("lowrank")) for group in groups]
        [(0.05, None), (0.0, False)]
    """
    if not _are_groups(params):
        return params
    groups = []
    for group in params:
        group = dict(group)
        if group.pop("use_fallback", False):
            group["lowrank"] = False
        groups.append(group)
    return groups


def _are_groups(params: Any) -> bool:
    return isinstance(params, (list, tuple)) and all(isinstance(group, dict) for group in params)


def _check_ranks(groups: Any, optimizer_class: type, options: dict[str, Any]) -> None:
    """The optimizer's own full-rank error names the tensor by position and suggests lowrank_param_groups, which a
    timm user does not call: say it in timm's terms instead."""
    if not _are_groups(groups):
        return
    defaults = {name: parameter.default for name, parameter in inspect.signature(optimizer_class).parameters.items()}
    for group in groups:
        rank = group.get("rank", options.get("rank", defaults["rank"]))
        policy = group.get("full_rank", options.get("full_rank", defaults["full_rank"]))
        if group.get("lowrank", True) is False or policy != "error":
            continue
        for param in group["params"]:
            if param.ndim == 2 and rank >= min(param.shape):
                rows, columns = param.shape
                raise ValueError(
                    f"{optimizer_class.__name__} from timm: a {rows} x {columns} matrix (a classifier head?) is too "
                    f"small for rank {rank}: low-rank state would not save memory. HINT: keep it on AdamW with "
                    "create_optimizer_v2(..., fallback_list=['head.*']) (fnmatch patterns of parameter names, as for "
                    f"timm's Muon), lower rank= below {min(rows, columns)}, or pass full_rank='dense'.")


def _timm_factory(optimizer_class: type):
    def build(params: Any, **options: Any):
        groups = timm_param_groups(params)
        _check_ranks(groups, optimizer_class, options)
        return optimizer_class(groups, **options)

    build.__name__ = build.__qualname__ = f"timm_{optimizer_class.__name__}"
    build.__doc__ = f"{optimizer_class.__name__} from timm's param groups (see :func:`timm_param_groups`)."
    return build


#: What timm calls for each registered name: ``factory(params, **options)``.
TIMM_FACTORIES = {"lorapreadamw": _timm_factory(LoRAPreAdamW), "lorapremuon": _timm_factory(LoRAPreMuon)}


def register_timm_optimizers() -> tuple[str, ...]:
    """Add ``lorapreadamw`` and ``lorapremuon`` to timm's optimizer registry, for ``timm.optim.create_optimizer_v2``
    (and timm's ``train.py --opt``). Calling it again changes nothing. Returns the names.

    timm builds the param groups (weight decay off for 1-D tensors and the model's ``no_weight_decay()``); every
    2-D tensor gets low-rank state, the others AdamW; ``fallback_list=["head.*"]`` moves the matching tensors to
    AdamW, as for timm's Muon. Other keyword arguments (``rank``, ``scale``, ``seed``, ...) go to the optimizer;
    ``lorapremuon`` takes timm's ``momentum`` (0.9 unless given, as timm's Muon does).

    Example:
        >>> import timm, torch
        >>> from timm.optim import create_optimizer_v2
        >>> register_timm_optimizers()
        ('lorapreadamw', 'lorapremuon')
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
        ...                           embed_dim=32, depth=1, num_heads=2, num_classes=4)
        >>> optimizer = create_optimizer_v2(model, "lorapreadamw", lr=1e-3, weight_decay=0.05, rank=4,
        ...                                 fallback_list=["head.*"])
        >>> model(torch.randn(2, 3, 32, 32)).sum().backward()
        >>> optimizer.step()
        >>> type(optimizer).__name__, optimizer.state_bytes().factors > 0
        ('LoRAPreAdamW', True)
    """
    try:
        from timm.optim import OptimInfo
        from timm.optim._optim_factory import default_registry
    except ImportError as error:
        raise ImportError("register_timm_optimizers needs timm's optimizer registry (timm.optim.OptimInfo; "
                          "tested with timm 1.0.31). HINT: pip install -U timm") from error
    infos = [
        OptimInfo(name="lorapreadamw", opt_class=TIMM_FACTORIES["lorapreadamw"], has_betas=True,
                  description="LoRA-Pre Adam (lit_lowrank): AdamW with low-rank factored moments of 2-D weights"),
        OptimInfo(name="lorapremuon", opt_class=TIMM_FACTORIES["lorapremuon"], has_eps=False, has_momentum=True,
                  description="LoRA-Pre Muon (lit_lowrank): Muon with a low-rank factored momentum, AdamW elsewhere"),
    ]
    for info in infos:
        try:
            registered = default_registry.get_optimizer_info(info.name).opt_class
        except ValueError:
            registered = None
        if registered is not info.opt_class:  # timm logs a warning for each re-registration
            default_registry.register(info)
    return TIMM_OPTIMIZERS
