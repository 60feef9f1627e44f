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
    with pytest.raises(EmbedderMismatch, match="DINOv2 weights found"):
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


def _images(folder: Path, n: int, seed: int) -> Path:
    import numpy as np
    import PIL.Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_fd_dinov2_through_fid_ref_and_calc(tmp_path):
    """`vcdm fid ref/calc --metrics fd_dinov2`: float64 statistics of the features beside EDM's names; a set
    scored against its own reference gives 0, another set more; a reference without them is refused in one line."""
    import numpy as np
    from click.testing import CliRunner

    from vcdm.cli.fid import command
    from vcdm.metrics import load_references

    weights = save_random_weights(tmp_path / "w.pth")
    real, other = _images(tmp_path / "real", 6, 0), _images(tmp_path / "other", 6, 1)
    common = ["--dinov2-weights", str(weights), "--workers", "0", "--device", "cpu", "--no-progress"]
    runner = CliRunner()
    result = runner.invoke(command, ["ref", "--data", str(real), "--dest", str(tmp_path / "ref.npz"),
                                     "--metrics", "fd_dinov2", *common])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "ref.npz") as data:
        assert sorted(data.files) == ["dinov2_mu", "dinov2_sigma"] and data["dinov2_mu"].dtype == np.float64
    features = DINOv2Features(weights)(torch.stack([torch.from_numpy(np.array(__import__("PIL.Image").Image.open(p)))
                                                    .permute(2, 0, 1) for p in sorted(real.iterdir())])).double()
    reference = load_references(tmp_path / "ref.npz")["dinov2"]
    np.testing.assert_allclose(reference.mu, features.mean(0).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(reference.sigma, np.cov(features.numpy(), rowvar=False), rtol=1e-6, atol=1e-7)

    scores = {}
    for name, folder in (("self", real), ("other", other)):
        result = runner.invoke(command, ["calc", "--images", str(folder), "--ref", str(tmp_path / "ref.npz"),
                                         "--num", "6", "--metrics", "fd_dinov2", *common])
        assert result.exit_code == 0, result.output
        scores[name] = float(result.stdout.split()[-1])
    assert abs(scores["self"]) < 1e-6 and scores["other"] > 1e-3
    result = runner.invoke(command, ["calc", "--images", str(other), "--ref", str(tmp_path / "ref.npz"),
                                     "--num", "6", "--metrics", "fid", *common])
    assert result.exit_code == 2 and "holds no inception statistics, which fid needs" in result.output


def test_edm2_reference_pickles_are_read_safely(tmp_path):
    """EDM2's dataset-refs .pkl ({'fid': {mu, sigma}, 'fd_dinov2': {mu, sigma}}) loads as a reference; a pickle
    naming any other global runs nothing and is one error."""
    import pickle

    import numpy as np

    from vcdm.metrics import StatsError, load_references

    rng = np.random.default_rng(0)
    stats = {"num_images": 50000}
    for key, dim in (("fid", 6), ("fd_dinov2", 4)):
        a = rng.normal(size=(dim, dim))
        stats[key] = dict(mu=rng.normal(size=dim), sigma=a @ a.T)
    (tmp_path / "ref.pkl").write_bytes(pickle.dumps(stats))
    references = load_references(tmp_path / "ref.pkl")
    assert set(references) == {"inception", "dinov2"} and references["inception"].num == 50000
    np.testing.assert_array_equal(references["dinov2"].sigma, stats["fd_dinov2"]["sigma"])

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"fid": Payload()}))
    with pytest.raises(StatsError, match="evil.pkl") as e:
        load_references(tmp_path / "evil.pkl")
    assert "\n" not in str(e.value)
    stats["fd_dinov2"]["mu"] = np.full(4, np.nan)
    (tmp_path / "nan.pkl").write_bytes(pickle.dumps(stats))
    with pytest.raises(StatsError, match="non-finite"):
        load_references(tmp_path / "nan.pkl")


def test_embedder_names_agree():
    from vcdm.embedders import EMBEDDERS
    from vcdm.train.options import EMBEDDERS as TRAIN_EMBEDDERS

    assert set(EMBEDDERS) == set(TRAIN_EMBEDDERS)


@pytest.mark.slow
def test_two_stage_imagenet_recipe_on_dinov2_embeddings(tmp_path):
    """LabelledCLIPDataset with --embedder dinov2-vitb14: a class-conditional prior of DINOv2 embeddings and an
    image model given [embedding, class] train, chain in `vcdm sample`, and refuse a prior of other weights."""
    from click.testing import CliRunner
    from tiny_runs import PRIOR, TINY_UNET, base_args, run, run_dir, write_dataset

    from vcdm.checkpoints import read_checkpoint_config
    from vcdm.cli.sample import command as sample

    weights = save_random_weights(tmp_path / "b14.pth", dim=64, depth=1)
    data = write_dataset(tmp_path / "tiny.zip")
    dino = ["--data_class", "LabelledCLIPDataset", "--embedder", "dinov2-vitb14", "--embedder-weights", str(weights),
            "--duration", "0.000004", "--sample", "0"]
    run(base_args(data, tmp_path / "prior", *dino, "--exist", "0,1,1", "--observed", "0,0,1", *PRIOR[4:], "--augment", "0"))
    run(base_args(data, tmp_path / "image", *dino, "--exist", "1,1,1", "--observed", "0,1,1", *TINY_UNET))
    prior, image = (sorted(run_dir(tmp_path / d).glob("network-snapshot-*.safetensors"))[0] for d in ("prior", "image"))
    config = read_checkpoint_config(prior)
    assert config.embedder["name"] == "dinov2-vitb14" and config.embedder["dim"] == 64
    assert config.structure["shapes"][1] == [64]

    result = CliRunner().invoke(sample, ["--prior", str(prior), "--image-model", str(image), "--seeds", "0-1",
                                         "--prior-steps", "2", "--image-steps", "2", "--outdir", str(tmp_path / "out"), "--device", "cpu",
                                         "--no-progress"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").rglob("*.png"))) == 2
    other = save_random_weights(tmp_path / "other.pth", dim=64, depth=1, seed=5)
    run(base_args(data, tmp_path / "prior2", *dino[:4], "--embedder-weights", str(other), *dino[6:],
                  "--exist", "0,1,1", "--observed", "0,0,1", *PRIOR[4:], "--augment", "0"))
    prior2 = sorted(run_dir(tmp_path / "prior2").glob("network-snapshot-*.safetensors"))[0]
    result = CliRunner().invoke(sample, ["--prior", str(prior2), "--image-model", str(image), "--seeds", "0-1",
                                         "--prior-steps", "2", "--image-steps", "2", "--outdir", str(tmp_path / "out2"), "--device", "cpu",
                                         "--no-progress"])
    assert result.exit_code != 0 and "fingerprint" in result.output and "Traceback" not in result.output
