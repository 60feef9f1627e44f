"""Structure (--exist/--observed): flags, flatten/unflatten, per-tensor options."""
import json

import pytest
import torch

from vcdm.data.structure import Structure, StructureError

SHAPES = {"image": (3, 4, 4), "embedding": (5,), "label": (2,)}


def _tensors(b=3):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(b, *s, generator=g) for k, s in SHAPES.items()}


@pytest.mark.parametrize("exist,observed,latent,obs", [
    ("1,1,0", "0,1,0", ("image",), ("embedding",)),
    ("0,1,1", "0,0,1", ("embedding",), ("label",)),
    ("0,1,0", "0,0,0", ("embedding",), ()),
    ("1,1,1", "0,1,1", ("image",), ("embedding", "label")),
    ("1,1,1", "1,0,0", ("embedding", "label"), ("image",)),
])
def test_flatten_unflatten_identity(exist, observed, latent, obs):
    s = Structure.from_flags(SHAPES, exist, observed)
    assert s.latent_names == latent and s.observed_names == obs
    t = _tensors()
    x = s.flatten_latent(t)
    assert x.shape == (3, sum(s.numel(n) for n in latent)) == (3, s.latent_dim)
    back = s.unflatten_latent(x)
    assert set(back) == set(latent) and all(torch.equal(back[n], t[n]) for n in latent)
    y = s.flatten_observed(t)
    if obs:
        assert y.shape == (3, s.observed_dim)
        assert all(torch.equal(v, t[n]) for n, v in s.unflatten_observed(y).items())
        # concatenation follows the data-class order
        assert torch.equal(y[:, : s.numel(obs[0])], t[obs[0]].reshape(3, -1))
    else:
        assert y is None and s.observed_dim == 0
    assert Structure.from_dict(json.loads(json.dumps(s.to_dict()))) == s


@pytest.mark.parametrize("exist,observed,message", [
    ("1,1", "0,1,0", "--exist"),
    ("1,1,0", "0,1", "--observed"),
    ("1,0,0", "0,1,0", "observed but --exist marks it as absent"),
    ("1,1,0", "1,1,0", "nothing left to generate"),
    ("1,x,0", "0,0,0", "0/1"),
    ("1,2,0", "0,0,0", "0/1"),
])
def test_bad_flags_give_clear_errors(exist, observed, message):
    with pytest.raises(StructureError, match=message):
        Structure.from_flags(SHAPES, exist, observed)


def test_flatten_checks_shapes_and_presence():
    s = Structure.from_flags(SHAPES, "1,1,0", "0,1,0")
    t = _tensors()
    with pytest.raises(StructureError, match="missing tensor 'embedding'"):
        s.flatten_observed({"image": t["image"]})
    with pytest.raises(StructureError, match="per-sample shape"):
        s.flatten_latent({"image": t["image"][:, :2]})
    with pytest.raises(StructureError, match="values per sample"):
        s.unflatten_latent(torch.zeros(3, 7))


def test_per_tensor_values_follow_seed_indexing():
    s = Structure.from_flags(SHAPES, "1,1,0", "0,1,0")
    assert s.tensor_values("0.5", "--noise_mult", 1.0) == (0.5, 0.5, 0.5)
    assert s.tensor_values("1,2,3", "--noise_mult", 1.0) == (1.0, 2.0, 3.0)
    v = s.per_tensor("2,3,4", "--noise_mult", 1.0)
    assert v.shape == (48,) and torch.all(v == 2)
    with pytest.raises(StructureError, match="--noise_mult"):
        s.tensor_values("1,2,3,4", "--noise_mult", 1.0)
