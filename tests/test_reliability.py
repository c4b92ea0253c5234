"""Faults and bad inputs: each stops with a message naming the file or key and what to do, leaves no partial
output behind, or is recovered from (docs/reliability.md lists them all, with the test of each).

Training SegAN takes days: a crash must not cost the saved state, and a wrong file must never become a "best"
model or an empty segmentation that exits with status 0.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, messages
from monai.bundle import ConfigParser
from monai.bundle.scripts import run

from bundle.checkpoints import latest_training_state, trained_weights
from bundle.guards import lock_folder, remove_stale_temporaries

TRAIN = str(ROOT / "configs" / "train.json")
INFERENCE = str(ROOT / "configs" / "inference.json")
SMALL_NET = {"features": TINY["features"], "num_workers": 0, "progress": False}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A models/model.pt of random tiny-segmentor weights (what inference loads)."""
    root = tmp_path_factory.mktemp("bundle")
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(_network().state_dict(), root / "models" / "model.pt")
    return root / "models" / "model.pt"


def _network():
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update({"features": TINY["features"]})
    return parser.get_parsed_content("network_def")


def _train(root, dataset_dir, **overrides):
    run("training", config_file=TRAIN, bundle_root=str(root), dataset_dir=str(dataset_dir), **{**TINY, **overrides})


def _infer(dataset_dir, output_dir, ckpt_path, **overrides):
    run(
        config_file=INFERENCE,
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        ckpt_path=str(ckpt_path),
        **{**SMALL_NET, **overrides},
    )


def _files(folder) -> list[str]:
    """Every file under ``folder``, hidden ones included, relative to it."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _copy_case(demo_dir, case, to):
    """A copy of one demo case in its own dataset folder, so that a test can spoil it."""
    target = Path(to) / case
    target.mkdir(parents=True)
    for file in (Path(demo_dir) / case).iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


# 1. NaN / Inf -------------------------------------------------------------------------------------------------


def test_non_finite_voxels_are_refused_naming_the_file(tmp_path, demo_dir, weights):
    case = _copy_case(demo_dir, "Demo_000", tmp_path / "data")
    flair = case / "Demo_000_flair.nii.gz"
    image = nib.load(flair)
    array = np.asarray(image.dataobj).astype(np.float32)
    array[3, 4, 5], array[6, 7, 8] = np.nan, np.inf
    nib.save(nib.Nifti1Image(array, image.affine), flair)

    with pytest.raises(Exception) as error:
        _infer(tmp_path / "data", tmp_path / "out", weights)
    text = messages(error.value)
    assert f"'{flair}' holds 2 NaN or infinite voxel(s), the first at index [3, 4, 5]" in text
    assert "case 'Demo_000'" in text
    assert _files(tmp_path / "out") == []


@pytest.mark.slow
def test_a_non_finite_loss_stops_training_naming_the_iteration_and_nothing_non_finite_is_saved(tmp_path, demo_dir):
    # a learning rate this large overflows the weights within an iteration or two
    with pytest.raises(Exception) as error:
        _train(tmp_path, demo_dir, learning_rate=1e30, critic_learning_rate=1e30, max_epochs=2)
    text = messages(error.value)
    assert "FloatingPointError: non-finite loss at epoch 1, iteration" in text
    assert "--resume true" in text
    for path in (tmp_path / "models").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not list((tmp_path / "checkpoints").glob("*.pt"))  # it failed before the first save: nothing at all


@pytest.mark.parametrize("overlay", [None, "variants/unet.json", "moeskops/adversarial.json", "isic.json"])
def test_every_training_config_stops_on_a_non_finite_loss_and_validates_its_last_epoch(overlay):
    files = [TRAIN] + ([str(ROOT / "configs" / overlay)] if overlay else [])
    parser = ConfigParser()
    parser.read_config(files)
    targets = [h.get("_target_") for h in parser.get("train#handlers") if isinstance(h, dict)]
    assert "bundle.guards.StopOnNonFiniteLoss" in targets and "bundle.guards.ValidateAtEnd" in targets
    assert "ValidationHandler" not in targets


def test_non_finite_weights_are_refused_at_inference_naming_the_file(tmp_path, demo_dir):
    state = _network().state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key][0] = float("nan")
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"'.*model\.pt' hold NaN or infinite values \(" + key.replace(".", r"\.")):
        trained_weights(str(tmp_path / "model.pt"), _network())
    with pytest.raises(Exception) as error:
        _infer(demo_dir, tmp_path / "out", tmp_path / "model.pt")
    assert "hold NaN or infinite values" in messages(error.value)
    assert _files(tmp_path / "out") == []


# 2. crash-safe checkpoints, and a resume that skips a file that does not load -----------------------------------

_SLOW_RUN = """
import io, sys, time, torch

real_save = torch.save

def slow_save(obj, f, *args, **kwargs):
    # test only: the second periodic checkpoint is written half, then the process hangs until it is killed
    name = getattr(f, "name", str(f))
    if "checkpoint_epoch=2.pt" in str(name):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        f.flush()
        open(sys.argv[1], "w").write(str(name))
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)

torch.save = slow_save
from monai.bundle.scripts import run
run("training", config_file=sys.argv[2], bundle_root=sys.argv[3], dataset_dir=sys.argv[4], **eval(sys.argv[5]))
"""


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint_and_resume_continues(tmp_path, demo_dir):
    marker = tmp_path / "writing"
    settings = {**TINY, "max_epochs": 3}
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RUN, str(marker), TRAIN, str(tmp_path), str(demo_dir), repr(settings)],
        cwd=str(ROOT),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the training never reached its second checkpoint"
            time.sleep(0.2)
        time.sleep(0.2)
        process.send_signal(signal.SIGKILL)  # mid-write: half of checkpoint_epoch=2.pt is on disk
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()

    states = tmp_path / "checkpoints"
    assert "checkpoint_epoch=2.pt" not in os.listdir(states)  # never under its final name while incomplete
    half_written = [name for name in os.listdir(states) if name.startswith(".checkpoint_epoch=2.pt.tmp-")]
    assert half_written, os.listdir(states)
    # the previous checkpoint was not deleted before its successor was complete
    trainer = torch.load(states / "checkpoint_epoch=1.pt", weights_only=True)["trainer"]
    assert trainer["iteration"] == trainer["epoch_length"]  # the state after epoch 1

    _train(tmp_path, demo_dir, max_epochs=3, resume=True)
    history = json.loads((tmp_path / "eval" / "validation_metrics.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [1, 2, 3]
    # the half-written file is gone, and the periodic checkpoints of both runs do not pile up (n_saved=1)
    assert sorted(os.listdir(states)) == [".lock", "checkpoint_epoch=3.pt", "training_state.pt"]


def test_resume_skips_a_state_that_does_not_load_with_a_warning_naming_it(tmp_path, caplog):
    good = tmp_path / "checkpoint_epoch=1.pt"
    torch.save({"trainer": {"epoch": 1}, "network": {"w": torch.ones(2)}}, good)
    truncated, empty, diverged = (
        tmp_path / n for n in ("checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt", "training_state.pt")
    )
    truncated.write_bytes(good.read_bytes()[:100])
    empty.write_bytes(b"")
    torch.save({"trainer": {"epoch": 4}, "network": {"w": torch.tensor([1.0, float("nan")])}}, diverged)
    for i, path in enumerate((good, truncated, empty, diverged)):
        os.utime(path, (1000 + i, 1000 + i))  # newest last

    assert latest_training_state(str(tmp_path)) == str(good)
    warnings = caplog.text
    assert f"not resuming from '{diverged}': network.w hold NaN or infinite values" in warnings
    assert f"not resuming from '{empty}'" in warnings and f"not resuming from '{truncated}'" in warnings

    good.unlink()
    with pytest.raises(
        ValueError, match="no training state there loads: .*checkpoint_epoch=3.pt' \\(does not load: 0 bytes, EOFError"
    ):
        latest_training_state(str(tmp_path))


# 3. resume remembers the best score ----------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_compares_new_validations_with_the_best_one_before_the_interruption(tmp_path, demo_dir):
    _train(tmp_path, demo_dir, max_epochs=2)
    state_file = tmp_path / "checkpoints" / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    best = state["model_saver"]
    assert best["best_metric_epoch"] in (1, 2) and best["best_metric"] == pytest.approx(best["key_metric_saved"][0][0])

    # pretend the best validation before the interruption was unbeatable: after the resume, no later
    # validation may replace model.pt, and the best epoch must stay the one before the interruption
    state["model_saver"] = {"key_metric_saved": [(1.5, "model.pt")], "best_metric": 1.5, "best_metric_epoch": 2}
    torch.save(state, state_file)
    model = tmp_path / "models" / "model.pt"
    before = model.read_bytes()

    _train(tmp_path, demo_dir, max_epochs=4, resume=True)
    assert model.read_bytes() == before
    resumed = torch.load(state_file, weights_only=True)
    assert resumed["trainer"]["iteration"] == 4 * resumed["trainer"]["epoch_length"]
    assert resumed["model_saver"]["best_metric"] == 1.5 and resumed["model_saver"]["best_metric_epoch"] == 2


# 4. no run ends with nothing and exit status 0 --------------------------------------------------------------------


@pytest.mark.slow
def test_a_training_shorter_than_one_validation_interval_still_validates_and_saves_a_model(tmp_path, demo_dir):
    _train(tmp_path, demo_dir, max_epochs=2, val_interval=5)
    history = json.loads((tmp_path / "eval" / "validation_metrics.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [2]
    assert (tmp_path / "models" / "model.pt").is_file()


def test_an_empty_datalist_section_stops_the_run_at_start_up_naming_file_and_section(tmp_path, demo_dir):
    items = [
        {
            "image": [f"Demo_00{i}/Demo_00{i}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")],
            "label": f"Demo_00{i}/Demo_00{i}_seg.nii.gz",
        }
        for i in range(3)
    ]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items, "validation": [], "testing": []}))
    with pytest.raises(Exception) as error:
        _train(tmp_path, demo_dir, data_list_file_path=str(datalist))
    assert f"datalist file '{datalist}': section 'validation' is empty" in messages(error.value)
    assert _files(tmp_path / "models") == [] and _files(tmp_path / "eval") == []

    with pytest.raises(Exception) as error:
        _infer(demo_dir, tmp_path / "out", "unused.pt", data_list_file_path=str(datalist))
    assert f"datalist file '{datalist}': section 'testing' is empty" in messages(error.value)
    assert not (tmp_path / "out").exists()


# 5. bad input files are named, with what to do ----------------------------------------------------------------


def _truncate(case):
    flair = case / f"{case.name}_flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[:2000])
    return flair, "cannot read", "damaged"


def _empty(case):
    t2 = case / f"{case.name}_t2.nii.gz"
    t2.write_bytes(b"")
    return t2, "cannot read", "damaged"


def _elsewhere(case):
    t2 = case / f"{case.name}_t2.nii.gz"
    image = nib.load(t2)
    moved = image.affine.copy()
    moved[0, 3] += 300.0  # another grid is resampled onto the T1c's; one with no voxel in common is refused
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:30], moved), t2)
    return t2, "does not overlap", "(its reference_modality, t1c) in space"


def _two_dimensional(case):
    for file in case.iterdir():
        image = nib.load(file)
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, :, 10], image.affine), file)
    return case / f"{case.name}_t1.nii.gz", "are 2D images", "needs 3D volumes"


def _five_dimensional(case):
    for file in case.iterdir():
        image = nib.load(file)
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[..., None, None].repeat(2, 4), image.affine), file)
    return case / f"{case.name}_t1.nii.gz", "are 4D images", "needs 3D volumes"


@pytest.mark.parametrize("spoil", [_truncate, _empty, _elsewhere, _two_dimensional, _five_dimensional])
def test_a_bad_image_file_is_named_with_its_case_and_what_is_wrong(tmp_path, demo_dir, weights, spoil):
    case = _copy_case(demo_dir, "Demo_001", tmp_path / "data")
    bad_file, what, detail = spoil(case)
    with pytest.raises(Exception) as error:
        _infer(tmp_path / "data", tmp_path / "out", weights)
    text = messages(error.value)
    assert "case 'Demo_001': " in text and f"'{bad_file}'" in text
    assert what in text and detail in text
    assert _files(tmp_path / "out") == []


class _NotWeights:
    """Any pickled object: ``weights_only`` loading must refuse to run its code."""


def test_an_image_and_its_label_on_different_grids_are_named(tmp_path, demo_dir):
    from bundle.loading import LoadCaseImaged

    case = _copy_case(demo_dir, "Demo_002", tmp_path)
    seg = case / "Demo_002_seg.nii.gz"
    image = nib.load(seg)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, :36], image.affine), seg)
    flair = str(case / "Demo_002_flair.nii.gz")
    load = LoadCaseImaged(keys=["image", "label"], image_only=True, ensure_channel_first=True)
    with pytest.raises(
        ValueError,
        match=r"case 'Demo_002': its files are on different grids \(image '.*flair.nii.gz': "
        r"\(40, 40, 24\); label '.*seg.nii.gz': \(40, 36, 24\)\)",
    ):
        load({"image": flair, "label": str(seg), "case": "Demo_002"})


def test_a_dataset_folder_with_nothing_to_validate_on_is_refused(tmp_path, demo_dir):
    from bundle.datalist import load_datalist

    _copy_case(demo_dir, "Demo_000", tmp_path / "one")
    with pytest.raises(ValueError, match="section 'validation' is empty.*add cases, or give a datalist"):
        load_datalist("", str(tmp_path / "one"), "validation")


@pytest.mark.parametrize(
    "content", [b"", b"PK\x03\x04 cut short", "pickled object"], ids=["zero-byte", "truncated", "pickled object"]
)
def test_a_damaged_weights_file_is_named(tmp_path, demo_dir, content):
    if content == "pickled object":
        torch.save({"model": _NotWeights()}, tmp_path / "model.pt")
        content = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(content)
    with pytest.raises(Exception) as error:
        _infer(demo_dir, tmp_path / "out", tmp_path / "model.pt")
    text = messages(error.value)
    assert f"cannot load '{tmp_path / 'model.pt'}' ({len(content)} bytes)" in text and "--ckpt_path" in text
    assert _files(tmp_path / "out") == []


# 6. output_dir is checked at start-up ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["a file", "inside a file"])
def test_an_output_dir_that_cannot_be_a_folder_fails_before_any_case_naming_the_key(tmp_path, demo_dir, weights, where):
    (tmp_path / "taken").write_text("not a folder")
    output_dir = tmp_path / "taken" if where == "a file" else tmp_path / "taken" / "predictions"
    with pytest.raises(Exception) as error:
        _infer(demo_dir, output_dir, weights)
    text = messages(error.value)
    assert f"`output_dir` '{output_dir}' is" in text and "--output_dir" in text
    assert "evaluator" not in text  # it never got as far as running the evaluator
    assert _files(tmp_path) == ["taken"]


def test_an_output_dir_that_cannot_be_written_is_named_at_start_up(tmp_path, monkeypatch):
    from bundle import guards

    def refused(*args, **kwargs):  # what a read-only folder answers (as root, permissions cannot make one)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(guards.tempfile, "TemporaryFile", refused)
    with pytest.raises(
        PermissionError,
        match=rf"`output_dir` '{tmp_path}/new' cannot be written \('{tmp_path}': "
        r"Permission denied\): point --output_dir at a folder you can write to",
    ):
        guards.writable_folder(str(tmp_path / "new"), "output_dir")
    assert not (tmp_path / "new").exists()


# 7. label maps keep any valid input geometry ---------------------------------------------------------------------


def test_an_axis_permuted_affine_and_its_sform_qform_codes_round_trip(tmp_path, demo_dir, weights):
    permuted = np.array([[0, -1.0, 0, 10], [0, 0, 1.2, -5], [1.0, 0, 0, 3], [0, 0, 0, 1]])  # x<-j, y<-k, z<-i
    case = _copy_case(demo_dir, "Demo_000", tmp_path / "data")
    for file in case.iterdir():
        image = nib.load(file)
        moved = nib.Nifti1Image(np.asarray(image.dataobj), permuted)
        moved.set_sform(permuted, code=2)  # "aligned", and no qform: what registration tools often write
        moved.set_qform(None, code=0)
        nib.save(moved, file)
    _infer(tmp_path / "data", tmp_path / "out", weights)

    saved = nib.load(tmp_path / "out" / "Demo_000_seg.nii.gz")
    source = nib.load(case / "Demo_000_t1.nii.gz")
    assert np.array_equal(saved.affine, source.affine) and np.allclose(saved.affine, permuted)
    assert (int(saved.header["sform_code"]), int(saved.header["qform_code"])) == (2, 0)
    # the voxels are segmented in the canonical frame (this affine's slices are sagittal, its pixels 1.2 mm):
    # that they match the same case stored axially is tests/test_clinical_inputs.py's claim
    assert saved.shape == source.shape and saved.get_data_dtype() == np.uint8


# 8. one training per state folder ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_training_into_the_same_state_folder_stops_naming_the_first_ones_pid(tmp_path, demo_dir):
    states = tmp_path / "checkpoints"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(ROOT)!r})
            from bundle.guards import lock_folder
            lock_folder({str(states)!r})
            print("locked", flush=True)
            time.sleep(120)
        """),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(Exception) as error:
            _train(tmp_path, demo_dir, max_epochs=1)
        text = messages(error.value)
        assert f"'{states}' is in use by another training (PID {holder.pid})" in text and "--state_dir" in text
        assert _files(tmp_path / "models") == [] and [p for p in _files(states) if p != ".lock"] == []
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # the operating system drops the lock with its holder, however it ended: no stale lock to clear by hand
    assert lock_folder(str(states)) == str(states)


# 9. batch inference goes on past a bad case, lists the failures and exits non-zero --------------------------------


@pytest.mark.slow
def test_batch_inference_skips_failed_cases_runs_the_rest_lists_failures_and_exits_non_zero(
    tmp_path, demo_dir, weights
):
    data, out = tmp_path / "data", tmp_path / "out"
    for case in ("Demo_000", "Demo_001", "Demo_002", "Demo_003"):
        _copy_case(demo_dir, case, data)
    damaged = data / "Demo_001" / "Demo_001_t1ce.nii.gz"
    damaged.write_bytes(damaged.read_bytes()[:1500])  # fails while loading
    (out / "Demo_002_seg.nii.gz").mkdir(parents=True)  # fails while saving: a folder where the file goes

    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        INFERENCE,
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
        "--ckpt_path",
        str(weights),
        "--features",
        "[4,8,16,32]",
        "--num_workers",
        "0",
        "--progress",
        "false",
    ]
    result = subprocess.run(
        command, cwd=str(ROOT), capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode != 0
    assert "2 of 4 case(s) failed and have no output; the other 2 were saved" in result.stderr
    assert f"  - Demo_001: case 'Demo_001': cannot read '{damaged}'" in result.stderr
    assert "  - Demo_002: IsADirectoryError" in result.stderr
    # the cases after the failed ones ran; the failed ones left nothing, not even a hidden temporary file
    assert _files(out) == ["Demo_000_seg.nii.gz", "Demo_003_seg.nii.gz"]

    # --continue_on_error false: the first failure stops the run, later cases are not segmented
    with pytest.raises(Exception) as error:
        _infer(data, tmp_path / "strict", weights, continue_on_error=False)
    assert f"cannot read '{damaged}'" in messages(error.value)
    assert _files(tmp_path / "strict") == ["Demo_000_seg.nii.gz"]


# 10. leftovers ---------------------------------------------------------------------------------------------------


def test_temporary_files_of_a_killed_run_are_removed_and_those_of_a_running_one_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".model.pt.tmp-{dead.pid}-0123abcd"
    alive = tmp_path / f".model.pt.tmp-{os.getppid()}-4567cdef"
    ordinary = tmp_path / "model.pt"
    for path in (stale, alive, ordinary):
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, ordinary.name])


def test_a_case_id_that_would_escape_output_dir_is_refused_when_the_case_list_is_built(tmp_path, demo_dir):
    from bundle.datalist import inference_datalist

    image = [str(f) for f in sorted((Path(demo_dir) / "Demo_000").glob("Demo_000_t*.nii.gz"))]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [{"image": image, "case": "ok"}, {"image": image, "case": "../../x"}]}))
    with pytest.raises(ValueError, match=r"item 1 has case id '\.\./\.\./x', which would write its output outside"):
        inference_datalist(str(demo_dir), str(datalist))
