"""Embedders: CLIP loading/preprocessing (random ViT-B/32 weights through the real loading path),
pixel-PCA fitting and round trips, the original release's post-processing, caching and compatibility checks."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vcdm.checkpoints import CheckpointConfig, load_tensors, read_checkpoint_config, save_checkpoint
from vcdm.data.structure import Structure
from vcdm.embedders import (ClipWeightsError, Embedder, EmbedderError, EmbedderMismatch, FitOptions, PCAOptions,
                            PixelPCA, PostProcessOptions, build_embedder, compatible, fit_postprocess, image_batches,
                            load_embedder)
from vcdm.embedders import base as base_mod
from vcdm.embedders import clip as clip_mod

# ----------------------------------------------------------------------------------------------
# CLIP


@pytest.fixture(scope="module")
def clip_model():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    with torch.no_grad():  # fp16-representable weights, so OpenAI's fp16 archive format holds them exactly
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


@pytest.fixture(scope="module")
def clip_files(clip_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    sd = {k: v.contiguous() for k, v in clip_model.state_dict().items()}
    save_file(sd, d / "open_clip_model.safetensors")  # the whole model, as open_clip publishes it
    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in visual.items()}}, d / "epoch_3.pt")
    class Archive(torch.nn.Module):  # a TorchScript archive laid out like OpenAI's ViT-B-32.pt (fp16)
        def __init__(self):
            super().__init__()
            self.visual = clip_model.visual

        def forward(self, x):
            return self.visual.conv1(x)

    import copy
    traced = torch.jit.trace(copy.deepcopy(Archive()).half(), torch.zeros(1, 3, 32, 32, dtype=torch.half))
    traced.save(str(d / "ViT-B-32.pt"))
    return d


@pytest.fixture(scope="module")
def clip_embedder(clip_files):
    return build_embedder("clip-vit-b32", clip_weights=clip_files / "open_clip_model.safetensors")


def _bilinear_reference(img: np.ndarray, out: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize without antialiasing, written out by hand (C, H, W)."""
    def weights(n_in):
        src = np.clip((np.arange(out) + 0.5) * n_in / out - 0.5, 0, None)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        w = np.zeros((out, n_in))
        np.add.at(w, (np.arange(out), lo), 1 - (src - lo))
        np.add.at(w, (np.arange(out), hi), src - lo)
        return w
    wy, wx = weights(img.shape[1]), weights(img.shape[2])
    return wy @ img @ wx.T


def test_clip_preprocess_matches_hand_reference(clip_embedder):
    g = torch.Generator().manual_seed(1)
    for h, w in [(250, 230), (64, 48)]:  # down- and upsampling
        img = torch.rand(1, 3, h, w, generator=g, dtype=torch.float64) * 2 - 1
        ref = _bilinear_reference(img[0].numpy(), 224)
        ref = (ref + 1) / 2
        ref = (ref - np.array(clip_mod.MEAN)[:, None, None]) / np.array(clip_mod.STD)[:, None, None]
        got = clip_embedder.preprocess(img.float())[0].double().numpy()
        np.testing.assert_allclose(got, ref, atol=2e-4)  # float32 resize
    antialiased = torch.nn.functional.interpolate(img.float(), size=(224, 224), mode="bilinear", antialias=True)
    assert not torch.allclose(clip_embedder.preprocess(torch.rand(1, 3, 250, 230)),
                              ((antialiased + 1) / 2 - clip_embedder.pixel_mean) / clip_embedder.pixel_std)


def test_clip_embed_is_raw_encode_image(clip_embedder, clip_model):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = clip_embedder.embed(images)
    assert out.shape == (2, 512) and out.dtype == torch.float32 and not out.requires_grad
    with torch.no_grad():
        ref = clip_model.encode_image(clip_embedder.preprocess(images), normalize=False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out.norm(dim=1), torch.ones(2))  # no L2 normalisation
    gray = images[:1, :1]
    torch.testing.assert_close(clip_embedder.embed(gray), clip_embedder.embed(gray.expand(-1, 3, -1, -1)))


def test_clip_file_formats_give_same_weights(clip_embedder, clip_files):
    fp = clip_embedder.fingerprint()
    for name in ["epoch_3.pt", "ViT-B-32.pt"]:
        state = clip_mod.read_state_dict(clip_files / name)
        visual = clip_mod.build_visual(state).state_dict()
        assert clip_mod.state_fingerprint(visual, {"model": clip_mod.MODEL}) == fp, name
    assert clip_mod._is_torchscript(clip_files / "ViT-B-32.pt")


def test_clip_stays_frozen_and_out_of_checkpoints(clip_embedder):
    assert not any(p.requires_grad for p in clip_embedder.parameters())
    clip_embedder.train()
    assert not clip_embedder.training and not clip_embedder.visual.training
    assert clip_embedder.export_state() == {}  # frozen weights are not copied into checkpoints
    identity = json.loads(json.dumps(clip_embedder.identity()))
    assert identity["name"] == "clip-vit-b32" and identity["dim"] == 512 and identity["post"] is None


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_clip_torchscript_archive_naming_code_is_refused(tmp_path, monkeypatch):
    """OpenAI's archive format is read by the restricted unpickler: a data.pkl naming os.system is refused
    before anything runs."""
    import pickle
    import zipfile

    monkeypatch.chdir(tmp_path)
    with zipfile.ZipFile(tmp_path / "ViT-B-32.pt", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"visual.conv1.weight": _RunsCode()}, protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps(()))
    with pytest.raises(ClipWeightsError, match=r"cannot read CLIP weights \(refused to unpickle.*'(posix|os)\.system'"):
        clip_mod.read_state_dict(tmp_path / "ViT-B-32.pt")
    assert not (tmp_path / "pwned").exists()


def test_clip_bad_files(tmp_path, clip_model):
    garbled = [("x.safetensors", b"\x00garbage" * 10), ("x.pt", b"not a pickle at all"), ("empty.bin", b"")]
    for name, data in garbled:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ClipWeightsError, match="cannot read CLIP weights"):
            build_embedder("clip-vit-b32", clip_weights=tmp_path / name)
    visual = clip_model.visual.state_dict()
    with pytest.raises(ClipWeightsError, match="lack"):
        clip_mod.build_visual({k: v for k, v in visual.items() if not k.startswith("transformer.resblocks.11")})
    with pytest.raises(ClipWeightsError, match="conv1.weight"):
        clip_mod.build_visual({**visual, "conv1.weight": torch.zeros(768, 3, 16, 16)})  # ViT-B/16's
    save_file({"patch_embed.proj.weight": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ClipWeightsError, match="open_clip_model.safetensors"):
        build_embedder("clip-vit-b32", clip_weights=tmp_path / "model.safetensors")
    with pytest.raises(ClipWeightsError, match="no such file"):
        build_embedder("clip-vit-b32", clip_weights=tmp_path / "absent.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(ClipWeightsError, match="no CLIP image-tower"):
        build_embedder("clip-vit-b32", clip_weights=tmp_path / "other.pt")


def test_clip_weights_resolution_and_missing_message(monkeypatch, clip_files):
    monkeypatch.setattr(clip_mod, "cached_candidates", lambda: [])
    monkeypatch.delenv(clip_mod.ENV, raising=False)
    monkeypatch.setenv("VCDM_OFFLINE", "1")
    with pytest.raises(ClipWeightsError) as err:
        build_embedder("clip-vit-b32")
    msg = str(err.value)
    assert "\n" not in msg and clip_mod.HF_URL in msg and "VCDM_CLIP_WEIGHTS" in msg and "--clip-weights" in msg
    path = clip_files / "ViT-B-32.pt"
    monkeypatch.setenv(clip_mod.ENV, str(path))
    assert clip_mod.resolve_weights() == path
    monkeypatch.setenv(clip_mod.ENV, str(clip_files / "nope.pt"))
    with pytest.raises(ClipWeightsError, match=r"\$VCDM_CLIP_WEIGHTS: no such file"):
        clip_mod.resolve_weights()
    monkeypatch.delenv(clip_mod.ENV)
    monkeypatch.setattr(clip_mod, "cached_candidates", lambda: [clip_files / "absent", path])
    assert clip_mod.resolve_weights() == path


@pytest.mark.slow  # a ViT-B/32 backward pass and two more loads: a few seconds, more on a busy machine
def test_clip_trainable_and_reload(clip_files, clip_embedder):
    trainable = build_embedder("clip-vit-b32", clip_weights=clip_files / "epoch_3.pt", trainable=True)
    assert all(p.requires_grad for p in trainable.parameters())
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    out = trainable.embed(images)
    assert out.requires_grad
    (out * torch.arange(out.shape[1])).sum().backward()  # a weighted sum: a unit-norm embedding's plain sum can be flat
    assert trainable.visual.conv1.weight.grad is not None
    bias, grad = trainable.visual.ln_post.bias, trainable.visual.ln_post.bias.grad[0].item()
    with torch.no_grad():  # the gradient agrees with a central difference
        sides = []
        for step in (1e-2, -2e-2):
            bias[0] += step
            sides.append((trainable.embed(images) * torch.arange(out.shape[1])).sum().item())
        bias[0] += 1e-2
    assert abs(grad) > 1e-3 and grad == pytest.approx((sides[0] - sides[1]) / 2e-2, rel=0.05)
    with torch.no_grad():
        trainable.visual.ln_post.bias.add_(0.1)  # "training" changed the weights
    state, identity = trainable.export_state(), trainable.identity()
    assert identity["fingerprint"] != clip_embedder.fingerprint()
    reloaded = load_embedder(json.loads(json.dumps(identity)), state)  # no weights file needed
    torch.testing.assert_close(reloaded.embed(images), trainable.embed(images).detach())
    # A frozen identity whose recorded weights differ from those found → refused.
    with pytest.raises(EmbedderMismatch, match="CLIP weights"):
        load_embedder({**clip_embedder.identity(), "fingerprint": "0" * 16}, {}, clip_weights=clip_files / "epoch_3.pt")


# ----------------------------------------------------------------------------------------------
# pixel-pca


def _synthetic_images(n: int, seed: int, rank: int = 6, res: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.nn.functional.interpolate(torch.randn(rank, 3, 4, 4, generator=g), size=(res, res), mode="bilinear")
    coeff = torch.randn(n, rank, generator=g) * torch.linspace(1, 0.2, rank)
    images = torch.einsum("nr,rchw->nchw", coeff, basis) * 0.3 + 0.02 * torch.randn(n, 3, res, res, generator=g)
    return images.clamp(-1, 1)


def test_pixel_pca_fit_and_reconstruction():
    images = _synthetic_images(300, seed=0)
    errors = []
    for dim in (2, 4, 8):
        emb = PixelPCA.fit(images, dim=dim, size=8)
        z = emb.embed(images)
        assert z.shape == (300, dim) and z.dtype == torch.float32
        torch.testing.assert_close(z.std(0), torch.full((dim,), 0.5), atol=0.01, rtol=0)  # whitened to sigma_data
        errors.append((emb.reconstruct(z).flatten(1) - emb.pixels(images)).pow(2).mean().item())
    assert errors[0] > errors[1] > errors[2]
    raw = PixelPCA.fit(images, dim=4, size=8, whiten=False)
    assert raw.embed(images)[:, 0].std() > raw.embed(images)[:, 3].std()
    with pytest.raises(EmbedderError, match="channels"):
        raw.embed(torch.zeros(1, 1, 16, 16))
    assert PixelPCA.fit(images[:40], dim=4).embed(images).shape == (300, 4)  # default size 16


def test_pixel_pca_deterministic_and_fingerprints():
    images = _synthetic_images(200, seed=0)
    a = PixelPCA.fit(images, dim=4, size=8, seed=3, max_images=150)
    b = PixelPCA.fit(images, dim=4, size=8, seed=3, max_images=150)
    assert a.fingerprint() == b.fingerprint()
    assert PixelPCA.fit(images, dim=4, size=8, seed=4, max_images=150).fingerprint() != a.fingerprint()
    assert PixelPCA.fit(_synthetic_images(200, seed=1), dim=4, size=8).fingerprint() != a.fingerprint()
    uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    dataset = [(img, torch.zeros(0)) for img in uint8]  # ImageDataset-like items
    from_dataset = PixelPCA.fit(dataset, dim=4, size=8)
    from_tensor = PixelPCA.fit(uint8.float() / 127.5 - 1, dim=4, size=8)
    assert from_dataset.fingerprint() == from_tensor.fingerprint()


def save_embedder(path, emb: Embedder) -> None:
    """A checkpoint of a model of ``emb``'s embeddings (a placeholder network: only the embedder is read back)."""
    structure = Structure.from_flags({"embedding": (emb.dim,)}, "1", "0").to_dict()
    config = CheckpointConfig("placeholder", {}, {}, structure, embedder=emb.identity())
    save_checkpoint(path, {"embedder": emb.export_state()}, config)


def test_pixel_pca_checkpoint_round_trip(tmp_path):
    images = _synthetic_images(100, seed=0)
    emb = PixelPCA.fit(images, dim=5, size=8)
    save_embedder(tmp_path / "ck.safetensors", emb)
    identity = read_checkpoint_config(tmp_path / "ck.safetensors").embedder
    loaded = load_embedder(identity, load_tensors(tmp_path / "ck.safetensors")["embedder"])
    assert loaded.identity() == emb.identity()
    assert torch.equal(loaded.embed(images), emb.embed(images))
    tampered = {**emb.export_state(), "scale": emb.scale * 2}
    with pytest.raises(EmbedderMismatch, match="fingerprint"):
        load_embedder(identity, tampered)


def test_pixel_pca_fit_is_cached_not_refitted(tmp_path, monkeypatch):
    images = _synthetic_images(100, seed=0)
    first = PixelPCA.fit(images, dim=4, size=8, cache_dir=tmp_path)
    monkeypatch.setattr("vcdm.embedders.pca.fit_pca", lambda *a, **k: pytest.fail("refitted despite cache"))
    second = PixelPCA.fit(images, dim=4, size=8, cache_dir=tmp_path)
    assert second.fingerprint() == first.fingerprint()
    assert len(list(tmp_path.iterdir())) == 1


# ----------------------------------------------------------------------------------------------
# post-processing


class CountingEmbedder(Embedder):
    """A cheap deterministic base embedder that counts how often it runs."""

    name, dim = "test-mean-pool", 12

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1) * 3


def test_postprocess_kmeans_pca_normalise():
    images = _synthetic_images(120, seed=0)
    base = CountingEmbedder()
    km = fit_postprocess(base, images, PostProcessOptions(n_clusters=5))
    onehot = km.embed(images)
    assert onehot.shape == (120, 5) and km.dim == 5
    assert torch.equal(onehot.sum(1), torch.ones(120)) and set(onehot.unique().tolist()) <= {0.0, 1.0}
    assert len(onehot.argmax(1).unique()) > 1
    again = fit_postprocess(base, images, PostProcessOptions(n_clusters=5))
    assert torch.equal(again.embed(images), onehot)  # deterministic
    pca = fit_postprocess(base, images, PostProcessOptions(n_comp=3))
    assert pca.embed(images).shape == (120, 3)
    assert pca.identity()["post"] == {"n_comp": 3, "n_clusters": 0, "normalise": False}
    norm = fit_postprocess(base, images, PostProcessOptions(n_comp=3, normalise=True))
    z = norm.embed(images)
    assert z.abs().max() <= 3
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.full((3,), 0.5), atol=1e-3, rtol=0)
    assert fit_postprocess(base, images) is base
    for bad in [dict(n_clusters=3, n_comp=2), dict(n_clusters=3, normalise=True), dict(n_comp=13)]:
        with pytest.raises(EmbedderError):
            fit_postprocess(base, images, PostProcessOptions(**bad))


def test_postprocess_cache_reused_and_atomic(tmp_path, monkeypatch):
    images = _synthetic_images(60, seed=0)
    base = CountingEmbedder()
    four, cached = PostProcessOptions(n_comp=4), FitOptions(cache_dir=tmp_path)
    first = fit_postprocess(base, images, four, FitOptions(batch_size=25, cache_dir=tmp_path))
    assert base.calls == 3
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors" and "test-mean-pool" in files[0].name
    second = fit_postprocess(base, images, four, cached)
    assert base.calls == 3  # read from the cache, no embedding pass
    assert second.fingerprint() == first.fingerprint()
    assert torch.equal(second.embed(images), first.embed(images))
    fit_postprocess(base, images, PostProcessOptions(n_comp=3), cached)  # other options → another file
    assert len(list(tmp_path.iterdir())) == 2
    files[0].write_bytes(b"damaged")  # damaged cache → refitted and replaced
    assert fit_postprocess(base, images, four, cached).fingerprint() == first.fingerprint()
    files[0].unlink()

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        fit_postprocess(base, images, four, cached)
    assert len(list(tmp_path.iterdir())) == 1  # only the n_comp=3 file; no partial or temp file


def test_postprocessed_checkpoint_round_trip(tmp_path):
    images = _synthetic_images(80, seed=0)
    emb = build_embedder("pixel-pca", data=images, pca=PCAOptions(dim=6, size=8), post=PostProcessOptions(n_clusters=4))
    identity = emb.identity()
    assert identity["name"] == "pixel-pca" and identity["dim"] == 4 and identity["post"]["n_clusters"] == 4
    assert identity["base"]["name"] == "pixel-pca" and identity["normalisation"] == "one-hot"
    save_embedder(tmp_path / "ck.safetensors", emb)
    loaded = load_embedder(read_checkpoint_config(tmp_path / "ck.safetensors").embedder,
                           load_tensors(tmp_path / "ck.safetensors")["embedder"])
    assert loaded.identity() == identity
    assert torch.equal(loaded.embed(images), emb.embed(images))


# ----------------------------------------------------------------------------------------------
# compatibility, building, data sampling


def test_compatible_refuses_embedders_that_differ():
    images = _synthetic_images(80, seed=0)
    a = PixelPCA.fit(images, dim=4, size=8).identity()
    compatible(a, json.loads(json.dumps(a)))
    compatible(None, None)
    b = PixelPCA.fit(images, dim=5, size=8).identity()
    with pytest.raises(EmbedderMismatch, match=r"dim 4 vs 5.*fingerprint"):
        compatible(a, b)
    with pytest.raises(EmbedderMismatch, match="name 'pixel-pca' vs 'clip-vit-b32'"):
        compatible(a, {**a, "name": "clip-vit-b32"})
    with pytest.raises(EmbedderMismatch, match="post"):
        compatible(a, {**a, "post": {"n_comp": 2, "n_clusters": 0, "normalise": False}})
    with pytest.raises(EmbedderMismatch, match="normalisation"):
        compatible(a, {**a, "normalisation": "none"})
    with pytest.raises(EmbedderMismatch, match="none"):
        compatible(a, None)


def test_build_embedder_errors():
    with pytest.raises(EmbedderError, match="unknown embedder 'clip'"):
        build_embedder("clip")
    with pytest.raises(EmbedderError, match="no data"):
        build_embedder("pixel-pca")
    with pytest.raises(EmbedderError, match="unknown embedder"):
        load_embedder({"name": "mystery", "dim": 3}, {})
    with pytest.raises(EmbedderError, match="shaped"):
        PixelPCA(4, 8).embed(torch.zeros(3, 8, 8))


def test_image_batches_subset_is_seeded():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 2, 2)
    pick = lambda seed: torch.cat(list(image_batches(images, batch_size=3, max_images=7, seed=seed)))  # noqa: E731
    assert pick(0).shape == (7, 1, 2, 2) and torch.equal(pick(0), pick(0)) and not torch.equal(pick(0), pick(1))
    assert pick(0).min() >= -1 and pick(0).max() <= 1
    assert isinstance(base_mod.default_cache_dir("datasets/ffhq-64x64.zip"), os.PathLike)
