"""Writes tests/optim/data/lora_pre_before_batching.pt with the per-matrix LoRA-Pre code of commit e4a330b:

    git worktree add /tmp/old e4a330b && cd /tmp/old && PYTHONPATH=. python /path/to/this/script.py OUT.pt

Parameters and optimizer state after 3 steps, the next 2 gradients, and the parameters that code reached with them.
"""
import copy
import sys

import torch
from torch import nn

from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 24), nn.Linear(24, 24), nn.Linear(24, 16))

out = {}
for name, make in (("adam", lambda m: LoRAPreAdamW(m, lr=1e-2, rank=4, seed=0, weight_decay=0.01)),
                   ("muon", lambda m: LoRAPreMuon(m, lr=2e-2, rank=4, seed=0, weight_decay=0.01))):
    net = model()
    optimizer = make(net)
    generator = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=generator) for p in net.parameters()] for _ in range(5)]
    for step in range(5):
        if step == 3:
            out[name] = {"params": [p.detach().clone() for p in net.parameters()],
                         "optimizer": copy.deepcopy(optimizer.state_dict()), "grads": grads[3:]}
        for p, g in zip(net.parameters(), grads[step]):
            p.grad = g.clone()
        optimizer.step()
    out[name]["expected"] = [p.detach().clone() for p in net.parameters()]
torch.save(out, sys.argv[1])
