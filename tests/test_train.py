"""Training: CLI flags, tiny end-to-end runs (prior and image model), overfitting, bit-identical
resume, DDP equivalence, fine-tuning from an EDM pickle, non-finite and disk-full stops."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from edm_fakes import edm_pickle
from tiny_runs import REPO, TINY_PRIOR, TINY_UNET, base_args, run, run_dir, write_dataset
from vcdm.checkpoints import load_checkpoint, read_checkpoint_config
from vcdm.diffusion.loss import EDMLoss
from vcdm.embedders import load_embedder
from vcdm.embedders.base import image_batches
from vcdm.train import build as build_mod
from vcdm.train.options import TrainOptions
from vcdm.train.sampler import PositionSampler, ShuffledDataset
from vcdm.train.outputs import save_state
from vcdm.train.state import StateError, load_state, newest_valid_state

pytestmark = pytest.mark.usefixtures("one_thread")


def last_state(d: Path) -> dict:
    return load_state(sorted(d.glob("training-state-*.pt"))[-1])


# ------------------------------------------------------------------------------------------------ CLI

def test_dry_run_prints_options_and_writes_nothing(data, tmp_path):
    out = tmp_path / "runs"
    r = run(base_args(data, out, "--exist", "1,1", "--observed", "0,1", *TINY_UNET, "--batch_gpu=2",
                      "--fp16=0", "--bf16", "--dry-run"))
    opts = json.loads(r.output[:r.output.index("\n}\n") + 2])
    assert opts["batch_gpu"] == 2 and opts["bf16"] is True and opts["fp16"] is False and opts["batch"] == 4
    assert "SongUNet" in r.output and "Dry run" in r.output
    assert not out.exists()


SEED_COMMANDS = [  # the original release's README, verbatim but for the paths
    "--path=DATA --data_class CLIPDataset --batch 256 --seed 1 --exist 0,1 --observed 0,0 --arch=dalle2 "
    "--lr=1e-4 --augment=0.15 --pred_x0 1",
    "--path=DATA --data_class CLIPDataset --batch 128 --seed 1 --exist 1,1 --observed 0,1 --arch=ddpmpp "
    "--cres=1,2,2,2 --lr=1e-4 --dropout=0.05 --augment=0.15",
    "--path=DATA --data_class CLIPDataset --batch 128 --seed 1 --exist 1,1 --observed 0,1 --arch=ddpmpp "
    "--cres=1,2,2,2 --lr=1e-4 --dropout=0.05 --augment=0.15 --pretrained_weights pretrained/edm-ffhq-64x64-uncond-vp.pkl",
]


@pytest.mark.parametrize("cmd", SEED_COMMANDS)
def test_seed_commands_parse(tmp_path, cmd):
    data = write_dataset(tmp_path / "afhqv2-64x64.zip", n=2, res=64)
    r = run(cmd.replace("DATA", str(data)).split() + ["--outdir", str(tmp_path / "runs"), "--dry-run"])
    opts = json.loads(r.output[:r.output.index("\n}\n") + 2])
    assert opts["lr"] == 1e-4 and opts["seed"] == 1 and opts["embedder"] is None  # CLIP by default
    assert "512 values" in r.output  # the CLIP embedding
    if "dalle2" in cmd:
        assert opts["pred_x0"] == [1] and opts["batch"] == 256 and "DALLE2Prior" in r.output
    else:
        assert '"channel_mult": [1, 2, 2, 2]' in r.output and '"dropout": 0.05' in r.output


@pytest.mark.parametrize("extra, flag", [
    (["--exist", "1", "--observed", "0,1"], "--exist"),
    (["--observed", "1,1"], "--exist/--observed"),
    (["--exist", "1,1", "--observed", "0,1", "--arch", "dalle2"], "--arch=dalle2"),
    (["--exist", "0,1", "--observed", "0,0", "--arch", "ddpmpp"], "--arch=ddpmpp"),
    (["--exist", "1,1", "--observed", "0,1", "--cres", "1,x"], "--cres"),
    (["--exist", "1,1", "--observed", "0,1", "--resume", "nowhere.pt"], "--resume"),
])
def test_bad_flags_give_one_line_errors(data, tmp_path, extra, flag):
    r = run(base_args(data, tmp_path / "runs", *extra), code=2)
    err = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(err) == 1 and flag in err[0], r.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ------------------------------------------------------------------------------------------------ end to end

def test_prior_end_to_end(data, tmp_path):
    out = tmp_path / "runs"
    run(base_args(data, out, "--exist", "0,1", "--observed", "0,0", *TINY_PRIOR, "--pred_x0", "1",
                  "--augment", "0.15", "--duration", "0.000012", "--desc", "prior"))
    d = run_dir(out)
    assert len(d.name) == 8 + len("-prior") and d.name.endswith("-prior")
    for name in ("training_options.json", "log.txt", "stats.jsonl", "loss.png", "network-snapshot-000000.safetensors",
                 "training-state-000000.pt", "training-state-000000.pt.json"):
        assert (d / name).is_file(), name
    assert not list(d.glob("samples-*.png"))  # grids are for image models
    stats = [json.loads(line) for line in (d / "stats.jsonl").read_text().splitlines()]
    assert [s["nimg"] for s in stats] == [4, 8, 12] and all(np.isfinite(s["loss"]) for s in stats)
    assert "tick 2" in (d / "log.txt").read_text() and "sec/kimg" in (d / "log.txt").read_text()
    denoiser, config, tensors = load_checkpoint(d / "network-snapshot-000000.safetensors")
    assert set(config.to_dict()) >= {"network", "denoiser", "structure", "embedder", "data", "training"}
    assert config.network == type(denoiser.net).__name__ and config.denoiser["pred_x0"] == [1, 1]
    assert config.embedder["name"] == "pixel-pca" and set(tensors["embedder"]) == {"mean", "components", "scale"}
    assert denoiser.structure.latent_names == ("embedding",) and denoiser.net.augment_dim == 9
    state = torch.load(d / "training-state-000000.pt", weights_only=True)
    assert state["counters"]["nimg"] == 12 and set(state) >= {"net", "ema", "optimizer", "rng"}


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory) -> Path:
    """A random-weight open_clip ViT-B/32 state dict in a file, loaded by the real --clip-weights path."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in open_clip.create_model("ViT-B-32-quickgelu", pretrained=None,
                                                                device="meta").visual.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {f"visual.{k}": (torch.ones(s) if "ln_" in k and k.endswith("weight")  # LayerNorm gains
                             else torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()}
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    save_file(state, path)
    return path


@pytest.mark.slow
def test_image_model_with_clip_end_to_end(data, tmp_path, clip_weights):
    out = tmp_path / "runs"
    args = base_args(data, out, "--exist", "1,1", "--observed", "0,1", *TINY_UNET, "--duration", "0.000008",
                     "--augment", "0.15", "--workers", "1", "--sample", "1")
    args[args.index("pixel-pca")] = "clip-vit-b32"
    run(args + ["--clip-weights", str(clip_weights)])
    d = run_dir(out)
    assert (d / "samples-000000.png").is_file() and (d / "samples-conditioning.png").is_file()
    grid = PIL.Image.open(d / "samples-000000.png")
    assert grid.size == (16, 16)  # 4 samples of 8x8 in a 2x2 grid
    config = read_checkpoint_config(d / "network-snapshot-000000.safetensors")
    assert config.embedder["name"] == "clip-vit-b32" and config.structure["shapes"][1] == [512]
    assert config.net_kwargs["label_dim"] == 512 and config.net_kwargs["augment_dim"] == 9
    assert config.data["data_class"] == "CLIPDataset" and config.data["resolution"] == 8


def test_overfits_a_fixed_batch(tmp_path):
    """8 images, batch 8: every step sees the same batch; the loss on it (fixed noise) must fall."""
    small = write_dataset(tmp_path / "eight.zip", n=8)
    out = tmp_path / "runs"
    arch = ["--arch", "prior", *TINY_PRIOR[2:]]  # vcdm's prior (the release's dalle2 learns this slower)
    run(base_args(small, out, "--exist", "0,1", "--observed", "0,0", *arch, "--augment", "0", "--pca-dim", "4",
                  "--batch", "8", "--ema", "0", "--duration", "0.0008", "--tick", "1", "--lr", "2e-3"))
    denoiser, config, tensors = load_checkpoint(run_dir(out) / "network-snapshot-000000.safetensors")
    emb = load_embedder(config.embedder, tensors["embedder"])
    x = emb.embed(next(image_batches(build_mod.open_dataset(_opts(small)), batch_size=8)))
    torch.manual_seed(1)
    init = config.build_denoiser().eval()

    def loss_of(den):
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return torch.stack([EDMLoss()(den, x, generator=g).mean() for _ in range(64)]).mean().item()

    before, after = loss_of(init), loss_of(denoiser)
    assert after < 0.6 * before, (before, after)


def _opts(path: Path) -> TrainOptions:
    return TrainOptions(path=str(path), data_class="CLIPDataset", exist=[1, 1], observed=[0, 1])


# ------------------------------------------------------------------------------------------------ reliability

def _interrupt_after(monkeypatch, calls: int, sig=signal.SIGTERM):
    """Deliver `sig` to this process during the `calls`-th loss evaluation."""
    real = build_mod.make_loss
    count = {"n": 0}

    def make_loss(*args):
        loss = real(*args)

        def wrapped(*a, **k):
            count["n"] += 1
            if count["n"] == calls:
                os.kill(os.getpid(), sig)
            return loss(*a, **k)
        return wrapped

    monkeypatch.setattr(build_mod, "make_loss", make_loss)


def _assert_same_weights(a: dict, b: dict) -> None:
    for group in ("net", "ema"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f"{group}.{k} differs"


@pytest.mark.determinism
def test_resume_is_bit_identical(data, tmp_path, monkeypatch):
    args = ["--exist", "1,1", "--observed", "0,1", *TINY_UNET, "--augment", "0.3", "--dropout", "0.2",
            "--duration", "0.000024", "--sample", "100", "--snap", "100", "--dump", "100"]
    straight = tmp_path / "straight"
    run(base_args(data, straight, *args))
    reference = last_state(run_dir(straight))
    assert reference["counters"]["nimg"] == 24

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        r = run(base_args(data, interrupted, *args))  # SIGTERM: finish the step, save, exit 0
    assert "SIGTERM" in r.output
    d = run_dir(interrupted)
    half = load_state(d / "training-state-000000.pt")
    assert half["counters"]["nimg"] == 12
    # A truncated state from elsewhere looks newer but must be skipped by --resume=auto.
    bad = d / "training-state-000007.pt"
    bad.write_bytes((d / "training-state-000000.pt").read_bytes()[:5000])
    shutil.copy(d / "training-state-000000.pt.json", d / "training-state-000007.pt.json")
    with pytest.warns(UserWarning, match="training-state-000007.pt"):
        r = run(base_args(data, interrupted, *args, "--resume", "auto"))
    assert "Resuming from" in r.output and "training-state-000000.pt" in r.output
    assert run_dir(interrupted) == d  # continued in the same run directory
    _assert_same_weights(reference, load_state(d / "training-state-000000_1.pt"))  # the resumed run's state
    stats = [json.loads(line)["nimg"] for line in (d / "stats.jsonl").read_text().splitlines()]
    assert stats == [json.loads(line)["nimg"] for line in (run_dir(straight) / "stats.jsonl").read_text().splitlines()]


def _assert_close_weights(a: dict, b: dict, lr: float, steps: int) -> None:
    """Weights of two runs whose gradients differ only by float32 rounding. Adam moves each weight by about
    lr * g / (|g| + eps), so rounding shows only where g is near eps: (nearly) every element is equal
    within 1e-6, and none is further apart than the `steps` updates of size lr can take it."""
    for group in ("net", "ema"):
        diff = torch.cat([(a[group][k] - v).abs().flatten() for k, v in b[group].items()])
        assert (diff <= 1e-6).float().mean() > 0.999 and diff.max() <= 2 * lr * steps, (group, diff.max())


@pytest.mark.determinism
def test_embedding_cache_matches_per_batch_embeddings(data, tmp_path):
    """The cache embeds the dataset in batches of 64, training in batches of --batch-gpu: the same rows,
    but BLAS kernels may block a matrix product by its row count (Intel AMX does), so the embeddings
    agree only to float32 rounding, not bit for bit; the trained weights then agree as rounding allows."""
    args = ["--exist", "1,1", "--observed", "0,1", *TINY_UNET, "--augment", "0", "--duration", "0.000008",
            "--sample", "0"]
    run(base_args(data, tmp_path / "a", *args, "--embed-cache", "1"))
    run(base_args(data, tmp_path / "b", *args, "--embed-cache", "0"))
    (cache,) = (data.parent / "cache" / "tiny").glob("embeddings-pixel-pca-*.safetensors")
    from safetensors.torch import load_file
    table = load_file(cache)["embeddings"]
    _, config, tensors = load_checkpoint(run_dir(tmp_path / "a") / "network-snapshot-000000.safetensors")
    emb = load_embedder(config.embedder, tensors["embedder"])
    per_batch = torch.cat([emb.embed(b) for b in image_batches(build_mod.open_dataset(_opts(data)), batch_size=4)])
    assert table.shape == per_batch.shape == (16, 8)
    torch.testing.assert_close(table, per_batch, rtol=1e-5, atol=1e-5)  # embeddings are O(0.5)
    _assert_close_weights(last_state(run_dir(tmp_path / "a")), last_state(run_dir(tmp_path / "b")), lr=1e-3, steps=2)


def test_nonfinite_losses_stop_with_a_state(data, tmp_path, monkeypatch):
    real = build_mod.make_loss
    monkeypatch.setattr(build_mod, "make_loss", lambda *p: (lambda *a, **k: real(*p)(*a, **k) * float("nan")))
    out = tmp_path / "runs"
    r = run(base_args(data, out, "--exist", "0,1", "--observed", "0,0", *TINY_PRIOR, "--augment", "0",
                      "--max-nonfinite", "3", "--duration", "1"), code=1)
    err = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(err) == 1 and "3 consecutive non-finite losses" in err[0]
    state = last_state(run_dir(out))
    assert state["counters"]["nimg"] == 12 and state["counters"]["nonfinite"] == 3
    assert all(torch.isfinite(v).all() for v in state["net"].values())  # gradients were zeroed


def test_time_limit_stops_after_a_step_with_a_state(data, tmp_path):
    out = tmp_path / "runs"
    r = run(base_args(data, out, "--exist", "0,1", "--observed", "0,0", *TINY_PRIOR, "--augment", "0",
                      "--duration", "1", "--time-limit", "0.001"))
    assert "Stopped by --time-limit" in r.output
    state = last_state(run_dir(out))
    assert 0 < state["counters"]["nimg"] < 10**6  # stopped early, after whole steps, with a state to resume


def test_disk_full_keeps_previous_state(data, tmp_path, monkeypatch):
    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "runs"
    r = run(base_args(data, out, "--exist", "0,1", "--observed", "0,0", *TINY_PRIOR, "--augment", "0",
                      "--dump", "1", "--tick", "0.004", "--duration", "1"), code=1)
    err = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(err) == 1 and "disk full" in err[0] and "training-state-000000_1.pt" in err[0]
    d = run_dir(out)
    assert load_state(d / "training-state-000000.pt")["counters"]["nimg"] == 8  # the tick-1 state, intact
    assert not list(d.glob(".*.tmp"))


def test_state_checks_and_newest_valid(tmp_path):
    state = {"net": {"w": torch.ones(3)}, "ema": {}, "optimizer": {}, "counters": {"nimg": 5}}
    save_state(tmp_path / "training-state-000000.pt", state)
    assert torch.equal(load_state(tmp_path / "training-state-000000.pt")["net"]["w"], torch.ones(3))
    blob = (tmp_path / "training-state-000000.pt").read_bytes()
    (tmp_path / "training-state-000001.pt").write_bytes(blob[:-10])  # truncated, no sidecar
    with pytest.raises(StateError, match="training-state-000001.pt"):
        load_state(tmp_path / "training-state-000001.pt")
    with pytest.warns(UserWarning, match="skipping"):
        path, _ = newest_valid_state([tmp_path])
    assert path.name == "training-state-000000.pt"
    (tmp_path / "training-state-000000.pt").write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))  # same size, damaged
    with pytest.raises(StateError, match="SHA-256"):
        load_state(tmp_path / "training-state-000000.pt")


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


# ------------------------------------------------------------------------------------------------ DDP, fine-tuning

@pytest.mark.slow
def test_torchrun_two_processes_match_one(data, tmp_path):
    args = ["--exist", "1,1", "--observed", "0,1", *TINY_UNET, "--augment", "0.2", "--dropout", "0",
            "--duration", "0.000004", "--sample", "0"]  # one step of a global batch of 4
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
           *base_args(data, tmp_path / "ddp", *args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes x 1 rounds x 2" in proc.stdout
    run(base_args(data, tmp_path / "one", *args, "--batch-gpu", "2"))  # 1 process, 2 accumulation rounds
    ddp, one = last_state(run_dir(tmp_path / "ddp")), last_state(run_dir(tmp_path / "one"))
    torch.manual_seed(1)  # the initial weights, as the runs made them
    opts = dataclasses.replace(_opts(data), cbase=8, cres=[1, 1], arch="ddpmpp", embedder="pixel-pca", pca_dim=8,
                               augment=0.2, dropout=0.0)
    init = build_mod.build(opts, torch.device("cpu")).denoiser.net.state_dict()
    # Adam's first step moves each weight by about lr * g / (|g| + eps): float32 rounding of the
    # gradient sum only shows where g is near eps. So: (nearly) every element equal within 1e-6.
    diff = torch.cat([(ddp["net"][k] - v).abs().flatten() for k, v in one["net"].items()])
    moved = torch.cat([(v - init[k]).abs().flatten() for k, v in one["net"].items()])
    assert (diff <= 1e-6).float().mean() > 0.999 and diff.max() < 2e-3, (diff.max(), (diff > 1e-6).sum())
    assert (moved > 1e-4).float().mean() > 0.2  # the update did something (lr 1e-3)


@pytest.fixture
def edm_pickle_file(tmp_path, fake_modules):
    """An EDM-format pickle of an unconditional tiny DDPM++, built with the legacy tests' helper."""
    path = tmp_path / "edm-uncond.pkl"
    net, _ = edm_pickle(path, tmp_path / "PAYLOAD_RAN", model_channels=8, channel_mult=[1, 1], num_blocks=4,
                        attn_resolutions=[16], augment_dim=0)
    return path, net.state_dict(), sorted(n for n, _ in net.named_parameters())


def test_pretrained_weights_zero_map_label_and_freeze(data, tmp_path, edm_pickle_file):
    pkl, source, params = edm_pickle_file
    args = ["--exist", "1,1", "--observed", "0,1", *TINY_UNET, "--augment", "0", "--sample", "0",
            "--pretrained_weights", str(pkl), "--freeze_pretrained", "1"]
    out = tmp_path / "a"
    r = run(base_args(data, out, *args, "--duration", "0.000004", "--lr-rampup", "10000"))  # 1 step at lr 0
    assert "zero-initialised new map_label.bias, map_label.weight" in r.output
    state = last_state(run_dir(out))
    assert sorted(state["frozen"]) == params  # every pretrained parameter; map_label (new) trains
    assert torch.count_nonzero(state["net"]["map_label.weight"]) == 0
    for k, v in source.items():
        assert torch.equal(state["net"][k], v), k

    out = tmp_path / "b"
    run(base_args(data, out, *args, "--duration", "0.000008"))  # 2 steps at full lr: only map_label moves
    state = last_state(run_dir(out))
    assert torch.count_nonzero(state["net"]["map_label.weight"]) > 0
    for k, v in source.items():
        assert torch.equal(state["net"][k], v), k


@pytest.mark.slow
def test_tensorboard_and_offline_wandb(data, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_ENTITY", "someone")
    monkeypatch.setenv("WANDB_PROJECT", "vcdm-test")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "runs"
    run(base_args(data, out, "--exist", "0,1", "--observed", "0,0", *TINY_PRIOR, "--augment", "0",
                  "--duration", "0.000008", "--tensorboard", "--wandb_dir", str(tmp_path / "wandb")))
    d = run_dir(out)
    assert list((d / "tensorboard").glob("events.out.tfevents.*"))
    (offline,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    assert offline.name.endswith(d.name)  # the run directory is named by wandb's run id


@pytest.mark.parametrize("data_class, exist, observed, arch, latent, cond_dim", [
    ("ImageFolderDataset", "1,1", "0,1", TINY_UNET, "image", 2),                  # class-conditional images
    ("LabelledCLIPDataset", "0,1,1", "0,0,1", TINY_PRIOR, "embedding", 2),        # prior given the class
    ("LabelledCLIPDataset", "1,1,1", "0,1,1", TINY_UNET, "image", 8 + 2),         # images given embedding + class
])
def test_data_classes(data, tmp_path, data_class, exist, observed, arch, latent, cond_dim):
    out = tmp_path / "runs"
    run(base_args(data, out, "--data_class", data_class, "--exist", exist, "--observed", observed, *arch,
                  "--augment", "0.1", "--duration", "0.000004", "--sample", "0"))
    config = read_checkpoint_config(run_dir(out) / "network-snapshot-000000.safetensors")
    assert config.structure["names"] == {"ImageFolderDataset": ["image", "label"]}.get(
        data_class, ["image", "embedding", "label"])
    kwargs = config.net_kwargs
    assert kwargs.get("label_dim", kwargs.get("cond_dim")) == cond_dim and config.data["label_dim"] == 2
    assert (config.embedder is None) == (data_class == "ImageFolderDataset")


def test_transfer_copies_matching_tensors(data, tmp_path):
    """--transfer (EDM's): an unconditional model's weights seed a class-conditional one."""
    common = ["--data_class", "ImageFolderDataset", *TINY_UNET, "--augment", "0", "--sample", "0"]
    run(base_args(data, tmp_path / "src", *common, "--exist", "1,0", "--observed", "0,0", "--duration", "0.000008"))
    src = run_dir(tmp_path / "src") / "network-snapshot-000000.safetensors"
    args = base_args(data, tmp_path / "dst", *common, "--exist", "1,1", "--observed", "0,1",
                     "--duration", "0.000004", "--lr-rampup", "10000", "--transfer", str(src))  # 1 step at lr 0
    r = run(args)  # (the later --data_class wins, as click does for repeated options)
    assert "Transferred" in r.output
    from vcdm.checkpoints import load_tensors
    source, state = load_tensors(src)["net"], last_state(run_dir(tmp_path / "dst"))["net"]
    assert "map_label.weight" in state and "map_label.weight" not in source
    for k, v in source.items():
        assert torch.equal(state[k], v), k
