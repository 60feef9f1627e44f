"""--arch dalle2: the original release's prior network, checked against numbers vendored from its code.

tests/data/dalle2-keys.json: the release's state-dict keys/shapes and parameter count at full size.
tests/data/dalle2-golden.json: its denoiser outputs (EDMPrecond over DALLE2CLIPModel) for small
networks whose weights follow `seeded_weights`, on seeded inputs. Both were produced by running the
release's own code from a scratch clone; nothing of that code is here.
"""
import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from edm_fakes import Persistent, SeedStructure, payload_src

from vcdm.checkpoints import CheckpointConfig, load_checkpoint, save_checkpoint
from vcdm.cli.main import cli
from vcdm.data.structure import Structure
from vcdm.nets import build_network
from vcdm.nets.dalle2 import DALLE2Prior, RelPosBias, Rotary
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import preset

DATA = Path(__file__).parent / "data"
KEYS = json.loads((DATA / "dalle2-keys.json").read_text())
GOLDEN = json.loads((DATA / "dalle2-golden.json").read_text())


def seeded_weights(net: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The recipe the golden outputs used: in sorted key order, gains g ~ 1 + 0.1 N, matrices ~ N / sqrt(fan_in),
    other tensors ~ 0.5 N; the rotary frequencies keep their fixed values."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in sorted(net.state_dict().items()):
        if key.endswith("rotary_emb.freqs"):
            state[key] = value.clone()
            continue
        noise = torch.randn(value.shape, generator=g)
        if key.endswith(".g"):
            state[key] = 1 + 0.1 * noise
        elif noise.ndim == 2:
            state[key] = noise * value.shape[-1] ** -0.5
        else:
            state[key] = 0.5 * noise
    return state


def golden_inputs(case: dict, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case["batch"], case["embed_dim"], generator=g)
    cond = torch.randn(case["batch"], case["cond_dim"], generator=g) if case["cond_dim"] else None
    aug = torch.randn(case["batch"], case["augment_dim"], generator=g) if case["augment_dim"] else None
    return x, cond, aug


def golden_denoiser(case: dict) -> Denoiser:
    shapes = {"embedding": (case["embed_dim"],), "label": (max(case["cond_dim"], 1),)}
    flags = ("1,1", "0,1") if case["cond_dim"] else ("1,0", "0,0")
    net = DALLE2Prior(case["embed_dim"], cond_dim=case["cond_dim"], augment_dim=case["augment_dim"], **case["sizes"])
    net.load_state_dict(seeded_weights(net))
    return Denoiser(net, Structure.from_flags(shapes, *flags)).eval()


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["name"])
@pytest.mark.determinism
def test_outputs_match_the_release(case, one_thread):
    """Denoiser outputs equal the release's for the same weights (measured: 0 on the machine that made them)."""
    den = golden_denoiser(case)
    weight_sum = sum(v.double().abs().sum().item() for v in den.net.state_dict().values())
    assert weight_sum == pytest.approx(case["weight_abs_sum"], rel=1e-9)  # same weights as the release got
    x, cond, aug = golden_inputs(case)
    for run in case["runs"]:
        labels = aug if run["augment_labels"] else None
        with torch.no_grad():
            out = den(x * run["x_scale"], torch.full([x.shape[0]], run["sigma"]), cond, augment_labels=labels)
        want = torch.tensor(run["output"])
        torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5, msg=lambda m: f"sigma {run['sigma']}: {m}")


def test_golden_outputs_depend_on_every_part():
    """The comparison above can fail: a changed null key, bias, query or augment token changes the output."""
    case = next(c for c in GOLDEN["cases"] if c["cond_dim"] and c["augment_dim"])
    den = golden_denoiser(case)
    x, cond, aug = golden_inputs(case)
    sigma = torch.full([x.shape[0]], 2.0)
    original = {k: v.clone() for k, v in den.net.state_dict().items()}
    with torch.no_grad():
        base = den(x, sigma, cond, augment_labels=aug)
        assert (den(x, sigma, cond, augment_labels=None) - base).abs().max() > 1e-4
        for key in ["causal_transformer.layers.0.0.null_kv", "learned_query", "to_augment_embeds.0.bias",
                    "causal_transformer.rel_pos_bias.relative_attention_bias.weight", "to_cond_embeds.0.weight"]:
            bump = 0.1 * torch.randn(original[key].shape, generator=torch.Generator().manual_seed(3))
            den.net.load_state_dict({**original, key: original[key] + bump})
            assert (den(x, sigma, cond, augment_labels=aug) - base).abs().max() > 1e-4, key


def test_full_size_names_shapes_and_count():
    name, kwargs = preset("dalle2", resolution=0, channels=0, embed_dim=512, label_dim=0, augment_dim=9)
    with torch.device("meta"):
        net = build_network(name, kwargs)
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == KEYS["state_dict"]
    assert sum(p.numel() for p in net.parameters()) == KEYS["parameters"] == 24_791_552
    assert all(not k.endswith("freqs") for k, _ in net.named_parameters())  # never trained


def test_raw_token_ignores_a_constant_shift():
    """x enters unprojected when its size is dim, so pre-norm makes the output blind to x + c (as the release's)."""
    net = DALLE2Prior(64, dim=64, depth=2, heads=2).eval()
    x, t = torch.randn(3, 64), torch.randn(3)
    with torch.no_grad():
        torch.testing.assert_close(net(x + 5.0, t), net(x, t), atol=1e-4, rtol=1e-4)
        assert (net(2 * x, t) - net(x, t)).abs().max() > 1e-3


def test_rotary_rotates_interleaved_pairs_of_the_first_channels():
    rot = Rotary(4)  # freqs 1, 1/100: pairs (0, 1) and (2, 3); channels 4.. untouched
    t = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6) + 1
    out = rot(t)
    torch.testing.assert_close(out[0], t[0])  # position 0: no rotation
    c, s = torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))
    torch.testing.assert_close(out[1, :2], torch.stack([t[1, 0] * c - t[1, 1] * s, t[1, 1] * c + t[1, 0] * s]))
    torch.testing.assert_close(out[1, 4:], t[1, 4:])


def test_relative_position_buckets_are_exact_then_logarithmic():
    bias = RelPosBias(heads=1)
    with torch.no_grad():
        bias.relative_attention_bias.weight.copy_(torch.arange(32.0)[:, None])
    # query i, key j (key 0 is the null key): bucket max(i - j, 0), exact below 16
    want = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [2, 1, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(bias(3, torch.device("cpu"))[0], want)
    far = bias(130, torch.device("cpu"))[0]
    assert far[20, 0] == 16 + int(torch.log(torch.tensor(20 / 16)) / torch.log(torch.tensor(8.0)) * 16)
    assert far[129, 0] == 31


def test_dropout_is_ignored_with_a_warning(capsys):
    name, kwargs = preset("dalle2", resolution=0, channels=0, embed_dim=8, label_dim=0, augment_dim=0, dropout=0.1)
    assert name == "DALLE2Prior" and "dropout" not in kwargs
    assert "--dropout=0.1 is ignored" in capsys.readouterr().err
    preset("dalle2", resolution=0, channels=0, embed_dim=8, label_dim=0, augment_dim=0, dropout=0.0)
    assert capsys.readouterr().err == ""


def test_prior_checkpoints_of_the_earlier_dalle2_still_load(tmp_path):
    """Checkpoints written when --arch=dalle2 built vcdm's own prior record its class, and load as it."""
    name, kwargs = preset("prior", resolution=0, channels=0, embed_dim=16, label_dim=0, augment_dim=0)
    kwargs.update(dim=32, depth=1, heads=2, dim_head=16)
    assert name == "PriorTransformer"
    structure = Structure.from_flags({"image": (3, 8, 8), "embedding": (16,)}, "0,1", "0,0")
    den = Denoiser(build_network(name, kwargs), structure)
    config = CheckpointConfig(name, kwargs, den.config(), structure.to_dict(), training={"arch": "dalle2"})
    save_checkpoint(tmp_path / "old.safetensors", {"net": den.net.state_dict()}, config)
    loaded, _, _ = load_checkpoint(tmp_path / "old.safetensors")
    assert type(loaded.net).__name__ == "PriorTransformer"
    x = torch.randn(2, 16)
    torch.testing.assert_close(loaded(x, 1.0), den.eval()(x, 1.0))


# ------------------------------------------------------------------------------------------------
# A snapshot of the release's prior, hand-written in its pickled form (EDMPrecond persistent, the rest
# pickled by class name under the release's module/class names), imported by `vcdm import-edm`.

RELEASE_CLASSES = {"DALLE2Prior": "DALLE2CLIPModel", "CausalTransformer": "CausalTransformer",
                   "MultiQueryCosineAttention": "Attention", "LayerNorm": "LayerNorm", "RelPosBias": "RelPosBias", "SwiGLU": "SwiGLU",
                   "SinusoidalEmbedding": "SinusoidalPosEmb", "TimeMLP": "MLP"}


def _fake_class(module: str, name: str) -> type:
    cls = type(name, (), {})
    cls.__module__, cls.__qualname__ = module, name
    return cls


@pytest.fixture
def release_modules(fake_modules, monkeypatch):
    """The release's dalle2 module, rotary-embedding-torch and einops as empty classes with their names."""
    specs = {"training.networks": [], "training.networks.dalle2": list(RELEASE_CLASSES.values()),
             "rotary_embedding_torch": [], "rotary_embedding_torch.rotary_embedding_torch": ["RotaryEmbedding"],
             "einops": [], "einops.layers": [], "einops.layers.torch": ["Rearrange"],
             "einops.einops": ["TransformRecipe"]}
    classes = {}
    for module, names in specs.items():
        mod = types.ModuleType(module)
        for name in names:
            classes[name] = _fake_class(module, name)
            setattr(mod, name, classes[name])
        monkeypatch.setitem(sys.modules, module, mod)
    return classes


def release_form(module: torch.nn.Module, classes: dict, memo: dict):
    """`module` as the release pickles it: its classes renamed, the shared rotary module once, freqs a parameter."""
    if id(module) in memo:
        return memo[id(module)]
    name = type(module).__name__
    if name == "Rotary":
        obj = classes["RotaryEmbedding"]()
        obj.__dict__.update(training=False, _parameters={"freqs": torch.nn.Parameter(module.freqs, False)},
                            _buffers={"scale": None}, _modules={}, cache={3: torch.zeros(3, 32)}, use_xpos=False)
    else:
        obj = classes[RELEASE_CLASSES[name]]() if name in RELEASE_CLASSES else type(module).__new__(type(module))
        obj.__dict__.update({k: v for k, v in module.__dict__.items() if not k.startswith("_")})
        obj.__dict__.update(_parameters=dict(module._parameters), _buffers=dict(module._buffers),
                            _modules={k: release_form(v, classes, memo) for k, v in module._modules.items()
                                      if v is not None})
    memo[id(module)] = obj
    return obj


def release_prior_pickle(path, marker, classes, net: DALLE2Prior):
    s = SeedStructure()
    s.__dict__.update(exist=np.array([0, 1, 1], dtype=np.uint8), observed=np.array([0, 1], dtype=np.uint8),
                      latent=np.array([1, 0], dtype=np.uint8), names=["embedding", "label"], is_onehot=[False, False],
                      shapes=[torch.Size([net.embed_dim]), torch.Size([net.cond_dim])])
    model = release_form(net, classes, {})
    recipe = classes["TransformRecipe"]()
    recipe.__dict__.update(elementary_axes_lengths=[-999999, 1, -999999], axes_permutation=[0, 1, 2], added_axes={})
    rearrange = classes["Rearrange"]()
    rearrange.__dict__.update(training=False, _parameters={}, _buffers={}, _modules={}, pattern="b (n d) -> b n d",
                              axes_lengths={"n": 1}, _recipe=recipe)
    model.__dict__.update(structure=s, cond_dim=np.int64(net.cond_dim), dim=64, self_cond=False,
                          continuous_embedded_time=True, to_augment_embeds=None)
    model._modules["to_image_embeds"] = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity())
    model._modules["to_image_embeds"]._modules["1"] = rearrange
    kwargs = dict(structure=s, model_type="DALLE2CLIPModel", dim=64, depth=2, dim_head=64, heads=2, augment_dim=9,
                  dropout=0.13, pred_x0=[0, 1, 0], noise_mult=1, pretrained_weights=None, use_fp16=False)
    state = dict(training=False, _parameters={}, _buffers={}, _modules={"model": model}, _init_args=(),
                 _init_kwargs=kwargs, structure=s, use_fp16=False, sigma_min=0, sigma_max=float("inf"), sigma_data=0.5)
    data = dict(ema=Persistent("EDMPrecond", state, payload_src(marker)), augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.LabelledCLIPDataset", path="datasets/in.zip"))
    with open(path, "wb") as f:
        pickle.dump(data, f)


def test_import_release_prior_pickle(release_modules, marker, tmp_path):
    case = GOLDEN["cases"][0]  # embed 48 (projected), cond 10, augment 9, dim 64, depth 2, 2 heads x 64
    den = golden_denoiser(case)
    release_prior_pickle(tmp_path / "network-snapshot-000200.pkl", marker, release_modules, den.net)
    src = tmp_path / "network-snapshot-000200.pkl"
    r = CliRunner().invoke(cli, ["import-edm", str(src), str(tmp_path / "p.safetensors")])
    assert r.exit_code == 0, r.output
    assert "DALLE2CLIPModel" in r.output and "network: DALLE2Prior(embed_dim=48, cond_dim=10, augment_dim=9" in r.output
    loaded, config, _ = load_checkpoint(tmp_path / "p.safetensors")
    assert config.structure["exist"] == [0, 1, 1] and config.denoiser["pred_x0"] == [0, 1, 0]
    assert not marker.exists()
    want = Denoiser(den.net, den.structure, pred_x0=[1, 0]).eval()  # the pickle's [0, 1, 0] over (image, emb, label)
    x, cond, aug = golden_inputs(case)
    for run in case["runs"]:
        labels = aug if run["augment_labels"] else None
        sigma = torch.full([x.shape[0]], run["sigma"])
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, sigma, cond, augment_labels=labels),
                                       want(x, sigma, cond, augment_labels=labels), atol=0, rtol=0)


def test_release_network_vcdm_lacks_is_one_line(release_modules, marker, tmp_path, monkeypatch):
    gsdm = _fake_class("training.networks.gsdm", "GraphicallyStructuredModel")
    module = types.ModuleType("training.networks.gsdm")
    module.GraphicallyStructuredModel = gsdm
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = tmp_path / "gsdm.pkl"
    net = DALLE2Prior(8, dim=64, depth=1, heads=2)
    release_prior_pickle(path, marker, {**release_modules, "DALLE2CLIPModel": gsdm}, net)
    r = CliRunner().invoke(cli, ["import-edm", str(path), str(tmp_path / "g.safetensors")])
    errors = [line for line in r.output.splitlines() if "Error" in line]
    assert r.exit_code == 2 and len(errors) == 1, r.output
    assert "training.networks.gsdm.GraphicallyStructuredModel" in errors[0] and "no vcdm equivalent" in errors[0]


# ------------------------------------------------------------------------------------------------
# Prior samples (.pt) in the form the release's generate.py writes and its --load_obs_from reads.

def release_reader(folder, seeds, exist, observed):
    """What the release's generate.py does with --load_obs_from: torch.load each seed's list, stack entry
    t over the batch (None stays None), keep the existing tensors, then the observed ones."""
    unstacked = [torch.load(folder / f"{s:06d}.pt") for s in seeds]
    data = tuple(torch.stack([d[t] for d in unstacked]) if unstacked[0][t] is not None else None
                 for t in range(len(unstacked[0])))
    existing = [t for t, e in zip(data, exist) if e]
    return tuple(t for t, o in zip(existing, observed) if o)


def test_prior_samples_are_release_lists_and_older_dicts_still_read(tmp_path):
    from vcdm.generate.files import read_observed, read_tensors, write_tensors

    emb, label = torch.randn(2, 6), torch.eye(3)[:2]
    names = ("image", "embedding", "label")
    for seed in range(2):
        write_tensors(tmp_path / f"{seed:06d}.pt", {"embedding": emb[seed], "label": label[seed]}, names)
    # the release's image model on LabelledCLIPDataset, conditioned on embedding and label
    y = release_reader(tmp_path, [0, 1], exist=[1, 1, 1], observed=[0, 1, 1])
    assert torch.equal(y[0], emb) and torch.equal(y[1], label)
    image_model = Structure.from_flags({"image": (3, 8, 8), "embedding": (6,), "label": (3,)}, "1,1,1", "0,1,1")
    assert torch.equal(read_observed(tmp_path, 1, image_model)["embedding"], emb[1])
    torch.save({"embedding": emb[0]}, tmp_path / "old.pt")  # what vcdm wrote before
    assert torch.equal(read_tensors(tmp_path / "old.pt")["embedding"], emb[0])
    write_tensors(tmp_path / "plain.pt", {"embedding": emb[0]})  # names default to CLIPDataset's
    assert torch.load(tmp_path / "plain.pt")[0] is None and set(read_tensors(tmp_path / "plain.pt")) == {"embedding"}


def test_runs_recorded_before_dalle2_was_the_release_network_resume_as_prior():
    from vcdm.train.options import TrainOptions

    assert TrainOptions.from_dict({"arch": "dalle2"}).arch == "prior"  # training_options.json without "network"
    assert TrainOptions.from_dict({"arch": "dalle2", "network": "DALLE2Prior"}).arch == "dalle2"
    assert TrainOptions.from_dict({"arch": "prior", "network": "PriorTransformer"}).arch == "prior"
