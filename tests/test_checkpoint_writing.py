"""What a run writes (vcdm.train.outputs): file names, the temp files a killed run leaves and their
removal, and what a training state records."""
from __future__ import annotations

import fnmatch
import json
from dataclasses import replace
from pathlib import Path

import pytest

import vcdm.fileio
from tiny_models import write_model
from tiny_runs import TINY_UNET, base_args, run, run_dir
from vcdm.checkpoints import load_checkpoint, read_checkpoint_config, save_checkpoint
from vcdm.train.outputs import (ATOMIC_FILES, NONFINITE, PROFILE_SNAPSHOT_RE, STATE_RE, TEMP_GLOBS,
                                free_state_path, grid_name, move_aside, remove_stale_temp_files, resumable_states,
                                snapshot_name, state_name)
from vcdm.train.rundir import dataset_identity
from vcdm.train.state import load_state

pytestmark = pytest.mark.usefixtures("one_thread")
# An image model (preview grids) with two power-function EMA profiles: three ticks of one step, each saving
# everything (a state from the second tick on).
IMAGE = ["--exist", "1,1", "--observed", "0,1", *TINY_UNET, "--augment", "0", "--ema-std", "0.05,0.1",
         "--duration", "0.000012", "--snap", "1", "--dump", "1", "--sample", "1"]


def test_names_of_snapshots_states_and_grids():
    assert snapshot_name(12_345) == "network-snapshot-000012.safetensors"
    assert snapshot_name(12_999, 0.05) == "network-snapshot-000012-0.050.safetensors"
    assert PROFILE_SNAPSHOT_RE.fullmatch(snapshot_name(4_000_000, 0.1)).groups() == ("004000", "0.100")
    assert PROFILE_SNAPSHOT_RE.fullmatch(snapshot_name(4_000_000)) is None  # EDM's EMA is no profile
    assert snapshot_name(12_345, exact=True) == "network-snapshot-000012-12345img.safetensors"
    assert PROFILE_SNAPSHOT_RE.fullmatch(snapshot_name(12_345, 0.1, exact=True)).groups() == ("000012", "0.100")
    assert PROFILE_SNAPSHOT_RE.fullmatch(snapshot_name(12_345, exact=True)) is None
    assert grid_name(999) == "samples-000000.png" and grid_name(1_000) == "samples-000001.png"
    assert state_name(7_999) == "training-state-000007.pt" and state_name(7_000, counter=2) == "training-state-000007_2.pt"
    assert STATE_RE.fullmatch(state_name(7_000, counter=2)).groups() == ("000007", "2")
    assert STATE_RE.fullmatch(state_name(7_000, NONFINITE, 1)) is None  # --resume never picks these


def test_a_snapshot_moves_an_earlier_one_of_its_kimg_aside_and_replaces_one_of_its_own_time(tmp_path):
    denoiser, config, _ = load_checkpoint(write_model(tmp_path / "model.safetensors", "prior"))
    path = tmp_path / snapshot_name(1_500)

    def snapshot(nimg: int) -> None:
        move_aside(path, nimg, None)
        save_checkpoint(path, {"net": denoiser.net.state_dict()}, replace(config, training={"nimg": nimg}))

    for nimg in (1_000, 1_004, 1_004, 1_008):  # 1_004 twice: a resumed run writing the same point again
        snapshot(nimg)
    names = sorted(p.name for p in tmp_path.glob("network-snapshot-*"))
    assert names == ["network-snapshot-000001-1000img.safetensors", "network-snapshot-000001-1004img.safetensors",
                     "network-snapshot-000001.safetensors"]
    assert [read_checkpoint_config(tmp_path / n).training["nimg"] for n in names] == [1_000, 1_004, 1_008]
    for _ in range(2):
        path.write_bytes(b"not a checkpoint")  # unreadable: moved aside, overwriting nothing
        snapshot(1_012)
    assert (tmp_path / "network-snapshot-000001-unreadable.safetensors").read_bytes() == b"not a checkpoint"
    assert (tmp_path / "network-snapshot-000001-unreadable_1.safetensors").read_bytes() == b"not a checkpoint"
    assert read_checkpoint_config(tmp_path / "network-snapshot-000001-1000img.safetensors").training["nimg"] == 1_000


def test_free_state_path_never_reuses_a_name_and_resume_sees_only_finite_states(tmp_path):
    names = []
    for resumable in (True, False, True, False):
        path = free_state_path(tmp_path, 3_500, resumable)
        path.touch()
        names.append(path.name)
    assert names == ["training-state-000003.pt", "training-state-000003_1-nonfinite.pt",
                     "training-state-000003_2.pt", "training-state-000003_3-nonfinite.pt"]
    assert free_state_path(tmp_path, 4_000, True).name == "training-state-000004.pt"
    (tmp_path / "training-state-000003.pt.json").touch()
    assert sorted(p.name for p in resumable_states(tmp_path)) == ["training-state-000003.pt", "training-state-000003_2.pt"]


@pytest.fixture(scope="module")
def image_run(data, tmp_path_factory) -> tuple[Path, list[Path]]:
    """A run's folder and every temp file its atomic writes made."""
    made: list[Path] = []
    temp_beside = vcdm.fileio._temp_beside

    def recording(path: Path) -> tuple[int, str]:
        fd, tmp = temp_beside(path)
        made.append(Path(tmp))
        return fd, tmp

    out = tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vcdm.fileio, "_temp_beside", recording)
        run(base_args(data, out, *IMAGE))
    return run_dir(out), made


def test_every_temp_file_of_a_run_is_one_the_next_run_removes(image_run):
    d, made = image_run
    made = [p for p in made if p.parent == d]  # not the embedder's cache beside the data
    assert len(made) > 10
    for p in made:
        assert any(fnmatch.fnmatch(p.name, g) for g in TEMP_GLOBS), f"{p.name}: no TEMP_GLOBS pattern removes it"
    written = sorted(p.name for p in d.iterdir())
    for name in ATOMIC_FILES:  # no pattern for files a run no longer writes
        assert fnmatch.filter(written, name), name
    assert {"samples-conditioning.png", "samples-000000.png", "loss.png", "stats.jsonl",
            "training_options.json"} <= set(written)
    for p in made:  # as a killed run leaves them
        p.write_bytes(b"partial")
    foreign = [d / ".hidden-note.tmp", d / ".stats.jsonl.tmp", d / "notes.txt"]
    for p in foreign:
        p.write_text("the user's")
    assert sorted(remove_stale_temp_files(d)) == sorted(set(made))
    assert all(p.exists() for p in foreign) and sorted(p.name for p in d.iterdir()) == sorted(
        written + [p.name for p in foreign])


def test_snapshots_and_states_carry_their_names_and_the_runs_options(image_run, data):
    d, _ = image_run
    snapshots = sorted(p.name for p in d.glob("network-snapshot-*"))
    assert snapshots == [snapshot_name(4, 0.05, exact=True), snapshot_name(8, 0.05, exact=True), snapshot_name(0, 0.05),
                         snapshot_name(4, 0.1, exact=True), snapshot_name(8, 0.1, exact=True), snapshot_name(0, 0.1)]
    assert snapshots[2] == "network-snapshot-000000-0.050.safetensors"  # every tick's within kimg 0: the plain name
    assert snapshots[0] == "network-snapshot-000000-0.050-4img.safetensors"  # is the last's, the earlier moved aside
    assert [read_checkpoint_config(d / s).training["nimg"] for s in snapshots] == [4, 8, 12] * 2
    states = sorted(p.name for p in d.glob("training-state-*"))
    assert states == ["training-state-000000.pt", "training-state-000000.pt.json", "training-state-000000_1.pt",
                      "training-state-000000_1.pt.json"]
    assert load_state(d / "training-state-000000.pt")["counters"]["nimg"] == 8
    state = load_state(d / "training-state-000000_1.pt")
    assert state["counters"]["nimg"] == 12 and isinstance(state["options"], str)
    recorded = json.loads(state["options"])
    options = json.loads((d / "training_options.json").read_text())
    assert recorded["dataset"] == dataset_identity(data) == options["dataset"]
    run_only = ("dataset", "batch_gpu", "world_size", "network")  # training_options.json's batch_gpu is the used one
    assert {k: v for k, v in recorded.items() if k not in run_only} == {
        k: v for k, v in options.items() if k not in run_only}
    assert recorded["seed"] == 1 and recorded["ema_std"] == [0.05, 0.1] and recorded["path"] == str(data)
