"""Metrics: Fréchet distance, EDM-format reference files, KID/PR, feature statistics (1 and 2 processes),
and the `vcdm fid` / root fid.py commands on a random-weight Inception-v3 loaded through the real path."""
from __future__ import annotations

import json
import runpy
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner
from torch import nn

from vcdm.cli.main import cli
from vcdm.metrics import (WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_URL, FeatureStats, InceptionFeatures, InceptionWeightsError,
                          StatsError, compute_stats, frechet_distance, kid_score, precision_recall)
from vcdm.metrics.inception import save_random_weights

REPO = Path(__file__).resolve().parents[1]


def random_gaussian(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.standard_normal((d, 2 * d))
    return rng.standard_normal(d), a @ a.T / (2 * d)


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_matches_symmetric_sqrtm_form():
    rng = np.random.default_rng(0)
    mu1, s1 = random_gaussian(rng, 64)
    mu2, s2 = random_gaussian(rng, 64)
    r1 = scipy.linalg.sqrtm(s1).real  # tr((s1 s2)^½) = tr((s1^½ s2 s1^½)^½), an independent route
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(r1 @ s2 @ r1).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 32), rng.uniform(0.1, 3, 32)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_retries_with_inflated_covariances_when_sqrtm_is_not_finite(monkeypatch):
    rng = np.random.default_rng(3)
    mu1, s1 = random_gaussian(rng, 6)
    mu2, s2 = random_gaussian(rng, 6)
    calls, real = [], scipy.linalg.sqrtm

    def flaky(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) < 3 else real(a)

    monkeypatch.setattr("vcdm.metrics.fid.scipy.linalg.sqrtm", flaky)
    got = frechet_distance(mu1, s1, mu2, s2)
    eps = 2e-8 * np.eye(6)  # two failures: the third try uses sigma + 2e-8 I on both sides
    np.testing.assert_allclose(calls[2], (s1 + eps) @ (s2 + eps), rtol=0, atol=0)
    expected = np.square(mu1 - mu2).sum() + np.trace(s1 + s2 + 2 * eps - 2 * np.real(real((s1 + eps) @ (s2 + eps))))
    assert len(calls) == 3 and got == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr("vcdm.metrics.fid.scipy.linalg.sqrtm", lambda a: np.full_like(a, np.inf))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(mu1, s1, mu2, s2)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- reference files


def test_edm_npz_written_by_hand_loads(tmp_path):
    rng = np.random.default_rng(2)
    mu, sigma = random_gaussian(rng, 2048)
    np.savez(tmp_path / "edm.npz", mu=mu, sigma=sigma)  # exactly what EDM's fid.py ref writes
    stats = FeatureStats.load(tmp_path / "edm.npz")
    assert stats.mu.dtype == stats.sigma.dtype == np.float64 and stats.features is None
    np.testing.assert_array_equal(stats.sigma, sigma)

    FeatureStats(mu, sigma, 3, rng.standard_normal((3, 2048)).astype(np.float32)).save(tmp_path / "ours.npz")
    with np.load(tmp_path / "ours.npz") as data:
        assert sorted(data.files) == ["features", "mu", "sigma"] and data["mu"].dtype == np.float64
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind

    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(StatsError, match=r"bad\.npz.*'mu'.*found mean\[2048\]"):
        FeatureStats.load(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(StatsError, match="junk.npz: cannot read"):
        FeatureStats.load(tmp_path / "junk.npz")


# ---------------------------------------------------------------- KID, precision/recall


def test_kid_near_zero_for_one_distribution_and_grows_with_shift():
    rng = np.random.default_rng(3)
    f, g = np.abs(rng.standard_normal((2, 300, 256))).astype(np.float32)  # non-negative, like pool features
    same = kid_score(f, g, subsets=20, subset_size=100)
    shifted = kid_score(f + 0.5, g, subsets=20, subset_size=100)
    assert shifted["kid_mean"] > 0.5 and abs(same["kid_mean"]) < 0.01 * shifted["kid_mean"]
    assert kid_score(f[:50], g, subsets=5)["kid_subset_size"] == 50  # shrinks to the smaller set
    # A set against itself: the unbiased estimator's only error is the self-pairs' bias, which is <= 0.
    assert -0.02 * shifted["kid_mean"] < kid_score(f, f, subsets=5, subset_size=300)["kid_mean"] <= 0


def test_precision_recall_of_identical_and_distant_sets():
    rng = np.random.default_rng(4)
    f = rng.standard_normal((100, 16)).astype(np.float32)
    assert precision_recall(f, f) == {"precision": 1.0, "recall": 1.0}
    far = precision_recall(f + 100, f)
    assert far["precision"] == 0.0 and far["recall"] == 0.0


# ---------------------------------------------------------------- statistics extraction


class PooledPixels(nn.Module):
    """A cheap stand-in extractor: 8x8 average-pooled pixels, 192-d."""

    dim = 192

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(images.float(), 8).flatten(1)


def image_tensors(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g) for _ in range(n)]


def test_compute_stats_matches_numpy_and_ignores_batch_size():
    images = image_tensors(37)
    stats = compute_stats(images, PooledPixels(), batch=8, keep_features=True, progress=False)
    expected = PooledPixels()(torch.stack(images)).double().numpy()
    np.testing.assert_allclose(stats.features, expected, rtol=1e-6)
    np.testing.assert_allclose(stats.mu, expected.mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats.sigma, np.cov(expected, rowvar=False), rtol=1e-8, atol=1e-8)
    other = compute_stats(images, PooledPixels(), batch=5, progress=False)
    assert other.features is None and other.num == 37
    np.testing.assert_allclose(other.sigma, stats.sigma, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="found 1 images"):
        compute_stats(images[:1], PooledPixels(), progress=False)


def _distributed_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    stats = compute_stats(image_tensors(23), PooledPixels(), batch=4, keep_features=True, progress=False)
    np.savez(f"{out}-{rank}.npz", mu=stats.mu, sigma=stats.sigma, features=stats.features)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_compute_stats_two_processes_match_one(tmp_path):
    single = compute_stats(image_tensors(23), PooledPixels(), batch=4, keep_features=True, progress=False)
    torch.multiprocessing.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    for rank in range(2):
        with np.load(tmp_path / f"out-{rank}.npz") as d:
            np.testing.assert_array_equal(d["features"], single.features)  # gathered back in dataset order
            np.testing.assert_allclose(d["mu"], single.mu, rtol=1e-12)
            np.testing.assert_allclose(d["sigma"], single.sigma, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- Inception weights and features


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """torch-fidelity's Inception-v3 with random weights, saved like the real file, loaded by the real path."""
    return save_random_weights(tmp_path_factory.mktemp("weights") / WEIGHTS_FILE)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No weights anywhere and no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)  # what vcdm.fileio.download calls
    return tmp_path / "torch-home" / "hub" / "checkpoints" / WEIGHTS_FILE


def test_missing_weights_give_one_clear_message(offline):
    with pytest.raises(InceptionWeightsError) as e:
        InceptionFeatures()
    message = str(e.value)
    assert "\n" not in message and WEIGHTS_URL in message and str(offline) in message
    assert "--inception-weights" in message and WEIGHTS_ENV in message and "network is unreachable" in message
    assert not offline.parent.exists() or not list(offline.parent.iterdir())  # no partial download
    with pytest.raises(InceptionWeightsError, match=f"--inception-weights: no such file.*{WEIGHTS_FILE}"):
        InceptionFeatures("missing.pth")


def test_cached_weights_are_used_without_network(offline, weights):
    offline.parent.mkdir(parents=True)
    offline.symlink_to(weights)
    assert InceptionFeatures().weights_path == offline


def test_weights_of_another_network_are_refused(tmp_path):
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "other.pth")
    with pytest.raises(InceptionWeightsError, match="does not fit torch-fidelity's Inception-v3"):
        InceptionFeatures(tmp_path / "other.pth")
    (tmp_path / "truncated.pth").write_bytes(b"PK\x03\x04")
    with pytest.raises(InceptionWeightsError, match="truncated.pth: cannot be read as a state dict"):
        InceptionFeatures(tmp_path / "truncated.pth")


def test_grayscale_is_replicated_to_rgb(weights):
    net = InceptionFeatures(weights)
    gray = torch.randint(0, 256, (1, 1, 24, 24), dtype=torch.uint8)
    f = net(gray)
    assert f.shape == (1, 2048) and f.dtype == torch.float32 and f.std() > 1e-3
    torch.testing.assert_close(f, net(gray.repeat(1, 3, 1, 1)))
    with pytest.raises(ValueError, match="uint8"):
        net(gray.float())


# ---------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(5)
    for i in range(N_IMAGES):
        sub = root / f"{i // 6:02d}"  # nested, as `generate --subdirs` writes
        sub.mkdir(exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(sub / f"{i:06d}.png")
    (root / "00" / "000000.pt").write_bytes(b"not an image")  # ignored
    return root


def vcdm(*args: str) -> object:
    return CliRunner().invoke(cli, ["fid", *args], catch_exceptions=False)


N_IMAGES = 12
COMMON = ("--workers", "0", "--no-progress", "--device", "cpu")


@pytest.mark.slow
def test_fid_commands_end_to_end(tmp_path, image_dir, weights, monkeypatch, capsys):
    ref = tmp_path / "refs" / "ref.npz"
    r = vcdm("ref", "--data", str(image_dir), "--dest", str(ref), "--metrics", "fid,kid", "--inception-weights",
             str(weights), *COMMON)
    assert r.exit_code == 0, r.output
    saved = FeatureStats.load(ref)
    assert saved.mu.shape == (2048,) and saved.sigma.shape == (2048, 2048) and saved.features.shape == (N_IMAGES, 2048)

    r = vcdm("ref", "--data", str(image_dir), "--dest", str(ref), "--inception-weights", str(weights), *COMMON)
    assert r.exit_code == 0 and "skipping" in r.stderr  # work already done

    # Same images against their own features (KID, precision/recall); weights through the environment.
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))
    out = tmp_path / "scores.json"
    r = vcdm("calc", "--images", str(image_dir), "--ref", str(ref), "--num", str(N_IMAGES), "--metrics", "kid,pr",
             "--json", str(out), *COMMON)
    assert r.exit_code == 0, r.output
    scores = json.loads(out.read_text())["metrics"]
    assert r.stdout.splitlines()[0] == f"kid_mean {scores['kid_mean']:g}"
    assert scores["precision"] == scores["recall"] == 1.0
    # Identical sets: every subset is the whole set, so KID is exactly the self-pairs' bias 2(a - d)/m <= 0.
    k = (saved.features.astype(np.float64) @ saved.features.T / 2048 + 1) ** 3
    d, a = np.mean(np.diag(k)), (k.sum() - np.trace(k)) / (N_IMAGES * (N_IMAGES - 1))
    assert scores["kid_mean"] == pytest.approx(2 * (a - d) / N_IMAGES, rel=1e-2)  # float32 inside
    assert abs(scores["kid_mean"]) < 0.01 * kid_score(saved.features * 1.5, saved.features, subsets=10)["kid_mean"]

    # The original release's command line (paths aside) against an EDM-format npz written by hand: the same statistics
    # but for a shifted mean, so FID = |shift|² exactly when the set's FID against its own statistics is 0.
    shift = np.full(2048, 0.01)
    np.savez(tmp_path / "edm.npz", mu=saved.mu + shift, sigma=saved.sigma)
    monkeypatch.setattr(sys, "argv", ["fid.py", "calc", f"--images={image_dir}", f"--ref={tmp_path / 'edm.npz'}",
                                      "--num", str(N_IMAGES), "--workers=0", "--no-progress", "--device=cpu"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "fid.py"), run_name="__main__")
    assert e.value.code in (0, None)
    name, value = capsys.readouterr().out.split()
    assert name == "fid" and float(value) == pytest.approx(np.sum(shift ** 2), abs=1e-4 * np.trace(saved.sigma))


def test_bad_requests_fail_before_loading_inception(tmp_path, image_dir, offline):
    np.savez(tmp_path / "edm.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    r = vcdm("calc", "--images", str(image_dir), "--ref", str(tmp_path / "edm.npz"), "--num-images", str(N_IMAGES + 1),
             *COMMON)
    assert r.exit_code == 1 and f"found {N_IMAGES} images" in r.output and f"--num asks for {N_IMAGES + 1}" in r.output

    r = vcdm("calc", "--images", str(image_dir), "--ref", str(tmp_path / "edm.npz"), "--num", str(N_IMAGES), "--metrics", "kid",
             *COMMON)
    assert r.exit_code == 2 and "holds only mu/sigma" in r.output

    r = vcdm("ref", "--data", str(image_dir), "--dest", str(tmp_path / "edm.npz"), "--metrics", "fid,kid", *COMMON)
    assert r.exit_code == 2 and "holds only mu/sigma, but kid needs the features;" in r.output and "--overwrite" in r.output

    r = vcdm("calc", "--images", str(image_dir), "--ref", str(tmp_path / "nope.npz"), "--num", str(N_IMAGES), *COMMON)
    assert r.exit_code == 1 and "--ref: no such file" in r.output

    r = vcdm("calc", "--images", str(image_dir), "--ref", str(tmp_path / "edm.npz"), "--num", str(N_IMAGES), "--metrics", "is",
             *COMMON)
    assert r.exit_code == 2 and "fid,kid,pr" in r.output


def test_missing_weights_through_the_command(tmp_path, image_dir, offline):
    r = vcdm("ref", "--data", str(image_dir), "--dest", str(tmp_path / "ref.npz"), *COMMON)
    assert r.exit_code == 1 and WEIGHTS_FILE in r.output and WEIGHTS_URL in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "ref.npz").exists()
