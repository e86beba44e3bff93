"""The two pieces a resume restores, without a Trainer: the training loader's position and the RNG states."""
import random

import numpy as np
import pytest
import torch
from torch.utils.data import SequentialSampler

from lit_lowrank.data.common import EpochShuffleSampler, ResumableLoader
from lit_lowrank.tasks.rng_state import collect_rng_states, restore_rng_states


def loader(num_workers: int = 0) -> ResumableLoader:
    return ResumableLoader(list(range(10)), batch_size=4, sampler=EpochShuffleSampler(10, seed=3),
                           num_workers=num_workers, generator=torch.Generator().manual_seed(3))


def order(batches) -> list:
    return [i for batch in batches for i in batch.tolist()]


def test_a_loader_resumed_mid_epoch_goes_on_with_the_next_unseen_batch():
    straight = loader()
    straight.sampler.set_epoch(1)
    full = order(straight)
    first = loader(num_workers=1)  # the worker draws indices ahead: the position counts batches handed out
    first.sampler.set_epoch(1)
    batches = iter(first)
    seen = order([next(batches)])
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 4}
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # Lightning's call, same epoch: the position stays
    assert seen + order(resumed) == full
    assert resumed.state_dict() == {"epoch": 1, "position": 10}
    assert order(resumed) == full  # only the first pass skips


def test_a_loader_saved_at_the_end_of_an_epoch_starts_the_next_one():
    straight = loader()
    order(straight)
    straight.sampler.set_epoch(1)
    resumed = loader()
    resumed.load_state_dict({"epoch": 0, "position": 10})
    assert (resumed.sampler.epoch, resumed.sampler.start) == (1, 0)
    assert order(resumed) == order(straight)


def test_a_loader_that_cannot_skip_says_so_when_resumed_mid_epoch():
    # Under DDP Lightning swaps in a distributed sampler; any foreign sampler behaves the same here.
    foreign = ResumableLoader(list(range(10)), batch_size=4, sampler=SequentialSampler(range(10)))
    foreign.load_state_dict({"epoch": 0, "position": 10})  # epoch end: nothing to skip, no warning
    with pytest.warns(UserWarning, match="cannot skip"):
        foreign.load_state_dict({"epoch": 0, "position": 4})


def test_rng_states_round_trip():
    states = collect_rng_states()
    drawn = torch.rand(3), np.random.rand(3), random.random()
    restore_rng_states(states)
    again = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(drawn[0], again[0]) and np.array_equal(drawn[1], again[1]) and drawn[2] == again[2]
