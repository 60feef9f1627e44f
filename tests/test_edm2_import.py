"""EDM2's network pickles: import through the restricted unpickler, sampling as EDM2's generate_images.py
does (tests/data/edm2-generate.json, made by running EDM2's code), raw snapshots as post-hoc EMA inputs,
and hostile EDM2-style files."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edm_fakes import EDM2_LOGVAR, EDM2_NET, Persistent, edm2_pickle, payload_src
from memory_probe import expect_one_line_error, guarded
from vcdm.checkpoints import load_checkpoint, read_checkpoint_config
from vcdm.cli.main import cli
from vcdm.legacy import LegacyError, UnsafePickleError
from vcdm.legacy.edm2 import import_network_pickle, load_edm2_pickle, phema_input

GOLDEN = json.loads((Path(__file__).parent / "data" / "edm2-generate.json").read_text())


def assert_state_equal(got, want):
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k].to(want[k].dtype), want[k]), k


# ------------------------------------------------------------------------------------------------ import

@pytest.mark.parametrize("label_dim", [0, 1000])
def test_edm2_pickle_imports_weights_head_and_settings(fake_modules, marker, label_dim):
    src, dest = fake_modules / "edm2-img16-t-0000123-0.075.pkl", fake_modules / "net.safetensors"
    state = edm2_pickle(src, marker, label_dim=label_dim, snapshot=False)
    record, config = import_network_pickle(src, dest)
    assert not marker.exists()
    assert record.logvar_channels == EDM2_LOGVAR and record.sigma_data == 0.5 and record.use_fp16
    assert (record.kimg, record.std, record.nimg) == (123, 0.075, 123904)  # EDM2: the 1024-multiple whose // 1000 is 123
    denoiser, loaded, _ = load_checkpoint(dest)
    raw = loaded.to_dict()
    assert_state_equal(denoiser.net.state_dict(), state)
    assert config.network == "EDM2UNet" and config.net_kwargs == {**config.net_kwargs, **EDM2_NET}
    assert raw["denoiser"]["logvar_channels"] == EDM2_LOGVAR and raw["denoiser"]["kind"] == "edm"
    assert raw["data"]["encoder"] == {"class": "StandardRGBEncoder"}
    assert raw["structure"] == {"names": ["image", "label"], "shapes": [[3, 16, 16], [label_dim]],
                                "exist": [1, int(bool(label_dim))], "observed": [0, int(bool(label_dim))]}
    assert raw["imported_from"]["release"] == "edm2" and raw["training"]["ema_profile"] == {"std": 0.075}

    # D(x; sigma) and u(sigma) are EDM2 Precond's: c_skip x + c_out F(c_in x; ln(sigma)/4), head at ln(sigma)/4.
    x, sigma = torch.randn(2, 3 * 16 * 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 7.0])
    y = torch.eye(label_dim)[[5, 999]] if label_dim else None
    D, logvar = denoiser(x, sigma, y, return_logvar=True)
    unet = denoiser.net
    s = sigma.reshape(-1, 1)
    F = unet((x / (0.25 + s ** 2).sqrt()).reshape(2, 3, 16, 16), sigma.log() / 4, y).reshape(2, -1)
    torch.testing.assert_close(D, 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / (s ** 2 + 0.25).sqrt() * F)
    torch.testing.assert_close(logvar, unet.logvar_linear(unet.logvar_fourier(sigma.log() / 4)).reshape(2, 1))


def _format(path):
    """The globals a pickle names and the classes it records, as vcdm's restricted unpickler sees them."""
    from vcdm.legacy import Record, read_pickle
    from vcdm.legacy.unpickle import AllowList

    names, resolve = set(), AllowList.resolve

    def record(self, module, name):
        names.add(f"{module}.{name}")
        return resolve(self, module, name)

    AllowList.resolve = record  # every read, the storage blobs' nested ones too
    try:
        obj = read_pickle(path)
    finally:
        AllowList.resolve = resolve
    classes, todo = set(), [obj]
    while todo:
        item = todo.pop()
        if isinstance(item, Record):
            classes.add(item.class_name)
            todo.append(item.state)
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
    return obj, {"globals": sorted(names), "records": sorted(classes)}


@pytest.mark.parametrize("kind, options", [("posthoc", dict(snapshot=False)), ("snapshot", {}),
                                           ("latent", dict(encoder="StabilityVAEEncoder", img_channels=4))])
def test_fake_edm2_pickles_have_the_format_of_edm2s_own(fake_modules, marker, kind, options):
    """The test pickles name the globals and record the classes that files written by EDM2's code do."""
    edm2_pickle(fake_modules / "fake.pkl", marker, label_dim=1000, **options)
    obj, fmt = _format(fake_modules / "fake.pkl")
    want = GOLDEN["pickle_format"][kind]
    assert fmt == {"globals": want["globals"], "records": want["records"]}
    if kind == "posthoc":
        assert obj["ema"].init_kwargs == want["precond_init_kwargs"]
        assert obj["ema"].state["_modules"]["unet"].init_kwargs == want["unet_init_kwargs"]


def test_import_edm_cli_names_the_encoder_and_keeps_the_vae_constants(fake_modules, marker):
    src, dest = fake_modules / "network-snapshot-0008388-0.100.pkl", fake_modules / "latent.safetensors"
    edm2_pickle(src, marker, label_dim=1000, encoder="StabilityVAEEncoder", img_channels=4)
    res = CliRunner().invoke(cli, ["import-edm", str(src), str(dest)])
    assert res.exit_code == 0, res.output
    assert "EDM2 Precond wrapping UNet, 8388 kimg, EMA std 0.100" in res.output
    assert "StabilityVAEEncoder (latents of stabilityai/sd-vae-ft-mse)" in res.output
    config = read_checkpoint_config(dest)
    enc = config.data["encoder"]
    assert enc["vae_name"] == "stabilityai/sd-vae-ft-mse" and enc["raw_std"] == [4.17, 4.62, 3.71, 3.28]
    assert (enc["final_mean"], enc["final_std"]) == (0, 0.5)
    np.testing.assert_allclose(enc["scale"], 0.5 / np.array(enc["raw_std"]), rtol=1e-6)
    np.testing.assert_allclose(enc["bias"], -np.array(enc["raw_mean"]) * np.array(enc["scale"]), rtol=1e-6)
    assert config.training["loss"] == {"class": "EDM2Loss", "P_mean": -0.4, "P_std": 1.0, "sigma_data": 0.5}
    assert config.training["nimg"] == 8388608 and config.data["path"] == "datasets/tiny.zip"  # 8 << 20 images


def test_latent_model_generation_stops_in_one_line_naming_the_vae(fake_modules, marker):
    src, dest = fake_modules / "latent.pkl", fake_modules / "latent.safetensors"
    edm2_pickle(src, marker, encoder="StabilityVAEEncoder", img_channels=4)
    import_network_pickle(src, dest)
    res = CliRunner().invoke(cli, ["generate", "--network", str(dest), "--outdir", str(fake_modules / "out"),
                                   "--seeds", "0", "--steps", "2", "--no-progress"])
    assert res.exit_code != 0 and not (fake_modules / "out").exists()
    line, = [ln for ln in res.output.splitlines() if ln]
    assert line.startswith("Error: ") and "stabilityai/sd-vae-ft-mse" in line and "next" in line, line


# ------------------------------------------------------------------------------- EDM2's generate_images.py

def _pixels(hexdump: str) -> np.ndarray:
    res = EDM2_NET["img_resolution"]
    return np.frombuffer(bytes.fromhex(hexdump), dtype=np.uint8).reshape(res, res, EDM2_NET["img_channels"])


@pytest.mark.slow
@pytest.mark.determinism
@pytest.mark.parametrize("case", list(GOLDEN["cases"]))
def test_generate_gives_edm2s_images(fake_modules, marker, case):
    """Same seeds, same Heun 32 steps, same noise and random class labels per seed as EDM2's generate_images.py,
    also guided by a smaller network (its autoguidance presets).
    vcdm's sampler state is float64 where EDM2's is float32: pixels may differ by one level, rarely."""
    golden, s = GOLDEN["cases"][case], GOLDEN["sampler"]
    src, dest, out = fake_modules / "net.pkl", fake_modules / "net.safetensors", fake_modules / "out"
    edm2_pickle(src, marker, label_dim=golden["label_dim"], snapshot=False)
    runner = CliRunner()
    assert runner.invoke(cli, ["import-edm", str(src), str(dest)]).exit_code == 0
    args = ["generate", "--network", str(dest), "--outdir", str(out), "--seeds", ",".join(map(str, golden["seeds"])),
            "--steps", str(s["num_steps"]), "--sigma_min", str(s["sigma_min"]), "--sigma_max", str(s["sigma_max"]),
            "--rho", str(s["rho"]), "--fp32", "--batch", "4", "--no-progress", "--device", "cpu"]
    if golden["class_idx"] is not None:
        args += ["--class", str(golden["class_idx"])]
    if "gnet" in golden:  # autoguidance by a smaller network, as EDM2's guided presets
        small = {k: v for k, v in golden["gnet"].items() if EDM2_NET.get(k) != v}
        edm2_pickle(fake_modules / "gnet.pkl", marker, label_dim=golden["label_dim"], snapshot=False,
                    weight_prefix=golden["gnet_weight_prefix"], **small)
        assert runner.invoke(cli, ["import-edm", str(fake_modules / "gnet.pkl"), str(fake_modules / "gnet.safetensors")]
                             ).exit_code == 0
        args += ["--gnet", str(fake_modules / "gnet.safetensors"), "--guidance", str(golden["guidance"])]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert not marker.exists()
    for seed in golden["seeds"]:
        want = _pixels(golden["pixels"][str(seed)]["hex"]).astype(int)
        got = np.asarray(Image.open(out / f"{seed:06d}.png")).astype(int)
        diff = np.abs(got - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.05, (seed, diff.max(), (diff > 0).mean())
        assert abs(got.mean() - golden["pixels"][str(seed)]["mean"]) < 0.05


# ------------------------------------------------------------------------------- raw snapshots, post-hoc EMA

def test_raw_snapshots_are_post_hoc_ema_inputs(fake_modules, marker):
    from vcdm.train.phema import checkpoint_input, reconstruct

    paths = []
    for kimg, std in ((4194, 0.05), (4194, 0.1), (8388, 0.05), (8388, 0.1)):
        path = fake_modules / f"network-snapshot-{kimg:07d}-{std:.3f}.pkl"
        edm2_pickle(path, marker, label_dim=0)
        paths.append(path)
    inputs = [phema_input(p) for p in paths]
    assert [(i.snapshot.nimg, i.snapshot.std) for i in inputs] == [(4194304, 0.05), (4194304, 0.1),
                                                                  (8388608, 0.05), (8388608, 0.1)]
    assert all(i.config.network == "EDM2UNet" and i.extra() == {} for i in inputs)
    state = load_edm2_pickle(paths[0]).state_dict
    assert_state_equal(dict(inputs[0].snapshot.tensors()), state)
    # All inputs hold the same weights, so any reconstruction (coefficients summing to 1) gives them back.
    (std, out), = reconstruct([i.snapshot for i in inputs], [0.07], 8388608, copied={"emb_fourier.freqs"})
    for k, v in state.items():
        torch.testing.assert_close(out[k].float(), v.float(), rtol=0, atol=2e-3 * max(1.0, v.float().abs().max().item()))
    # Imported with `vcdm import-edm`, a raw snapshot is a vcdm post-hoc EMA input as it is.
    import_network_pickle(paths[2], fake_modules / "snap.safetensors")
    got = checkpoint_input(fake_modules / "snap.safetensors")
    assert (got.snapshot.nimg, got.snapshot.std) == (8388608, 0.05)


def test_phema_input_needs_edm2s_file_name(fake_modules, marker):
    from vcdm.train.phema import PhemaError

    edm2_pickle(fake_modules / "renamed.pkl", marker)
    with pytest.raises(PhemaError, match="<prefix>-<kimg>-<std>.pkl"):
        phema_input(fake_modules / "renamed.pkl")


# ------------------------------------------------------------------------------------------------ hostile

class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_edm2_pickle_naming_other_globals_runs_no_code(fake_modules, marker):
    src = fake_modules / "evil.pkl"
    with open(src, "wb") as f:  # EDM2's layout, its encoder slot calling os.system
        pickle.dump({"ema": Persistent("Precond", {"_modules": {"unet": None}}, payload_src(marker)),
                     "encoder": _System(marker)}, f)
    with pytest.raises(UnsafePickleError, match="refused to unpickle.*system"):
        load_edm2_pickle(src)
    assert not marker.exists()
    res = CliRunner().invoke(cli, ["import-edm", str(src), str(fake_modules / "evil.safetensors")])
    assert res.exit_code != 0 and "refused to unpickle" in res.output and not marker.exists()


def test_edm2_pickle_calling_a_network_class_is_refused(fake_modules, marker):
    class Precond:  # EDM2's class pickled by name and called with arguments: would run its constructor
        def __reduce__(self):
            return Precond, (64, 3, 1000)
    Precond.__module__, Precond.__qualname__ = "training.networks_edm2", "Precond"
    import sys
    import types
    mod = types.ModuleType("training.networks_edm2")
    mod.Precond = Precond
    sys.modules["training.networks_edm2"] = mod
    try:
        with open(fake_modules / "call.pkl", "wb") as f:
            pickle.dump({"ema": Precond()}, f)
    finally:
        del sys.modules["training.networks_edm2"]
    with pytest.raises(UnsafePickleError, match="calls 'training.networks_edm2.Precond' with arguments"):
        load_edm2_pickle(fake_modules / "call.pkl")


HOSTILE_SETTINGS = {
    # name: (fake pickle overrides, expected one-line error)
    "img-resolution": (dict(unet_kwargs=dict(EDM2_NET, label_dim=0, img_resolution=1 << 20)),
                       "more than the 16,777,216 a vcdm checkpoint supports"),
    "label-dim": (dict(unet_kwargs=dict(EDM2_NET, label_dim=10 ** 9)), "more than the 16,777,216 a vcdm checkpoint supports"),
    "num-blocks": (dict(unet_kwargs=dict(EDM2_NET, label_dim=0, num_blocks=10 ** 9)), "more tensors than the file"),
    "channel-mult": (dict(unet_kwargs=dict(EDM2_NET, label_dim=0, channel_mult=[1] * 10 ** 4)),
                     "more tensors than the file"),
    "model-channels": (dict(unet_kwargs=dict(EDM2_NET, label_dim=0, model_channels=1 << 16)), "differ in shape"),
    "overflow": (dict(unet_kwargs=dict(EDM2_NET, label_dim=0, model_channels=1 << 40)), "do not build EDM2's network"),
    "unknown-argument": (dict(unet_kwargs=dict(EDM2_NET, label_dim=0, exec_hook="x")), "does not take: exec_hook"),
    "sigma-data": (dict(precond_over=dict(sigma_data=float("nan"))), "sigma_data is nan"),
    "long-arguments": (dict(unet_kwargs=dict(EDM2_NET, label_dim=0, attn_resolutions=list(range(10 ** 5)))),
                       "constructor arguments of more than 65,536 characters"),
    "vae-constants": (dict(encoder="StabilityVAEEncoder", img_channels=4, encoder_over=dict(scale="x" * 1000)),
                      "StabilityVAEEncoder records no VAE name or no latent constants"),
    "vae-name": (dict(encoder="StabilityVAEEncoder", img_channels=4, encoder_over=dict(
        _init_kwargs=dict(vae_name=["stabilityai/sd-vae-ft-mse"]))), "records no VAE name"),
    "encoder-class": (dict(encoder="MyEncoder"), "encoder 'MyEncoder' is not one of EDM2's"),
}


@pytest.mark.parametrize("name", [n for n in HOSTILE_SETTINGS if n not in ("img-resolution", "num-blocks")])
def test_edm2_pickle_with_impossible_settings_is_refused(fake_modules, marker, name):
    over, match = HOSTILE_SETTINGS[name]
    src = fake_modules / "bad.pkl"
    edm2_pickle(src, marker, **over)
    with pytest.raises(LegacyError, match=match.replace("(", r"\(")):
        import_network_pickle(src, fake_modules / "bad.safetensors")
    assert not (fake_modules / "bad.safetensors").exists() and not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["img-resolution", "num-blocks"])
def test_edm2_pickle_claiming_a_huge_network_fails_in_one_line_with_bounded_memory(fake_modules, marker, name):
    over, match = HOSTILE_SETTINGS[name]
    src, dest = fake_modules / "huge.pkl", fake_modules / "huge.safetensors"
    edm2_pickle(src, marker, **over)
    code = guarded("from vcdm.legacy import LegacyError\nfrom vcdm.legacy.edm2 import import_network_pickle",
                   f"import_network_pickle({str(src)!r}, {str(dest)!r})", "LegacyError")
    expect_one_line_error(code, match)
    assert not dest.exists() and not marker.exists()


# ------------------------------------------------------------------------------- --pretrained_weights

EMBED = 24


def _widened(src, structure, label_dim):
    """The image model of the two-stage recipe built as `vcdm train --pretrained_weights src` builds it."""
    from vcdm.legacy.pretrained import edm2_gains, load_pretrained
    from vcdm.nets.edm2 import EDM2UNet
    from vcdm.nets.precond import Denoiser

    torch.manual_seed(0)
    net = EDM2UNet(**dict(EDM2_NET, label_dim=label_dim, **edm2_gains(src, label_dim)))
    report = load_pretrained(src, Denoiser(net, structure), structure=structure)
    return net, report


def _outputs(net, y, train):
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([0.02, 0.7, 30.0])
    net.train(train)
    with torch.no_grad():
        return net(x / (0.25 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt(), sigma.log() / 4, y)


@pytest.mark.determinism
@pytest.mark.parametrize("train, source", [(False, "pkl"), (True, "pkl"), (False, "safetensors")])
def test_widened_class_conditional_edm2_keeps_the_pretrained_function(fake_modules, marker, train, source):
    """[embedding, one-hot class] (LabelledCLIPDataset, --exist 1,1,1 --observed 0,1,1) through a widened
    emb_label: whatever the embedding, the output is the pretrained class-conditional network's. The source is
    EDM2's pickle or its import."""
    from vcdm.data.structure import Structure

    src = fake_modules / "edm2-img64-s-1073741-0.075.pkl"
    edm2_pickle(src, marker, label_dim=1000, snapshot=False)
    imported = _imported(src, fake_modules)
    pretrained = load_checkpoint(imported)[0].net
    structure = Structure.from_flags({"image": (3, 16, 16), "embedding": (EMBED,), "label": (1000,)}, "1,1,1", "0,1,1")
    net, report = _widened(src if source == "pkl" else imported, structure, EMBED + 1000)
    assert net.label_gain == pytest.approx(1000 ** 0.5) and "from 1000 to 1024 inputs" in str(report)
    assert torch.count_nonzero(net.emb_label.weight[:, :EMBED]) == 0
    classes = torch.eye(1000)[[0, 207, 999]]
    embedding = torch.nn.functional.normalize(torch.randn(3, EMBED, generator=torch.Generator().manual_seed(1)), dim=1)
    want = _outputs(pretrained, classes, train)
    for e in (embedding, 10 * embedding, torch.zeros(3, EMBED)):
        got = _outputs(net, torch.cat([e, classes], dim=1), train)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()
    assert (want - _outputs(pretrained, torch.eye(1000)[[1, 2, 3]], train)).abs().max() > 1e-2  # classes matter


@pytest.mark.determinism
@pytest.mark.parametrize("train", [False, True])
def test_unconditional_edm2_gains_an_embedding_input_at_its_pretrained_function(fake_modules, marker, train):
    """An unconditional EDM2 network conditioned on an embedding (CLIPDataset, --observed 0,1): the new zero
    label branch's mp_sum is undone by noise_gain, so any embedding gives the pretrained output at first."""
    from vcdm.data.structure import Structure

    src = fake_modules / "uncond.pkl"
    edm2_pickle(src, marker, label_dim=0, snapshot=False)
    pretrained = load_checkpoint(_imported(src, fake_modules))[0].net
    structure = Structure.from_flags({"image": (3, 16, 16), "embedding": (EMBED,)}, "1,1", "0,1")
    net, report = _widened(src, structure, EMBED)
    assert net.noise_gain == pytest.approx(2 ** 0.5) and "noise_gain 1.41421" in str(report)
    want = _outputs(pretrained, None, train)
    embedding = torch.nn.functional.normalize(torch.randn(3, EMBED, generator=torch.Generator().manual_seed(1)), dim=1)
    got = _outputs(net, embedding, train)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()


def test_widening_without_the_pretrained_label_gain_is_refused(fake_modules, marker):
    from vcdm.data.structure import Structure
    from vcdm.legacy.pretrained import load_pretrained
    from vcdm.nets.edm2 import EDM2UNet

    src = fake_modules / "class.pkl"
    edm2_pickle(src, marker, label_dim=1000, snapshot=False)
    structure = Structure.from_flags({"image": (3, 16, 16), "embedding": (EMBED,), "label": (1000,)}, "1,1,1", "0,1,1")
    with pytest.raises(LegacyError, match=r"needs label_gain=sqrt\(1000\)"):
        load_pretrained(src, EDM2UNet(**dict(EDM2_NET, label_dim=EMBED + 1000)), structure=structure)


def _imported(src, folder):
    dest = folder / (src.stem + ".safetensors")
    import_network_pickle(src, dest)
    return dest


@pytest.mark.slow
def test_train_fine_tunes_an_edm2_pickle_into_the_two_stage_image_model(fake_modules, marker):
    """`vcdm train --arch edm2-… --recipe edm2 --pretrained_weights <EDM2 pickle>` on [embedding, class]."""
    from tiny_runs import base_args, run, run_dir, write_dataset
    from vcdm.checkpoints import read_checkpoint_config

    src = fake_modules / "edm2-img8-t-0000004-0.075.pkl"
    edm2_pickle(src, marker, label_dim=2, img_resolution=8, num_blocks=3, attn_resolutions=[16, 8], logvar_channels=128)
    data, out = write_dataset(fake_modules / "tiny.zip"), fake_modules / "runs"
    res = run(base_args(data, out, "--data_class", "LabelledCLIPDataset", "--exist", "1,1,1", "--observed", "0,1,1",
                        "--arch", "edm2-img64-xs", "--cbase", "32", "--cres", "1,2", "--recipe", "edm2",
                        "--augment", "0", "--duration", "0.000004", "--sample", "0", "--pretrained_weights", str(src)))
    assert "widened emb_label.weight from 2 to 10 inputs (classes at columns 8..9" in res.output
    snapshot = sorted(run_dir(out).glob("network-snapshot-*.safetensors"))[0]
    config = read_checkpoint_config(snapshot)
    assert config.net_kwargs["label_gain"] == pytest.approx(2 ** 0.5) and not marker.exists()


@pytest.mark.slow
@pytest.mark.determinism
def test_python_api_samples_an_imported_edm2_model_as_edm2_does(fake_modules, marker):
    import vcdm

    golden, s = GOLDEN["cases"]["class1000"], GOLDEN["sampler"]
    src = fake_modules / "net.pkl"
    edm2_pickle(src, marker, label_dim=1000, snapshot=False)
    pipe = vcdm.Pipeline.from_checkpoint(_imported(src, fake_modules), device="cpu")
    out = pipe(golden["seeds"], batch=4, steps=s["num_steps"], sigma_min=s["sigma_min"], sigma_max=s["sigma_max"],
               rho=s["rho"], bf16=False)
    for seed, got in zip(golden["seeds"], out.images):
        diff = np.abs(got.astype(int) - _pixels(golden["pixels"][str(seed)]["hex"]).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.05, (seed, diff.max(), (diff > 0).mean())


def test_python_import_edm_reads_edm2_and_names_it_where_edm_is_expected(fake_modules, marker):
    from vcdm.legacy import import_edm, load_legacy_pickle

    src = fake_modules / "net.pkl"
    state = edm2_pickle(src, marker, label_dim=1000)
    record, config = import_edm(src, fake_modules / "net.safetensors")
    assert config.network == "EDM2UNet" and set(record.state_dict) == set(state)
    with pytest.raises(LegacyError, match="an EDM2 network: import it with `vcdm import-edm`"):
        load_legacy_pickle(src)
