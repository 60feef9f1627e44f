"""Unit tests of the training loop's parts against known answers: EMA, loss reduction, the data
sampler's sharding and shuffling, the TrainState round trip and its finiteness check, typed options."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vcdm.train.ema import EMA
from vcdm.train.options import OptimOptions, ScheduleOptions, TrainOptions
from vcdm.train.sampler import PositionSampler, ShuffledDataset
from vcdm.train.state import TrainState
from vcdm.train.step import reduce_loss


class Tiny(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.w = nn.Parameter(torch.full((3,), value))
        self.register_buffer("b", torch.zeros(2))


def test_ema_mixes_by_half_life():
    net = Tiny(0.0)
    ema = EMA(net, halflife_nimg=100)
    with torch.no_grad():
        net.w.fill_(1.0)
        net.b.fill_(7.0)
    ema.update(nimg=1000, batch=100)  # one half-life: halfway
    assert torch.allclose(ema.ema.w, torch.full((3,), 0.5)) and torch.equal(ema.ema.b, torch.full((2,), 7.0))
    ema.update(nimg=1100, batch=200)  # two half-lives: 3/4 of the remaining gap
    assert torch.allclose(ema.ema.w, torch.full((3,), 0.875))
    assert not ema.ema.w.requires_grad and net.w.requires_grad


def test_ema_half_life_ramps_up_with_images_seen():
    ema = EMA(Tiny(0.0), halflife_nimg=500_000, rampup=0.05)
    assert ema.halflife(0) == 0 and ema.beta(0, 8) == 0.0  # the first step copies the network
    assert ema.halflife(1_000_000) == 50_000 and ema.halflife(10**8) == 500_000
    assert ema.beta(1_000_000, 50_000) == pytest.approx(0.5)
    assert EMA(Tiny(0.0), halflife_nimg=500_000, rampup=None).halflife(0) == 500_000


def test_reduce_loss_means_over_the_round_or_weighs_tensors_equally():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # 2 samples; tensors of 1 and 2 elements
    assert reduce_loss(loss, [1, 2], per_rank=4, ls=2.0).item() == pytest.approx(21 / 4 * 2)
    # equally weighted, as the release: mean of tensor 1 (5/2) plus mean of tensor 2 (16/4) over this round's
    # 2 samples, not over the per-process batch of 4 (accumulation rounds each add a full mean)
    assert reduce_loss(loss, [1, 2], per_rank=4, ls=1.0, equally_weight=True).item() == pytest.approx(5 / 2 + 16 / 4)


def test_sampler_shards_a_global_batch_into_blocks():
    take = lambda s, n: [p for _, p in zip(range(n), s)]  # noqa: E731
    assert take(PositionSampler(batch=8, rank=0, world_size=2), 8) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert take(PositionSampler(batch=8, rank=1, world_size=2, start=16), 4) == [20, 21, 22, 23]
    items = [(i,) for i in range(10)]
    ds = ShuffledDataset(items, seed=3)
    epoch0 = [ds[p][1] for p in range(10)]
    assert sorted(epoch0) == list(range(10)) and epoch0 != list(range(10))
    assert all(ds[p][2] == ds[p][1] for p in range(25))  # (position, index, *item)
    assert [ds[p][1] for p in range(10, 20)] != epoch0 and ShuffledDataset(items, seed=3)[14] == ds[14]


def test_train_state_round_trip():
    def make(value: float) -> TrainState:
        net = Tiny(value)
        return TrainState(net, EMA(net, halflife_nimg=100), torch.optim.Adam(net.parameters(), lr=1e-3), frozen=["x"])

    a = make(1.0)
    a.net.w.grad = torch.ones(3)
    a.optimizer.step()
    a.ema.update(0, 100)
    a.counters.update(nimg=300, position=300, tick=2, nonfinite=1)
    torch.manual_seed(5)
    saved = a.state_dict('{"seed": 1}')
    expected = torch.rand(4)
    b = make(0.0)
    b.load_state_dict(saved)
    assert torch.equal(b.net.w, a.net.w) and torch.equal(b.ema.ema.w, a.ema.ema.w)
    assert b.optimizer.state_dict()["state"][0]["step"] == 1 and b.counters["nimg"] == 300
    assert saved["options"] == '{"seed": 1}' and saved["rng"][0]["sampler_position"] == 300
    assert b.restore_rng(rank=0, world_size=1) and torch.equal(torch.rand(4), expected)
    assert not b.restore_rng(rank=0, world_size=2)  # saved by one process
    with pytest.raises(ValueError, match="size mismatch"):
        TrainState(nn.Linear(2, 2), EMA(nn.Linear(2, 2), halflife_nimg=1), torch.optim.Adam(nn.Linear(2, 2).parameters())
                   ).load_state_dict({**saved, "net": {"weight": torch.ones(3, 3), "bias": torch.ones(2)}})


def test_optimiser_moments_count_for_finiteness():
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    state = TrainState(net, EMA(net, halflife_nimg=1.0), opt)
    assert state.finite()
    next(iter(opt.state.values()))["exp_avg_sq"][0] = float("inf")
    assert not state.finite()


def test_options_are_typed_and_grouped():
    o = TrainOptions(path="d.zip", exist=[1, 1], observed=[0, 1], lr=2e-4, duration=1.5)
    assert o.group(OptimOptions).lr == 2e-4 and o.group(ScheduleOptions).duration == 1.5
    old = {"path": "d.zip", "exist": "1,1", "observed": "0,1", "pred_x0": "1", "noise_mult": "1,2.5", "cres": "1,2",
           "world_size": 2}  # a training_options.json of an older vcdm (lists as strings; run facts)
    loaded = TrainOptions.from_dict(old)
    assert (loaded.exist, loaded.pred_x0, loaded.noise_mult, loaded.cres) == ([1, 1], [1], [1.0, 2.5], [1, 2])
    assert TrainOptions.from_dict(o.to_dict()) == o
    for name, value in (("lr", float("inf")), ("duration", float("nan")), ("lr", 0.0)):
        with pytest.raises(ValueError, match=f"--{name}"):
            TrainOptions(path="d.zip", observed=[0, 1], **{name: value}).validate()
