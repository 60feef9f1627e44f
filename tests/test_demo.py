"""Demo: the bundled digits and their split, the classifier judge, the time budget helpers, the smoke
run of `vcdm demo` end to end (its files, and its metrics recomputed from them), and the quality
benchmark's smoke run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from vcdm.cli.demo import command
from vcdm.data import digits
from vcdm.data.dataset import ImageDataset
from vcdm.demo.budget import SMOKE, Sizes, plan_kimg
from vcdm.generate.files import read_tensors
from vcdm.metrics.judge import make_judge
from vcdm.metrics.classifier import accuracy, evaluate, feature_stats, label_statistics, train_classifier

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_split_is_fixed_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    split = digits.split_indices(labels)
    assert len(split["train"]) == 1497 and len(split["test"]) == 300
    assert not set(split["train"]) & set(split["test"])
    assert np.bincount(labels[split["test"]]).tolist() == [digits.TEST_PER_CLASS] * 10
    assert np.array_equal(digits.split_indices(labels)["test"], split["test"])  # same every time

    images, y = digits.load_split("test", 16)
    assert images.shape == (300, 16, 16, 3) and images.dtype == np.uint8 and y.tolist() == labels[split["test"]].tolist()
    assert np.array_equal(images[..., 0], images[..., 2])  # gray stored as RGB
    assert images.max() == 255 and images.min() < 40  # white paper, dark ink
    with pytest.raises(ValueError, match="split"):
        digits.load_split("val")


def test_write_digits_gives_labelled_edm_zips(tmp_path):
    paths = digits.write_digits(tmp_path, 16)
    ds = ImageDataset(paths["test"], use_labels=True)
    assert (len(ds), ds.resolution, ds.num_channels, ds.label_dim) == (300, 16, 3, 10)
    images, labels = digits.load_split_tensors("test", 16)
    image, label = ds[7]
    assert torch.equal(image, images[7]) and int(label.argmax()) == int(labels[7])
    mtime = paths["train"].stat().st_mtime_ns
    assert digits.write_digits(tmp_path, 16)["train"].stat().st_mtime_ns == mtime  # kept, not rewritten


def test_classifier_is_deterministic_and_judges_held_out_digits():
    images, labels = digits.load_split_tensors("train", 16)
    images, labels = images[:400], labels[:400]
    a = train_classifier(images, labels, epochs=8, progress=False)
    b = train_classifier(images, labels, epochs=8, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    test_images, test_labels = digits.load_split_tensors("test", 16)
    assert accuracy(a, test_images, test_labels) > 0.8  # 8 epochs on 400 images already learn most digits
    shuffled = test_labels[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    assert accuracy(a, test_images, shuffled) < 0.2  # the same predictions against unrelated labels: chance

    ref = feature_stats(a, test_images)
    same = evaluate(a, test_images, ref, labels=test_labels)
    assert same["fd"] == pytest.approx(0, abs=1e-6) and same["accuracy"] == accuracy(a, test_images, test_labels)
    assert same["predicted_class_counts"] == torch.bincount(a.predict(test_images).argmax(1), minlength=10).tolist()
    noise = torch.randint(0, 256, test_images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    noisy = evaluate(a, noise, ref, labels=test_labels)
    assert noisy["fd"] > 10 * max(same["fd"], 1e-3) and noisy["accuracy"] < 0.2


def test_label_statistics_of_uniform_and_collapsed_predictions():
    uniform_marginal = torch.eye(10).repeat(3, 1)  # confident, every class equally often
    s = label_statistics(uniform_marginal)
    assert s["class_entropy"] == pytest.approx(math.log(10), rel=1e-6)
    assert s["mean_confidence"] == pytest.approx(1.0) and s["classifier_score"] == pytest.approx(10, rel=1e-4)
    collapsed = label_statistics(torch.full((5, 10), 0.1))
    assert collapsed["mean_confidence"] == pytest.approx(0.1) and collapsed["classifier_score"] == pytest.approx(1.0)


def test_plan_kimg_whole_batches_and_minimum():
    sizes = Sizes(batch=64, min_kimg=1.0)
    assert plan_kimg(100.0, 60.0, sizes) == 93 * 64 / 1000  # floor(6000 / 64) batches
    assert plan_kimg(100.0, 0.1, sizes) == 16 * 64 / 1000  # at least min_kimg
    assert plan_kimg(1e6, 1e3, SMOKE) == SMOKE.min_kimg  # smoke: fixed length


def read_png_tensor(path: Path) -> torch.Tensor:
    with PIL.Image.open(path) as im:
        return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def test_demo_smoke_run_reports_what_its_files_hold(tmp_path):
    """The files the summary lists exist and decode; samples.png tiles the per-seed samples; the metrics
    are what the judge (deterministic: retrained here) gives for those PNGs and for the real floor; the
    summary quotes metrics.json; the training numbers are the runs' own."""
    result = CliRunner().invoke(command, ["--outdir", str(tmp_path), "--smoke", "--no-progress", "--device", "cpu"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = (run / "summary.txt").read_text()
    listed = summary[summary.index("Files:"):summary.index("Metrics")]
    for name in ("samples.png", "real-vs-generated.png", "loss-curves.png", "metrics.json", "prior/", "image-model/",
                 "samples/", "data/"):
        assert name in listed and (run / name).exists(), name
    for name in ("real-vs-generated.png", "loss-curves.png"):
        with PIL.Image.open(run / name) as im:
            im.load()

    n = SMOKE.num_samples
    images = torch.stack([read_png_tensor(run / "samples" / "images" / f"{s:06d}.png") for s in range(n)])
    assert images.shape == (n, 3, SMOKE.resolution, SMOKE.resolution) and len(list(run.glob("samples/images/*.png"))) == n
    for s in range(n):
        emb = read_tensors(run / "samples" / "embeddings" / f"{s:06d}.pt")["embedding"]
        assert emb.shape == (SMOKE.pca_dim,) and torch.isfinite(emb).all()
    grid, cell = read_png_tensor(run / "samples.png"), SMOKE.resolution * 4 + 4  # enlarged 4x, 2-pixel border
    assert grid.shape == (3, 2 * cell, 10 * cell)  # 16 samples, 10 to a row
    for s in range(n):
        top, left = divmod(s, 10)
        assert torch.equal(grid[:, top * cell + 2:(top + 1) * cell - 2:4, left * cell + 2:(left + 1) * cell - 2:4],
                           images[s]), s

    def strict(token: str):
        raise AssertionError(f"metrics.json holds {token}, which strict JSON readers refuse")
    m = json.loads((run / "metrics.json").read_text(), parse_constant=strict)
    judge = make_judge(SMOKE.resolution, epochs=SMOKE.classifier_epochs, device="cpu", progress=False)
    assert m["classifier"]["test_accuracy"] == pytest.approx(judge.test_accuracy, abs=1e-7)
    g, floor = m["generated"], m["real_digits_floor"]
    for reported, measured in ((g, judge.evaluate(images)), (floor, judge.real_floor(n))):
        counts = measured.pop("predicted_class_counts")
        assert reported["predicted_class_counts"] == counts
        assert {k: v for k, v in reported.items() if k != "predicted_class_counts"} == pytest.approx(measured, rel=1e-6)
    for quoted in (f"{g['fd']:.2f}", f"{floor['fd']:.2f}", f"{g['class_entropy']:.3f}", f"{g['mean_confidence']:.3f}",
                   str(g["predicted_class_counts"]), f"{m['classifier']['test_accuracy']:.1%}"):
        assert quoted in summary, quoted

    for stage in ("prior", "image_model"):
        t = m["training"][stage]
        snapshot = run / t["snapshot"]
        stats = [json.loads(line) for line in (snapshot.parent / "stats.jsonl").read_text().splitlines()]
        assert snapshot.is_file() and t["kimg"] == SMOKE.min_kimg == stats[-1]["nimg"] / 1000
        assert t["final_loss"] == stats[-1]["loss"]
    times = m["wall_seconds"]
    stages = [v for k, v in times.items() if k not in ("total", "cpu_seconds")]
    assert len(stages) == 7 and 0 <= sum(stages) <= times["total"] + 0.05  # rounded to 0.01 s each


def test_demo_refuses_a_bad_budget_or_device_and_writes_nothing(tmp_path):
    result = CliRunner().invoke(command, ["--outdir", str(tmp_path), "--minutes", "0"])
    assert result.exit_code == 2 and "--minutes" in result.output
    result = CliRunner().invoke(command, ["--outdir", str(tmp_path), "--smoke", "--device", "gpu"])
    assert result.exit_code == 2 and "--device" in result.output
    if not torch.cuda.is_available():
        result = CliRunner().invoke(command, ["--outdir", str(tmp_path), "--smoke", "--device", "cuda"])
        assert result.exit_code == 2 and "CUDA" in result.output
    assert not any(tmp_path.iterdir())  # nothing written


def _quality_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_benchmark", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quality_budgets_split_equal_flops_in_whole_batches():
    q = _quality_module()
    plan = q.Plan(budgets=(1.0, 4.0), prior_share=0.08, flops={"uncond": 100.0, "image": 101.0, "prior": 1.0}, batch=64)
    # (a): 1000 images = 15.6 batches -> 16; (b): 92% of 1000 U-Net images at 101/100 the cost -> 910.9 -> 14 batches;
    # prior: 8% of 100,000 FLOP-images at 1 FLOP -> 8000 images = 125 batches.
    assert plan.kimg("uncond", 1.0) == 1.024 and plan.kimg("image", 1.0) == 0.896 and plan.kimg("prior", 1.0) == 8.0
    assert plan.kimg("uncond", 4.0) == 64 * 62 / 1000  # 4000 / 64 = 62.5 -> 62 (round half to even)
    assert plan.rampup("image") == pytest.approx(0.05 * 0.896)  # fixed for every budget: nested runs
    assert q.Plan((0.001,), 0.08, {"uncond": 1.0, "image": 1.0, "prior": 1.0}, 64).kimg("image", 0.001) == 0.064


@pytest.mark.slow
def test_quality_benchmark_smoke(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--smoke", "--no-progress",
                           "--num", "12", "--seeds", "0", "--budgets", "1,2", "--outdir", str(tmp_path),
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=570)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| budget (kimg) | (a) unconditional FD | (b) two-stage FD |" in proc.stdout
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    record = json.loads((run / "results.json").read_text())
    budgets = record["results"]["0"]
    assert len(budgets) == 2
    for rows in budgets.values():
        assert set(rows) == {"real", "uncond", "two_stage", "oracle"}
        assert all(math.isfinite(r["fd"]) and r["fd"] >= 0 for r in rows.values())
        assert 0 <= rows["oracle"]["accuracy"] <= 1 and math.isfinite(rows["oracle"]["cond_gap"])
    small, large = budgets.values()  # nested budgets: the larger trains on more images
    assert large["uncond"]["kimg"] > small["uncond"]["kimg"]
    assert large["two_stage"]["image_kimg"] > small["two_stage"]["image_kimg"]
    assert (run / "samples-seed-0.png").is_file() and (run / "table.md").is_file() and (run / "quality.png").is_file()

    # --extend continues the same run to a larger budget without retraining the legs it has.
    kept = {f: f.stat().st_mtime_ns for f in run.glob("seed-0/*/budget*-network-snapshot-*.safetensors")}
    assert len(kept) == 6
    extend = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--smoke", "--no-progress", "--num", "12",
              "--seeds", "0", "--device", "cpu", "--extend", str(run)]
    refused = subprocess.run(extend + ["--budgets", "1,3"], capture_output=True, text=True, env=env, timeout=570)
    assert refused.returncode != 0 and "--budgets must begin with its budgets" in refused.stderr
    proc = subprocess.run(extend + ["--budgets", "1,2,3"], capture_output=True, text=True, env=env, timeout=570)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(f.stat().st_mtime_ns == t for f, t in kept.items())
    extended = json.loads((run / "results.json").read_text())["results"]["0"]
    assert len(extended) == 3 and extended[list(budgets)[1]]["uncond"]["kimg"] == large["uncond"]["kimg"]
    assert list(extended.values())[2]["uncond"]["kimg"] > large["uncond"]["kimg"]


def test_train_for_gives_an_exhausted_budget_a_positive_time_limit(tmp_path, monkeypatch):
    """On a busy machine the sampling estimate can exceed the budget; training then gets a short leg, not
    a negative --time-limit (which the trainer rejects)."""
    from vcdm.demo import training

    limits = []

    def fake_run(opts, max_seconds=math.inf):
        limits.append(max_seconds)
        return tmp_path / "network-snapshot-000000.safetensors", 0.064, True

    monkeypatch.setattr(training, "train_run", fake_run)
    opts = training.train_options("uncond", tmp_path / "data.zip", tmp_path / "run", Sizes(), seed=0, device="cpu")
    training.train_for(opts, rate=100.0, seconds=-30.0, sizes=Sizes())
    assert limits and all(t >= training.MIN_LEG_SEC for t in limits)
