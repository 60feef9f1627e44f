"""The original release's networks and training options (issue 9): ConcatUNet/FiLM/ControlNet parity from
vendored numbers, ImageNet fine-tuning from a class-conditional ADM, conditioning dropout, and the
release's --equally_weight_tensors."""
from __future__ import annotations

import collections
import json
import math
import pickle
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from edm_fakes import GEOMETRY, Persistent, SeedStructure, edm_form, payload_src
from vcdm.cli.train import command as train_command
from vcdm.data.structure import Structure
from vcdm.diffusion.loss import EDMLoss, equally_weighted, guidance_warning
from vcdm.diffusion.sampling import sample
from vcdm.legacy import LegacyError, load_pretrained
from vcdm.nets.adm import DhariwalUNet
from vcdm.nets.concatunet import ConcatUNet
from vcdm.nets.control import ControlDhariwalUNet
from vcdm.nets.film import FilmSongUNet
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import preset, structure_preset
from vcdm.train.state import load_state

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).parent / "data"


def test_equally_weighted_is_a_per_round_mean_per_tensor():
    loss = torch.tensor([[1.0, 1.0, 3.0], [3.0, 3.0, 5.0]])
    assert equally_weighted(loss, [2, 1]).item() == 2.0 + 4.0
    # Gradient accumulation: each round contributes its own full mean (the release divides by the round's
    # batch, not by the per-process batch), so two rounds of one sample add up to twice the mean.
    rounds = equally_weighted(loss[:1], [2, 1]) + equally_weighted(loss[1:], [2, 1])
    assert rounds.item() == (1.0 + 3.0) + (3.0 + 5.0)


# ------------------------------------------------------------------------------------------------
# ImageNet path: EDM's class-conditional ADM fine-tuned on LabelledCLIPDataset's [embedding, one-hot label]

def adm_kwargs(label_dim: int) -> dict:
    return preset("adm", resolution=8, channels=3, embed_dim=0, label_dim=label_dim, augment_dim=0, cbase=64,
                  cres=[1, 1], dropout=0.0)[1]


def adm_pickle(path: Path, label_dim: int, seed: int = 0) -> DhariwalUNet:
    """An EDM-format pickle (EDMPrecond around DhariwalUNet, as EDM's ImageNet model) of a tiny random ADM."""
    torch.manual_seed(seed)
    kwargs = adm_kwargs(label_dim)
    net = DhariwalUNet(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero-initialised layers too, so every column matters
    src = payload_src(path.parent / "PAYLOAD_RAN")
    geometry = dict(img_resolution=8, img_channels=3, label_dim=label_dim, use_fp16=False)
    model_kwargs = {k: v for k, v in kwargs.items() if k not in GEOMETRY}
    state = dict(training=False, _parameters=collections.OrderedDict(), _buffers=collections.OrderedDict(),
                 _modules=collections.OrderedDict(model=edm_form(net, src, kwargs)), _init_args=(),
                 _init_kwargs=dict(geometry, model_type="DhariwalUNet", **model_kwargs),
                 sigma_min=0, sigma_max=float("inf"), sigma_data=0.5, **geometry)
    with open(path, "wb") as f:
        pickle.dump(dict(ema=Persistent("EDMPrecond", state, src), augment_pipe=None), f)
    return net.eval()


def labelled_clip_denoiser(embed_dim: int, classes: int) -> Denoiser:
    structure = Structure.from_flags({"image": (3, 8, 8), "embedding": (embed_dim,), "label": (classes,)},
                                     "1,1,1", "0,1,1")
    return Denoiser(DhariwalUNet(**adm_kwargs(embed_dim + classes)), structure).eval()


def test_class_conditional_adm_widens_map_label_as_the_release(fake_modules):
    pkl = fake_modules / "adm-cond.pkl"
    source = adm_pickle(pkl, label_dim=3)
    target = labelled_clip_denoiser(embed_dim=5, classes=3)
    report = load_pretrained(pkl, target, freeze=True)
    assert "widened map_label.weight from 3 to 8 inputs (classes at columns 5..7)" in str(report)
    wide, old = target.net.state_dict()["map_label.weight"], source.state_dict()["map_label.weight"]
    assert torch.equal(wide[:, 5:], old) and torch.count_nonzero(wide[:, :5]) == 0
    assert all(torch.equal(v, target.net.state_dict()[k]) for k, v in source.state_dict().items() if k != "map_label.weight")
    assert [n for n, p in target.net.named_parameters() if p.requires_grad] == ["map_label.weight"]
    # The fine-tuned model starts as the class-conditional one, whatever the embedding: same function.
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0.1, 1.0, 5.0, 40.0])
    onehot = torch.eye(3)[torch.tensor([0, 2, 1, 2])]
    y = torch.cat([torch.randn(4, 5, generator=g), onehot], dim=1)  # LabelledCLIPDataset: [embedding, label]
    with torch.no_grad():
        got = target.net(x, sigma.log() / 4, y)
        want = source(x, sigma.log() / 4, onehot)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()  # map_label sums over 8 vs 3 inputs (zeros)


def test_class_count_mismatch_names_both_sizes(fake_modules):
    pkl = fake_modules / "adm-cond.pkl"
    adm_pickle(pkl, label_dim=4)
    with pytest.raises(LegacyError, match="conditioned on 4 classes but the dataset has 3") as err:
        load_pretrained(pkl, labelled_clip_denoiser(embed_dim=5, classes=3))
    assert "\n" not in str(err.value)
    clip_only = Denoiser(DhariwalUNet(**adm_kwargs(5)), Structure.from_flags(
        {"image": (3, 8, 8), "embedding": (5,)}, "1,1", "0,1"))
    with pytest.raises(LegacyError, match="conditioned on 4 classes but this model observes no class label"):
        load_pretrained(pkl, clip_only)


def write_labelled_folder(dest: Path, n: int = 12, classes: int = 3, res: int = 8) -> Path:
    """A tiny labelled image folder in EDM's layout (PNG files + dataset.json with integer labels)."""
    rng = np.random.default_rng(0)
    dest.mkdir(parents=True)
    labels = []
    for i in range(n):
        img = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
        img[..., i % classes] = 230
        PIL.Image.fromarray(img).save(dest / f"img{i:08d}.png")
        labels.append([f"img{i:08d}.png", i % classes])
    (dest / "dataset.json").write_text(json.dumps({"labels": labels}))
    return dest


def train_args(data: Path, out: Path, pkl: Path) -> list[str]:
    return ["--path", str(data), "--data_class", "LabelledCLIPDataset", "--embedder", "pixel-pca", "--pca-dim", "8",
            "--exist", "1,1,1", "--observed", "0,1,1", "--arch", "adm", "--cbase", "64", "--cres", "1,1",
            "--dropout", "0", "--augment", "0", "--sample", "0", "--pretrained_weights", str(pkl),
            "--workers", "0", "--device", "cpu", "--outdir", str(out), "--seed", "1", "--batch", "4",
            "--tick", "0.004", "--duration", "0.000004", "--lr-rampup", "10000"]


def test_train_fine_tunes_class_conditional_adm_on_labelled_clip_folder(fake_modules, tmp_path):
    data = write_labelled_folder(tmp_path / "imagenet-tiny")
    pkl = tmp_path / "edm-adm-cond.pkl"
    source = adm_pickle(pkl, label_dim=3)
    out = tmp_path / "runs"
    r = CliRunner().invoke(train_command, train_args(data, out, pkl), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "widened map_label.weight from 3 to 11 inputs (classes at columns 8..10)" in r.output
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    state = load_state(sorted(run.glob("training-state-*.pt"))[-1])
    wide = state["net"]["map_label.weight"]  # one step at lr 0: still the initialisation
    assert torch.equal(wide[:, 8:], source.state_dict()["map_label.weight"]) and torch.count_nonzero(wide[:, :8]) == 0

    other = tmp_path / "edm-adm-cond5.pkl"
    adm_pickle(other, label_dim=5)
    r = CliRunner().invoke(train_command, train_args(data, tmp_path / "runs2", other))
    assert r.exit_code != 0
    (line,) = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert "conditioned on 5 classes but the dataset has 3" in line and "Traceback" not in r.output


def test_labelled_clip_conditioning_is_embedding_then_float_one_hot(tmp_path):
    """The release's LabelledCLIPDataset: y = [embedding, one-hot label] (float32, max label + 1 wide)."""
    from vcdm.data.dataset import ImageDataset
    from vcdm.train.batches import BatchMaker

    class MeanEmbedder:
        def embed(self, image):
            return image.mean(dim=(2, 3))

    data = ImageDataset(write_labelled_folder(tmp_path / "d", n=5, classes=3), use_labels=True)
    structure = Structure.from_flags({"image": (3, 8, 8), "embedding": (3,), "label": (data.label_dim,)},
                                     "1,1,1", "0,1,1")
    images, labels = (torch.stack(t) for t in zip(*(data[i] for i in range(5))))
    batch = BatchMaker(structure, torch.device("cpu"), embedder=MeanEmbedder())(torch.arange(5), images, labels)
    onehot = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=torch.float32)
    assert batch.y.dtype == torch.float32 and data.label_dim == 3
    assert torch.equal(batch.y, torch.cat([(images.float() / 127.5 - 1).mean(dim=(2, 3)), onehot], dim=1))


# ------------------------------------------------------------------------------------------------
# concatunet: numbers vendored from the release's ConcatUNet (training/networks/networks.py) run on the same
# seeded weights (`recipe`) and inputs (`concat_inputs`); see tests/data/README-release-nets.md.

CONCAT = json.loads((DATA / "release-concatunet.json").read_text())


def recipe(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded weights by parameter name (sorted): fan-in scaled normals for matrices and kernels, 1 + 0.1 N
    for normalisation scales, 0.1 N for the other vectors. Independent of construction order."""
    g = torch.Generator().manual_seed(seed)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p, r = params[name], torch.randn(params[name].shape, generator=g)
            if p.ndim >= 2:
                p.copy_(r / math.sqrt(max(1, math.prod(p.shape[1:]))))
            elif "norm" in name.rsplit(".", 2)[-2] and name.endswith(".weight"):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.1 * r)
    return net.eval()


def concat_inputs(c: dict, batch: int = 2, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    lat = sum(math.prod(s) for s, o in zip(c["shapes"], c["observed"]) if not o)
    obs = sum(math.prod(s) for s, o in zip(c["shapes"], c["observed"]) if o)
    x = torch.randn(batch, lat, generator=g)
    y = torch.randn(batch, obs, generator=g) if obs else None
    aug = torch.randn(batch, c["augment_dim"], generator=g) if c["augment_dim"] else None
    return x, y, torch.tensor([0.3, 7.0]).log() / 4, aug


def concat_net(c: dict) -> ConcatUNet:
    kwargs = {k: v for k, v in c.items() if k not in ("shapes", "observed", "emb")}
    return ConcatUNet(c["shapes"], c["observed"], emb_layer_type=c["emb"], **kwargs)


@pytest.mark.parametrize("case", list(CONCAT))
@pytest.mark.determinism
def test_concatunet_matches_the_release(case):
    entry = CONCAT[case]
    net = concat_net(entry["config"])
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == entry["keys"]  # names and shapes
    x, y, noise, aug = concat_inputs(entry["config"])
    with torch.no_grad():
        out = recipe(net)(x, noise, y, augment_labels=aug)
    want = torch.tensor(entry["output"]).reshape(out.shape)
    assert (out - want).abs().max() < 1e-5  # measured: <= 1.3e-6 against the release's code


def test_concatunet_samples_image_and_embedding_jointly():
    structure = Structure.from_flags({"image": (3, 8, 8), "embedding": (6,)}, "1,1", "0,0")
    cfg = CONCAT["joint image+embedding (shitty)"]["config"]
    net = recipe(concat_net({**cfg, "augment_dim": 0}))
    denoiser = Denoiser(net, structure).eval()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, structure.latent_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        first = sample(denoiser, noise, num_steps=4)
        moved = noise.clone()
        moved[:, :192] = torch.randn(2, 192, generator=g, dtype=torch.float64)  # other image noise, same embedding noise
        second = sample(denoiser, moved, num_steps=4)
    out = structure.unflatten_latent(first)
    assert out["image"].shape == (2, 3, 8, 8) and out["embedding"].shape == (2, 6) and first.isfinite().all()
    # One network denoises both: the embedding it generates depends on the image being generated.
    assert (structure.unflatten_latent(second)["embedding"] - out["embedding"]).abs().max() > 1e-3


def test_concatunet_refuses_what_it_cannot_model():
    with pytest.raises(ValueError, match="share one square size"):
        ConcatUNet([[3, 8, 8], [1, 16, 16]], [0, 1])
    with pytest.raises(ValueError, match="'attn' is not implemented"):
        ConcatUNet([[3, 8, 8], [6]], [0, 0], emb_layer_type="attn")


def test_train_concatunet_joint_model_and_sample_from_its_checkpoint(tmp_path):
    from vcdm.checkpoints import load_checkpoint

    data = write_labelled_folder(tmp_path / "d")
    out = tmp_path / "runs"
    args = ["--path", str(data), "--data_class", "CLIPDataset", "--embedder", "pixel-pca", "--pca-dim", "4",
            "--exist", "1,1", "--observed", "0,0", "--arch", "concatunet", "--cbase", "16", "--cres", "1,1",
            "--augment", "0", "--sample", "0", "--workers", "0", "--device", "cpu", "--outdir", str(out),
            "--seed", "1", "--batch", "4", "--tick", "0.004", "--duration", "0.000004"]
    r = CliRunner().invoke(train_command, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "Network: ConcatUNet" in r.output and "generate ['image', 'embedding']" in r.output
    (snapshot,) = out.glob("*/network-snapshot-*.safetensors")
    denoiser, config, _ = load_checkpoint(snapshot)
    assert config.net_kwargs["shapes"] == [[3, 8, 8], [4]] and config.net_kwargs["observed"] == [0, 0]
    with torch.no_grad():
        x = sample(denoiser.eval(), torch.randn(2, 3 * 64 + 4, dtype=torch.float64), num_steps=3)
    got = denoiser.structure.unflatten_latent(x)
    assert got["image"].shape == (2, 3, 8, 8) and got["embedding"].shape == (2, 4) and x.isfinite().all()


# ------------------------------------------------------------------------------------------------
# film-ddpmpp and control-adm: the release's FilmWrappedOriginalSongUNet / ControlledDhariwalUNet (after its
# add_control) on `recipe` weights; inputs batch 2 from manual_seed(5): image, then conditioning.

FILM = json.loads((DATA / "release-film.json").read_text())
CONTROL = json.loads((DATA / "release-control.json").read_text())


def film_net(c: dict) -> FilmSongUNet:
    return FilmSongUNet(8, 3, 3, **c)


def control_net(c: dict) -> ControlDhariwalUNet:
    kwargs = {k: v for k, v in c.items() if k not in ("emb", "classes")}
    return ControlDhariwalUNet(8, 3, 3, cond_dim=c["emb"] + c["classes"], class_columns=[c["emb"], c["classes"]], **kwargs)


@pytest.mark.parametrize("case", list(FILM))
@pytest.mark.determinism
def test_film_ddpmpp_matches_the_release(case):
    entry = FILM[case]
    net = recipe(film_net(entry["config"]))
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == entry["keys"]
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, entry["config"]["cond_dim"], generator=g)
    aug = torch.randn(2, 9, generator=g) if entry["config"]["augment_dim"] else None
    with torch.no_grad():
        out = net(x, torch.tensor([0.3, 7.0]).log() / 4, y, augment_labels=aug)
    assert (out.flatten() - torch.tensor(entry["output"])).abs().max() < 1e-5  # measured: <= 1.5e-6


@pytest.mark.parametrize("case", list(CONTROL))
@pytest.mark.determinism
def test_control_adm_matches_the_release(case):
    entry = CONTROL[case]
    c = entry["config"]
    net = recipe(control_net(c))
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == entry["keys"]
    g = torch.Generator().manual_seed(5)
    x, emb = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, c["emb"], generator=g)
    label = torch.eye(c["classes"])[torch.tensor([3, 998])]
    aug = torch.randn(2, 9, generator=g) if c["augment_dim"] else None
    with torch.no_grad():
        out = net(x, torch.tensor([0.3, 7.0]).log() / 4, torch.cat([emb, label], 1), augment_labels=aug)
    assert (out.flatten() - torch.tensor(entry["output"])).abs().max() < 1e-5  # measured: <= 1.3e-6



def test_control_adm_fine_tunes_from_class_conditional_adm(fake_modules):
    pkl = fake_modules / "adm-cond.pkl"
    source = adm_pickle(pkl, label_dim=3)
    structure = Structure.from_flags({"image": (3, 8, 8), "embedding": (5,), "label": (3,)}, "1,1,1", "0,1,1")
    name, kwargs = structure_preset("control-adm", structure, augment_dim=0, cbase=64, cres=[1, 1], dropout=0.0)
    assert name == "ControlDhariwalUNet" and kwargs["class_columns"] == [5, 3] and kwargs["cond_dim"] == 8
    net = ControlDhariwalUNet(**kwargs)
    report = load_pretrained(pkl, Denoiser(net, structure), freeze=False)  # the release freezes anyway
    assert "control tensors start from the pretrained blocks" in str(report)
    sd, ref = net.state_dict(), source.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert all(torch.equal(sd[k], ref[v]) for k, v in net.copied_from().items())
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("control_") for n in trainable)
    assert trainable == {n for n, _ in net.named_parameters() if n.startswith("control_")}
    # Near-zero output convolutions: the fine-tuned model starts (almost) as the class-conditional one.
    x, noise = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 2.0]).log() / 4
    onehot = torch.eye(3)[torch.tensor([1, 2])]
    with torch.no_grad():
        got, want = net(x, noise, torch.cat([torch.randn(2, 5), onehot], 1)), source(x, noise, onehot)
    assert (got - want).abs().max() < 1e-3 * want.abs().max()


def test_structure_presets_refuse_structures_they_cannot_model():
    image_given_embedding = Structure.from_flags({"image": (3, 8, 8), "embedding": (5,)}, "1,1", "0,1")
    with pytest.raises(ValueError, match="observe the label and at least one other tensor"):
        structure_preset("control-adm", image_given_embedding, augment_dim=0, cbase=64, cres=[1, 1])
    joint = Structure.from_flags({"image": (3, 8, 8), "embedding": (5,)}, "1,1", "0,0")
    with pytest.raises(ValueError, match="generates the image given vectors"):
        structure_preset("film-ddpmpp", joint, augment_dim=0)
    name, kwargs = structure_preset("film-ddpmpp", image_given_embedding, augment_dim=9)
    assert name == "FilmSongUNet" and kwargs["cond_dim"] == 5 and kwargs["channel_mult"] == [2, 2, 2]


# ------------------------------------------------------------------------------------------------
# --cond-drop (conditioning dropout for classifier-free guidance) and the --guidance warning

class RecordingDenoiser(torch.nn.Module):
    noise_scale = torch.ones(1)
    x0_mask = torch.zeros(1, dtype=torch.bool)

    def forward(self, x, sigma, y=None, augment_labels=None):
        self.seen = y
        return x * 0


def test_cond_drop_zeroes_whole_conditioning_rows_and_leaves_other_draws_alone():
    x, y = torch.randn(4000, 3), torch.randn(4000, 5) + 10
    plain, dropped = RecordingDenoiser(), RecordingDenoiser()
    a = EDMLoss()(plain, x, y, generator=torch.Generator().manual_seed(0))
    b = EDMLoss(cond_drop=0.25)(dropped, x, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)  # same noise levels and noise: the drop is drawn after them
    assert torch.equal(plain.seen, y)
    zero_rows = (dropped.seen == 0).all(dim=1)
    assert torch.equal(dropped.seen[~zero_rows], y[~zero_rows])
    assert abs(zero_rows.float().mean().item() - 0.25) < 0.03  # binomial sd 0.007
    EDMLoss(cond_drop=1.0)(dropped, x, y)
    assert torch.count_nonzero(dropped.seen) == 0


def test_guidance_warns_on_models_trained_without_cond_drop(tmp_path):
    from vcdm.checkpoints import read_checkpoint_config

    data = write_labelled_folder(tmp_path / "d")
    runs = {}
    for drop in ("0", "0.2"):
        out = tmp_path / f"runs{drop}"
        args = ["--path", str(data), "--data_class", "CLIPDataset", "--embedder", "pixel-pca", "--pca-dim", "4",
                "--exist", "1,1", "--observed", "0,1", "--arch", "ddpmpp", "--cbase", "8", "--cres", "1,1",
                "--augment", "0", "--sample", "0", "--workers", "0", "--device", "cpu", "--outdir", str(out),
                "--seed", "1", "--batch", "4", "--tick", "0.004", "--duration", "0.000004", "--cond-drop", drop]
        r = CliRunner().invoke(train_command, args, catch_exceptions=False)
        assert r.exit_code == 0, r.output
        (snapshot,) = out.glob("*/network-snapshot-*.safetensors")
        runs[drop] = read_checkpoint_config(snapshot).training
    assert runs["0.2"]["cond_drop"] == 0.2
    message = guidance_warning(runs["0"], 2.0)
    assert message.startswith("warning: --guidance 2: this model was trained without --cond-drop")
    assert guidance_warning(runs["0.2"], 2.0) is None and guidance_warning(runs["0"], 1.0) is None
    assert "imported" in guidance_warning({}, 1.5)


def test_generate_check_prints_the_guidance_warning(capsys):
    from types import SimpleNamespace

    from vcdm.generate.core import check_request
    from vcdm.generate.options import SamplerOptions

    structure = Structure.from_flags({"image": (3, 8, 8), "embedding": (4,)}, "1,1", "0,1")
    model = SimpleNamespace(structure=structure, config=SimpleNamespace(training={"cond_drop": 0.0}), makes_images=True)
    check_request(model, SamplerOptions(guidance=2.0), None, None)
    assert "trained without --cond-drop" in capsys.readouterr().err
    model.config.training["cond_drop"] = 0.1
    check_request(model, SamplerOptions(guidance=2.0), None, None)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------
# Importing the release's pickles of these networks (built here with the legacy tests' pickler stand-ins)

def release_pickle(path: Path, net: torch.nn.Module, class_name: str, names, shapes, observed, data_class,
                   model_kwargs: dict) -> None:
    s = SeedStructure()
    s.__dict__.update(exist=np.ones(len(names), dtype=np.uint8), observed=np.array(observed, dtype=np.uint8),
                      latent=1 - np.array(observed, dtype=np.uint8), shapes=[torch.Size(x) for x in shapes],
                      is_onehot=[0] * len(names), names=list(names))
    src = payload_src(path.parent / "PAYLOAD_RAN")
    inner = edm_form(net, src, dict(structure=s, softmax_onehot=False, **model_kwargs))
    inner.class_name = class_name
    pkw = dict(structure=s, pred_x0=(0,), noise_mult=(1.0,), pretrained_weights=None, model_type=class_name,
               use_fp16=False, **model_kwargs)
    state = dict(_parameters=collections.OrderedDict(), _buffers=collections.OrderedDict(), structure=s,
                 _modules=collections.OrderedDict(model=inner), _init_args=(), _init_kwargs=pkw,
                 sigma_min=0, sigma_max=float("inf"), sigma_data=0.5, use_fp16=False)
    with open(path, "wb") as f:
        pickle.dump(dict(ema=Persistent("EDMPrecond", state, src), augment_pipe=None,
                         dataset_kwargs=dict(class_name=f"training.dataset.{data_class}", path="d.zip")), f)


RELEASE_PICKLES = {
    "concatunet": ("ConcatUNet", ["image", "embedding"], [[3, 8, 8], [6]], [0, 0], "CLIPDataset",
                   lambda kw: ConcatUNet([[3, 8, 8], [6]], [0, 0], **kw),
                   dict(model_channels=16, channel_mult=[1, 2], channel_mult_emb=2, channel_mult_noise=2, num_blocks=1,
                        attn_resolutions=[4], dropout=0.0, embedding_type="positional", encoder_type="standard",
                        decoder_type="standard", resample_filter=[1, 1], emb_layer_type="shitty", augment_dim=9)),
    "film-ddpmpp": ("FilmWrappedOriginalSongUNet", ["image", "embedding"], [[3, 8, 8], [5]], [0, 1], "CLIPDataset",
                    lambda kw: FilmSongUNet(8, 3, 3, cond_dim=5, **kw),
                    dict(model_channels=16, channel_mult=[2, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0,
                         embedding_type="positional", encoder_type="standard", decoder_type="standard",
                         channel_mult_noise=1, resample_filter=[1, 1], augment_dim=0)),
    "control-adm": ("ControlledDhariwalUNet", ["image", "embedding", "label"], [[3, 8, 8], [5], [3]], [0, 1, 1],
                    "LabelledCLIPDataset", lambda kw: ControlDhariwalUNet(8, 3, 3, cond_dim=8, class_columns=[5, 3], **kw),
                    dict(model_channels=64, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4], dropout=0.0,
                         augment_dim=0)),
}


@pytest.mark.parametrize("arch", list(RELEASE_PICKLES))
def test_release_pickles_of_these_networks_import(fake_modules, arch):
    from vcdm.legacy import load_legacy_pickle, to_vcdm
    class_name, names, shapes, observed, data_class, make, kw = RELEASE_PICKLES[arch]
    net = recipe(make({k: v for k, v in kw.items() if k not in ("encoder_type", "decoder_type")}))
    path = fake_modules / f"{arch}.pkl"
    release_pickle(path, net, class_name, names, shapes, observed, data_class, kw)
    config, state = to_vcdm(load_legacy_pickle(path))
    assert config.training["arch"] == arch and config.structure["observed"] == observed
    denoiser = config.build_denoiser()
    denoiser.net.load_state_dict(state)
    sd = net.state_dict()
    assert all(torch.equal(sd[k], state[k]) for k in sd) and sorted(sd) == sorted(state)
    x, sigma = torch.randn(2, denoiser.structure.latent_dim), torch.tensor([0.5, 3.0])
    y = torch.randn(2, denoiser.structure.observed_dim) if denoiser.structure.observed_dim else None
    with torch.no_grad():
        assert torch.equal(denoiser.eval()(x, sigma, y), Denoiser(net, denoiser.structure).eval()(x, sigma, y))


def test_pretrained_weights_from_a_release_concatunet_pickle(fake_modules):
    class_name, names, shapes, observed, data_class, make, kw = RELEASE_PICKLES["concatunet"]
    kw = {k: v for k, v in kw.items() if k not in ("encoder_type", "decoder_type")}
    source = recipe(make(kw))
    path = fake_modules / "release-concat.pkl"
    release_pickle(path, source, class_name, names, shapes, observed, data_class, kw)
    target = make(kw)
    load_pretrained(path, target)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())
