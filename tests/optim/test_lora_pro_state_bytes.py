"""LoRAPro.state_bytes(): exact bytes of its state tensors per group, against an independent count and the formulas."""
import pytest
import torch
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.callbacks.optimizer_state import optimizer_state_bytes
from lit_lowrank.optim import LoRAPro, StateBytes

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)

COUNTERS = 2 * 4  # 0-d float32 step and skipped_steps in each parameter's state


def trained(mode, dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    inject_lora(net, LoRAConfig(r=2, target_modules=["0", "2"], modules_to_save=["4"]))
    optimizer = LoRAPro(net, lr=1e-2, mode=mode)
    net(torch.randn(8, 6, dtype=dtype)).square().mean().backward()
    optimizer.step()
    return net, optimizer


def counted(optimizer):
    """The state tensors' bytes per group, counted from the tensors themselves."""
    return tuple(sum(value.numel() * value.element_size() for param in group["params"]
                     for value in optimizer.state.get(param, {}).values() if isinstance(value, torch.Tensor))
                 for group in optimizer.param_groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_state_bytes_count_every_state_tensor_per_group(mode, dtype):
    net, optimizer = trained(mode, dtype)
    per_group = counted(optimizer)
    assert optimizer.state_bytes() == StateBytes(total=sum(per_group), per_group=per_group, factors=0,
                                                 dense=sum(per_group))
    assert optimizer_state_bytes(optimizer) == sum(per_group)  # what OptimizerStateMonitor logs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_equal_the_formulas(dtype):
    # fp32 moments whatever the parameter dtype. Adapters: layer 0 is 5 x 6, layer 2 is 4 x 5, r = 2.
    head = 4 * 3 + 3  # modules_to_save: weight and bias, AdamW in the second group
    others = 2 * 4 * head + 2 * COUNTERS
    factors = 2 * 6 + 5 * 2 + 2 * 5 + 4 * 2  # A (r x n) and B (m x r) of both adapters
    _, efficient = trained("efficient", dtype)
    assert efficient.state_bytes().per_group == (2 * 4 * factors + 4 * COUNTERS, others)
    _, full = trained("full", dtype)  # m x n moments and the counters in lora_A's state, lora_B's state empty
    assert full.state_bytes().per_group == (2 * 4 * (5 * 6 + 4 * 5) + 2 * COUNTERS, others)


def test_state_bytes_before_the_first_step_are_zero():
    net = inject_lora(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
    assert LoRAPro(net).state_bytes() == StateBytes(total=0, per_group=(0,), factors=0, dense=0)
