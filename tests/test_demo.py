"""Synthetic demo data: BraTS 2018-2021 layout, BraTS labels nested like a glioma, deterministic, written safely."""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import load_script
from scipy.ndimage import binary_dilation

import bundle.demo as demo
from bundle.cases import find_cases
from bundle.demo import DEMO_MANIFEST, ensure_demo_data, make_demo_dataset
from bundle.phantom import border_label_noise, make_demo_case

SHAPE = (48, 48, 24)
SUFFIXES = ("t1", "t1ce", "t2", "flair", "seg")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return Path(make_demo_dataset(tmp_path_factory.mktemp("data") / "demo", num_cases=3, shape=SHAPE, seed=0))


def _load(dataset, case, suffix):
    return nib.load(str(dataset / case / f"{case}_{suffix}.nii.gz"))


def test_files_follow_brats2018_layout(dataset):
    assert sorted(p.name for p in dataset.iterdir()) == ["Demo_000", "Demo_001", "Demo_002", DEMO_MANIFEST]
    affine = _load(dataset, "Demo_000", "t1").affine
    assert np.allclose(np.diag(affine)[:3], 1.0) and np.abs(affine[:3, 3]).min() > 1.0  # 1 mm, origin off zero
    for suffix in SUFFIXES:
        image = _load(dataset, "Demo_001", suffix)
        assert image.shape == SHAPE
        assert image.get_data_dtype() == (np.uint8 if suffix == "seg" else np.float32)
        assert np.allclose(image.affine, affine)
    assert [c["case"] for c in find_cases(dataset)] == ["Demo_000", "Demo_001", "Demo_002"]


def test_labels_are_brats_values_with_every_region(dataset):
    for case in ("Demo_000", "Demo_001", "Demo_002"):
        label = np.asarray(_load(dataset, case, "seg").dataobj)
        assert set(np.unique(label)) == {0, 1, 2, 4}


def test_necrosis_inside_rim_inside_edema(dataset):
    for case in ("Demo_000", "Demo_001", "Demo_002"):
        label = np.asarray(_load(dataset, case, "seg").dataobj)
        necrosis, core, tumour = label == 1, np.isin(label, (1, 4)), label > 0
        assert not (binary_dilation(necrosis) & ~core).any()  # the core's necrosis only touches the rim
        assert not (binary_dilation(core) & ~tumour).any()  # the core only touches edema


def test_same_seed_same_arrays():
    first, second, other = make_demo_case(SHAPE, 3, 1), make_demo_case(SHAPE, 3, 1), make_demo_case(SHAPE, 4, 1)
    for key in ("t1", "t1c", "t2", "flair"):
        assert first[0][key].tobytes() == second[0][key].tobytes()
    assert first[1].tobytes() == second[1].tobytes()
    assert not np.array_equal(first[1], other[1])


def test_written_arrays_are_the_generated_ones(dataset):
    images, label = make_demo_case(SHAPE, seed=0, index=2)
    assert np.array_equal(np.asarray(_load(dataset, "Demo_002", "t1ce").dataobj), images["t1c"])
    assert np.array_equal(np.asarray(_load(dataset, "Demo_002", "seg").dataobj), label)


def test_tumour_contrasts():
    images, label = make_demo_case(SHAPE, seed=0, index=0)
    head, tumour = images["t1"] > 0, label > 0
    normal = head & ~tumour
    assert images["flair"][tumour].mean() > 1.2 * images["flair"][normal].mean()  # edema bright on FLAIR
    assert images["t2"][tumour].mean() > images["t2"][normal].mean()
    assert images["t1c"][label == 4].mean() > 1.3 * images["t1c"][label == 2].mean()  # enhancing rim
    assert images["t1c"][label == 1].mean() < images["t1c"][label == 4].mean()  # dark necrotic core
    assert all(np.all(images[k][~head] == 0) for k in images)  # zero background
    corner = (slice(0, 3),) * 3
    assert not head[corner].any()


def test_ensure_keeps_a_complete_dataset(tmp_path):
    out = tmp_path / "demo"
    ensure_demo_data(out, num_cases=2, shape=SHAPE, seed=0)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert ensure_demo_data(out, num_cases=2, shape=SHAPE, seed=0) == str(out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    ensure_demo_data(out, num_cases=3, shape=SHAPE, seed=0)  # other parameters: regenerated
    assert json.loads((out / DEMO_MANIFEST).read_text())["num_cases"] == 3
    assert (out / "Demo_002" / "Demo_002_seg.nii.gz").is_file()


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_save(array, affine, path):
        calls.append(path)
        if len(calls) == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_save_nifti", failing_save)
    with pytest.raises(KeyboardInterrupt):
        make_demo_dataset(tmp_path / "demo", num_cases=2, shape=SHAPE)
    assert os.listdir(tmp_path) == []


def test_refuses_to_replace_other_data(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="mine"):
        make_demo_dataset(tmp_path / "mine", num_cases=1, shape=SHAPE)


def test_cli_generates_and_summarises(tmp_path, capsys):
    load_script("make_demo_data").main(output_dir=str(tmp_path / "demo"), num_cases=2, shape="[32,32,24]", seed=0)
    assert len(find_cases(tmp_path / "demo")) == 2
    assert "generated demo dataset" in capsys.readouterr().out


def test_default_difficulty_is_the_demo_the_readme_measured():
    # label voxel counts and mean intensities of the default demo before the difficulty setting existed
    expected = {
        0: ({1: 63, 2: 1885, 4: 308}, {"t1": 149.46, "t1c": 116.76, "t2": 153.71, "flair": 145.31}),
        1: ({1: 132, 2: 1724, 4: 419}, {"t1": 147.52, "t1c": 164.53, "t2": 179.81, "flair": 164.44}),
    }
    for index, (counts, means) in expected.items():
        images, label = make_demo_case(SHAPE, seed=0, index=index, difficulty=0.0)
        assert {v: int((label == v).sum()) for v in (1, 2, 4)} == counts
        assert {k: round(float(images[k].mean()), 2) for k in images} == means


def _flair_contrast_and_noise(images, label):
    from scipy.ndimage import gaussian_filter

    head, tumour = images["t1"] > 0, label > 0
    contrast = images["flair"][tumour].mean() / images["flair"][head & ~tumour].mean()
    flair = images["flair"] / images["flair"][head].mean()
    residual = flair - gaussian_filter(flair, 1.0)
    return contrast, float(np.median(np.abs(residual[head])))  # the median ignores tissue edges


def test_hard_demo_has_fainter_smaller_tumours_and_more_noise():
    easy = [make_demo_case(SHAPE, seed=0, index=i) for i in range(3)]
    hard = [make_demo_case(SHAPE, seed=0, index=i, difficulty=1.0) for i in range(3)]
    for (e_images, e_label), (h_images, h_label) in zip(easy, hard):
        e_contrast, e_noise = _flair_contrast_and_noise(e_images, e_label)
        h_contrast, h_noise = _flair_contrast_and_noise(h_images, h_label)
        assert h_contrast < e_contrast and h_noise > 1.2 * e_noise
    assert sum((h > 0).sum() for _, h in hard) < 0.7 * sum((e > 0).sum() for _, e in easy)


def test_border_label_noise_changes_only_border_voxels():
    label = np.zeros((12, 12, 12), np.uint8)
    label[3:9, 3:9, 3:9] = 2
    label[5:7, 5:7, 5:7] = 4
    noisy = border_label_noise(label, 1.0, np.random.default_rng(0))
    changed = noisy != label
    # a border voxel has a 6-neighbour with another label
    border = np.zeros_like(changed)
    for value in (0, 2, 4):
        border |= binary_dilation(label == value) & (label != value)
    assert changed.any() and not (changed & ~border).any()
    assert set(np.unique(noisy)) == {0, 2, 4}


def test_difficulty_is_recorded_and_checked(tmp_path):
    out = tmp_path / "demo"
    ensure_demo_data(out, num_cases=1, shape=SHAPE, seed=0, difficulty=1.0)
    manifest = json.loads((out / DEMO_MANIFEST).read_text())
    assert manifest["difficulty"] == 1.0 and manifest["difficulty_settings"]["lesion_contrast"] < 1.0
    _, label = make_demo_case(SHAPE, seed=0, index=0, difficulty=1.0)
    assert np.array_equal(np.asarray(nib.load(str(out / "Demo_000" / "Demo_000_seg.nii.gz")).dataobj), label)
    ensure_demo_data(out, num_cases=1, shape=SHAPE, seed=0)  # the default difficulty: regenerated
    assert json.loads((out / DEMO_MANIFEST).read_text())["difficulty"] == 0.0
    with pytest.raises(ValueError, match="difficulty"):
        make_demo_case(SHAPE, difficulty=2.0)


def test_a_frame_centres_each_head_in_air_as_in_a_brats_volume(tmp_path):
    out = tmp_path / "framed"
    make_demo_dataset(str(out), num_cases=1, shape=(24, 24, 24), frame=(40, 36, 28))
    t1 = np.asarray(nib.load(str(out / "Demo_000" / "Demo_000_t1.nii.gz")).dataobj)
    seg = np.asarray(nib.load(str(out / "Demo_000" / "Demo_000_seg.nii.gz")).dataobj)
    assert t1.shape == seg.shape == (40, 36, 28)
    inner = (slice(8, 32), slice(6, 30), slice(2, 26))
    air = np.ones(t1.shape, bool)
    air[inner] = False
    assert not t1[air].any() and not seg[air].any() and t1[inner].any()
    assert ensure_demo_data(str(out), num_cases=1, shape=(24, 24, 24), frame=(40, 36, 28)) == str(out)
    with pytest.raises(ValueError, match="at least the head"):
        make_demo_dataset(str(tmp_path / "bad"), num_cases=1, shape=(30, 24, 24), frame=(28, 36, 28))


def test_a_brats2024_demo_has_the_post_treatment_labels_and_a_cavity_outside_the_tumour(tmp_path):
    out = Path(
        make_demo_dataset(tmp_path / "d24", num_cases=2, shape=(32, 32, 24), seed=0, label_convention="brats2024")
    )
    cases = find_cases(str(out))
    assert [c["case"] for c in cases] == ["BraTS-DEMO-00000-000", "BraTS-DEMO-00001-000"]  # the BraTS 2023+ layout
    assert cases[0]["image"][0].endswith("BraTS-DEMO-00000-000-t1n.nii.gz")
    for index, case in enumerate(cases):
        label = np.asarray(nib.load(str(out / case["label"])).dataobj)
        assert set(np.unique(label)) == {0, 1, 2, 3, 4}
        _, brats = make_demo_case((32, 32, 24), seed=0, index=index)  # the same tumours, in 2018-2021 values
        assert np.array_equal(label[brats > 0], np.where(brats == 4, 3, brats)[brats > 0])
        assert not (brats[label == 4]).any()  # the cavity lies outside every tumour
        t2, t1c = (np.asarray(nib.load(str(out / case["image"][i])).dataobj) for i in (2, 1))
        normal = (label == 0) & (t2 > 0)
        assert t2[label == 4].mean() > t2[normal].mean() and t1c[label == 4].mean() < t1c[normal].mean()  # fluid
    manifest = json.loads((out / DEMO_MANIFEST).read_text())
    assert manifest["labels"]["4"] == "resection cavity" and manifest["label_convention"] == "brats2024"
    with pytest.raises(ValueError, match="label_convention 'msd'.*brats2024"):
        make_demo_dataset(tmp_path / "msd", num_cases=1, shape=(32, 32, 24), label_convention="msd")
