"""FD-DINOv2 features: parity with the official DINOv2 code as EDM2 runs it (vendored numbers), and the
weights lookup's one-line errors."""
import json
from pathlib import Path

import pytest
import torch

from vcdm.embedders.dinov2 import DINOv2WeightsError, resolve_weights, save_random_weights
from vcdm.metrics.dinov2 import DINOv2Features

PARITY = json.loads((Path(__file__).parent / "data" / "dinov2-parity.json").read_text())


@pytest.mark.determinism
@pytest.mark.parametrize("case", PARITY["cases"], ids=lambda c: f"d{c['dim']}-res{c['res']}-c{c['channels']}")
def test_features_match_official_dinov2_code(case, tmp_path):
    weights = save_random_weights(tmp_path / "w.pth", dim=case["dim"], depth=case["depth"], seed=case["weights_seed"])
    features = DINOv2Features(weights, allow_download=False)
    g = torch.Generator().manual_seed(case["image_seed"])
    images = torch.randint(0, 256, (case["batch"], case["channels"], case["res"], case["res"]), generator=g,
                           dtype=torch.uint8)
    f = features(images).double()
    assert f.shape == (case["batch"], case["dim"])
    torch.testing.assert_close(f[:, :8], torch.tensor(case["features_first8"], dtype=torch.float64), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(f.sum(1), torch.tensor(case["features_sum"], dtype=torch.float64), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(f.square().sum(1), torch.tensor(case["features_sqsum"], dtype=torch.float64), rtol=1e-4, atol=1e-3)


def test_position_embedding_resize_matters(tmp_path):
    """The 37x37 position grid is resized the official way: another resize gives other features."""
    weights = save_random_weights(tmp_path / "w.pth")
    features = DINOv2Features(weights, allow_download=False)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    before = features(images)
    with torch.no_grad():
        features.vit.pos_embed[:, 1:] = features.vit.pos_embed[:, 1:].flip(1)
    assert (features(images) - before).abs().max() > 1e-3


def test_missing_weights_say_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DNNLIB_CACHE_DIR", str(tmp_path / "dnnlib"))
    monkeypatch.delenv("VCDM_DINOV2_WEIGHTS", raising=False)
    with pytest.raises(DINOv2WeightsError, match=r"dinov2_vitl14_pretrain\.pth.*--dinov2-weights"):
        resolve_weights(allow_download=False)
    with pytest.raises(DINOv2WeightsError, match="--dinov2-weights: no such file"):
        resolve_weights(tmp_path / "absent.pth")
    cached = tmp_path / "dnnlib" / "torch_hub" / "checkpoints" / "dinov2_vitl14_pretrain.pth"
    save_random_weights(cached)
    assert resolve_weights(allow_download=False) == cached  # EDM2's cache is found


def test_wrong_files_are_refused_in_one_line(tmp_path):
    not_torch = tmp_path / "junk.pth"
    not_torch.write_bytes(b"not a torch file")
    with pytest.raises(DINOv2WeightsError, match="cannot be read as a state dict"):
        DINOv2Features(not_torch)
    partial = tmp_path / "partial.pth"
    state = torch.load(save_random_weights(tmp_path / "w.pth"), weights_only=True)
    del state["blocks.1.mlp.fc2.weight"]
    torch.save(state, partial)
    with pytest.raises(DINOv2WeightsError, match="does not fit DINOv2's ViT"):
        DINOv2Features(partial)


def test_dinov2_embedder_round_trips_through_its_identity(tmp_path):
    """build_embedder → identity → load_embedder gives the same embeddings; other weights are refused."""
    from vcdm.embedders import EmbedderMismatch, build_embedder, compatible, load_embedder

    weights = save_random_weights(tmp_path / "b14.pth", dim=128, depth=2, seed=3)
    embedder = build_embedder("dinov2-vitb14", clip_weights=weights)
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    first = embedder.embed(images)
    assert first.shape == (2, 128) and embedder.dim == 128
    identity = embedder.identity()
    again = load_embedder(identity, embedder.export_state(), clip_weights=weights)
    assert torch.equal(again.embed(images), first)
    compatible(identity, again.identity())
    other = save_random_weights(tmp_path / "other.pth", dim=128, depth=2, seed=4)
    with pytest.raises(EmbedderMismatch, match="dinov2-vitb14 weights found"):
        load_embedder(identity, {}, clip_weights=other)


def test_dinov2_embedder_preprocesses_as_the_metric(tmp_path):
    """The embedder of an image in [-1, 1] equals the FD-DINOv2 feature of the same image as uint8."""
    from vcdm.embedders import build_embedder

    weights = save_random_weights(tmp_path / "w.pth")
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    embedded = build_embedder("dinov2-vitb14", clip_weights=weights).embed(images.float() / 127.5 - 1)
    torch.testing.assert_close(embedded, DINOv2Features(weights)(images), atol=1e-4, rtol=1e-4)


def test_dinov2_embedder_is_frozen_and_needs_its_file(tmp_path, monkeypatch):
    from vcdm.embedders import EmbedderError, build_embedder

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DNNLIB_CACHE_DIR", str(tmp_path / "dnnlib"))
    monkeypatch.delenv("VCDM_DINOV2_VITB14_WEIGHTS", raising=False)
    with pytest.raises(DINOv2WeightsError, match=r"dinov2_vitb14_pretrain\.pth.*--embedder-weights"):
        build_embedder("dinov2-vitb14")
    with pytest.raises(EmbedderError, match="frozen"):
        build_embedder("dinov2-vitb14", clip_weights=save_random_weights(tmp_path / "w.pth"), trainable=True)
