"""Sliding-slice inference end to end: ``configs/inference.json`` gives one 3D label map per case, on the input's grid.

The 2D segmentor runs over every axial slice (Xue et al. 2018, section 3) after the training preprocessing;
the crop or pad that fits a slice to the network is undone, so the saved map has the input's shape and affine.
"""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import ROOT, messages, stack_to_4d
from monai.bundle import ConfigParser
from monai.bundle.scripts import run
from monai.data import ITKWriter, NibabelWriter

from bundle.constants import MODALITIES, MSD_MODALITIES
from bundle.datalist import inference_datalist
from bundle.demo import make_demo_dataset
from bundle.intensity import ForegroundNormalized, head_mask

INFERENCE = str(ROOT / "configs" / "inference.json")
SHAPE = (40, 37, 24)  # 37 pads to 48 unevenly (5 + 6), like 155 BraTS slices would
TINY = {"features": [4, 8, 16, 32], "num_workers": 0, "sw_batch_size": 7}
# the crop mode's two centre crops, tiny; odd margins (40 -> 31, 24 -> 15) and an odd pad (21 -> 32)
CROP = {"crop_size": [31, 29, 15], "patch_size": [24, 21]}
REGION_LABELS = [2, 1, 4]  # whole tumour, core, enhancing painted in order (BraTS 2018-2021 values)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    make_demo_dataset(str(out), num_cases=2, shape=SHAPE, seed=3)
    return out


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory):
    """A bundle root with random segmentor weights in models/model.pt (geometry does not need training)."""
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    (root / "models").mkdir()
    torch.save(_network().state_dict(), root / "models" / "model.pt")
    return root


def _network():
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update({"features": TINY["features"]})
    return parser.get_parsed_content("network_def")


def _infer(root, dataset_dir, output_dir, **overrides):
    run(
        config_file=INFERENCE,
        bundle_root=str(root),
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        **{**TINY, **overrides},
    )


def _case_files(demo_dir, case):
    suffix = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}
    return [demo_dir / case / f"{case}_{suffix[m]}.nii.gz" for m in MODALITIES]


def _centre_start(size, roi):
    """Where MONAI's centre crop starts (centre ``size // 2``, so odd margins leave the extra voxel at the start)."""
    return max(size // 2 - roi // 2, 0)


def _reference(demo_dir, case, spatial_fit, weights):
    """The expected label map, computed without the bundle's pipeline: normalise, crop, pad, slices, undo.

    Returns ``(label map, ambiguous, box)``: ``ambiguous`` marks voxels whose logits are within rounding of the
    threshold in some region, where a different batching of slices may legitimately flip the result; ``box``
    is the part of the volume the network saw.
    """
    volumes = [nib.load(str(f)).get_fdata(dtype=np.float32) for f in _case_files(demo_dir, case)]
    image = np.stack([volumes[MODALITIES.index(m)] for m in ("t1c", "t2", "flair")])
    box = [slice(0, s) for s in SHAPE]
    image = ForegroundNormalized("image").normalize(image)  # the whole volume, before any crop
    if spatial_fit == "crop":
        first = [slice(_centre_start(s, r), _centre_start(s, r) + r) for s, r in zip(SHAPE, CROP["crop_size"])]
        image = image[(slice(None), *first)]
        second_roi = [*CROP["patch_size"], CROP["crop_size"][2]]
        second = [slice(_centre_start(s, r), _centre_start(s, r) + r) for s, r in zip(image.shape[1:], second_roi)]
        image = image[(slice(None), *second)]
        box = [slice(a.start + b.start, a.start + b.stop) for a, b in zip(first, second)]
    # symmetric pad of the two in-plane axes to multiples of 16 (the tiny network has 4 levels)
    h, w = image.shape[1:3]
    pad_h, pad_w = -h % 16, -w % 16
    padded = np.pad(image, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    network = _network()
    network.load_state_dict(torch.load(weights))
    network.eval()
    with torch.no_grad():
        slices = torch.as_tensor(np.moveaxis(padded, -1, 0))  # (D, C, H, W): axial slices as a batch
        logits = network(slices).numpy()
    logits = np.moveaxis(logits, 0, -1)[:, pad_h // 2 : pad_h // 2 + h, pad_w // 2 : pad_w // 2 + w]
    regions = np.zeros((3, *SHAPE), bool)
    ambiguous = np.zeros(SHAPE, bool)
    regions[(slice(None), *box)] = logits >= 0  # sigmoid(x) >= 0.5
    ambiguous[tuple(box)] = (np.abs(logits) < 1e-4).any(0)
    label = np.zeros(SHAPE, np.uint8)
    for r, value in enumerate(REGION_LABELS):
        label[regions[r]] = value
    return label, ambiguous, tuple(box)


@pytest.mark.parametrize("spatial_fit", ["pad", "crop"])
def test_label_maps_come_back_in_the_input_geometry(tmp_path, demo_dir, bundle_root, spatial_fit):
    out = tmp_path / "out"
    _infer(bundle_root, demo_dir, out, spatial_fit=spatial_fit, crop_foreground=False, head_guard=False, **CROP)
    assert sorted(os.listdir(out)) == ["Demo_000_seg.nii.gz", "Demo_001_seg.nii.gz"]
    for case in ("Demo_000", "Demo_001"):
        saved = nib.load(str(out / f"{case}_seg.nii.gz"))
        source = nib.load(str(_case_files(demo_dir, case)[0]))
        assert saved.shape == source.shape == SHAPE
        np.testing.assert_allclose(saved.affine, source.affine, atol=1e-5)
        assert saved.header.get_xyzt_units()[0] == source.header.get_xyzt_units()[0] == "mm"
        assert saved.get_data_dtype() == np.uint8
        label = np.asarray(saved.dataobj)
        assert set(np.unique(label)) <= {0, 1, 2, 4}

        expected, ambiguous, box = _reference(demo_dir, case, spatial_fit, bundle_root / "models" / "model.pt")
        assert ambiguous.mean() < 0.01
        assert len(np.unique(expected[box])) > 1  # a non-constant map, so a shifted one would not match
        np.testing.assert_array_equal(label[~ambiguous], expected[~ambiguous])
        if spatial_fit == "crop":  # zeros outside the paper's centre crop
            outside = np.ones(SHAPE, bool)
            outside[box] = False
            assert outside.any() and not label[outside].any()


def test_threshold_key_and_crop_box(tmp_path, demo_dir, bundle_root):
    # every sigmoid output is >= 1e-6 here: each region fills exactly the processed crop, so the label is 4 there
    out = tmp_path / "out"
    _infer(
        bundle_root, demo_dir, out, spatial_fit="crop", threshold=1e-6, crop_foreground=False, head_guard=False, **CROP
    )
    label = np.asarray(nib.load(str(out / "Demo_000_seg.nii.gz")).dataobj)
    expected = np.zeros(SHAPE, np.uint8)
    # first crop 40x37x24 -> 31x29x15 starts at (5, 4, 5); second 31x29 -> 24x21 at (3, 4): (8, 8, 5) in all
    expected[8:32, 8:29, 5:20] = 4
    np.testing.assert_array_equal(label, expected)


# A 4-level segmentor's output at a voxel depends on the input up to 55 voxels away (measured by gradients):
# with a margin at least that wide, the foreground crop changes nothing inside the head.
RECEPTIVE_RADIUS = 64


def _in_air(demo_dir, case, folder, frame=(200, 180, 32), offset=(120, 20, 5), blank=False):
    """``case`` placed in a larger frame of air (zeros), as a BraTS brain sits in its 240x240x155 frame."""
    inner = tuple(slice(o, o + s) for o, s in zip(offset, SHAPE))
    (folder / case).mkdir(parents=True)
    for path in _case_files(demo_dir, case):
        image = nib.load(str(path))
        volume = np.zeros(frame, np.float32)
        if not blank:
            volume[inner] = image.get_fdata(dtype=np.float32)
        nib.save(nib.Nifti1Image(volume, image.affine), str(folder / case / path.name))
    return folder


def test_foreground_crop_equals_the_full_frame_inside_the_head_and_is_background_outside(
    tmp_path, demo_dir, bundle_root
):
    data = _in_air(demo_dir, "Demo_000", tmp_path / "air")
    _infer(bundle_root, data, tmp_path / "full", crop_foreground=False, head_guard=False)
    _infer(
        bundle_root,
        data,
        tmp_path / "cropped",
        foreground_margin=RECEPTIVE_RADIUS,
        slice_margin=RECEPTIVE_RADIUS,
        head_guard=False,
    )
    full = np.asarray(nib.load(str(tmp_path / "full" / "Demo_000_seg.nii.gz")).dataobj)
    cropped = np.asarray(nib.load(str(tmp_path / "cropped" / "Demo_000_seg.nii.gz")).dataobj)
    head = nib.load(str(data / "Demo_000" / "Demo_000_t1.nii.gz")).get_fdata() != 0
    assert cropped.shape == full.shape == head.shape
    assert len(np.unique(full[head])) > 1 and full[~head].any()  # the full frame labels some air too
    np.testing.assert_array_equal(cropped[head], full[head])
    # nothing computed outside the head's slices, nor in plane beyond its box plus the margin and the 16-voxel grid
    box = np.zeros(head.shape, bool)
    (h0, w0, d0), (h1, w1, d1) = np.argwhere(head).min(0), np.argwhere(head).max(0) + 1
    reach = RECEPTIVE_RADIUS + 16
    box[max(h0 - reach, 0) : h1 + reach, max(w0 - reach, 0) : w1 + reach, d0:d1] = True
    assert box[:, :, d0].sum() < 0.7 * box[:, :, d0].size  # this test's frame has air beyond the reach
    assert not cropped[~box].any()


def test_the_head_guard_labels_nothing_outside_the_head_and_changes_nothing_inside(tmp_path, demo_dir, bundle_root):
    data = _in_air(demo_dir, "Demo_000", tmp_path / "air")
    _infer(bundle_root, data, tmp_path / "raw", crop_foreground=False, head_guard=False)
    _infer(bundle_root, data, tmp_path / "guarded", crop_foreground=False)  # head_guard is on by default
    raw = np.asarray(nib.load(str(tmp_path / "raw" / "Demo_000_seg.nii.gz")).dataobj)
    guarded = np.asarray(nib.load(str(tmp_path / "guarded" / "Demo_000_seg.nii.gz")).dataobj)
    # the head the normalisation finds in the selected modalities (the guard's mask)
    head = head_mask(np.stack([nib.load(str(f)).get_fdata(dtype=np.float32) for f in _case_files(data, "Demo_000")]))
    assert raw[~head].any()  # this untrained network paints the air
    assert not guarded[~head].any()
    np.testing.assert_array_equal(guarded[head], raw[head])


def test_a_case_with_no_foreground_gives_an_all_background_map(tmp_path, demo_dir, bundle_root):
    data = _in_air(demo_dir, "Demo_000", tmp_path / "blank", frame=(48, 40, 6), offset=(0, 0, 0), blank=True)
    _infer(bundle_root, data, tmp_path / "out", allow_constant_modality=True)  # an empty case is refused by default
    saved = nib.load(str(tmp_path / "out" / "Demo_000_seg.nii.gz"))
    assert saved.shape == (48, 40, 6) and saved.get_data_dtype() == np.uint8
    assert not np.asarray(saved.dataobj).any()


def test_region_output_format_holds_the_painted_regions(tmp_path, demo_dir, bundle_root):
    labels_out, regions_out = tmp_path / "labels", tmp_path / "regions"
    _infer(bundle_root, demo_dir, labels_out)
    _infer(bundle_root, demo_dir, regions_out, output_format="regions")
    regions = nib.load(str(regions_out / "Demo_000_seg.nii.gz"))
    assert regions.shape == (*SHAPE, 3) and regions.get_data_dtype() == np.uint8
    maps = np.asarray(regions.dataobj)
    assert set(np.unique(maps)) <= {0, 1}
    painted = np.zeros(SHAPE, np.uint8)
    for r, value in enumerate(REGION_LABELS):
        painted[maps[..., r] > 0] = value
    np.testing.assert_array_equal(painted, np.asarray(nib.load(str(labels_out / "Demo_000_seg.nii.gz")).dataobj))
    with pytest.raises(Exception) as error:
        _infer(bundle_root, demo_dir, tmp_path / "bad", output_format="probabilities")
    assert "probabilities" in messages(error.value)


def test_a_4d_single_file_case_gives_the_same_map_as_separate_files(tmp_path, demo_dir, bundle_root):
    files = _case_files(demo_dir, "Demo_000")
    msd = tmp_path / "msd"
    # MSD Task01 / MONAI Label layout: one (H, W, D, 4) file, channels flair, t1, t1c, t2
    stack_to_4d([files[MODALITIES.index(m)] for m in MSD_MODALITIES], msd / "Demo_000.nii.gz")
    _infer(bundle_root, demo_dir, tmp_path / "separate")
    _infer(bundle_root, msd / "Demo_000.nii.gz", tmp_path / "single")  # one file as dataset_dir
    _infer(bundle_root, msd, tmp_path / "folder")  # a folder of 4D files
    separate = nib.load(str(tmp_path / "separate" / "Demo_000_seg.nii.gz"))
    for name in ("single", "folder"):
        other = nib.load(str(tmp_path / name / "Demo_000_seg.nii.gz"))
        assert other.shape == SHAPE
        np.testing.assert_allclose(other.affine, separate.affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(other.dataobj), np.asarray(separate.dataobj))


@pytest.mark.slow
def test_brats2015_metaimage_case_keeps_its_geometry(tmp_path, demo_dir, bundle_root):
    import itk
    from monai.transforms import LoadImage

    subject = tmp_path / "BRATS2015" / "HGG" / "brats_tcia_pat123_0001"
    names = {"t1": "MR_T1", "t1c": "MR_T1c", "t2": "MR_T2", "flair": "MR_Flair"}
    for i, (modality, path) in enumerate(zip(MODALITIES, _case_files(demo_dir, "Demo_000"))):
        volume = nib.load(str(path)).get_fdata(dtype=np.float32)
        image = itk.image_from_array(np.ascontiguousarray(np.transpose(volume, (2, 1, 0))))  # ITK arrays are z, y, x
        image.SetSpacing((0.9, 1.1, 1.3))
        image.SetOrigin((10.0, -20.0, 5.0))
        folder = subject / f"VSD.Brain.XX.O.{names[modality]}.{1000 + i}"
        folder.mkdir(parents=True)
        itk.imwrite(image, str(folder / f"{folder.name}.mha"))
    _infer(bundle_root, tmp_path / "BRATS2015", tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["brats_tcia_pat123_0001_seg.nii.gz"]
    saved = nib.load(str(tmp_path / "out" / "brats_tcia_pat123_0001_seg.nii.gz"))
    source = LoadImage(image_only=True)(str(next(subject.glob("*MR_T1.*/*.mha"))))
    assert saved.shape == tuple(source.shape) == SHAPE
    np.testing.assert_allclose(saved.affine, np.asarray(source.affine), atol=1e-5)


def _all_files(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")) if Path(folder).exists() else []


def test_a_failing_case_leaves_earlier_results_whole_and_no_partial_file(tmp_path, demo_dir, bundle_root):
    broken = tmp_path / "broken.nii.gz"  # a 2-channel 4D file: rejected when its modalities are selected
    nib.save(nib.Nifti1Image(np.ones((*SHAPE, 2), np.float32), np.eye(4)), str(broken))
    datalist = {
        "testing": [
            {"image": [str(f) for f in _case_files(demo_dir, "Demo_000")], "case": "good"},
            {"image": str(broken), "case": "bad"},
        ]
    }
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    out = tmp_path / "out"
    with pytest.raises(Exception) as error:
        _infer(bundle_root, "", out, data_list_file_path=str(tmp_path / "datalist.json"), progress=False)
    assert "broken.nii.gz" in messages(error.value)
    assert _all_files(out) == ["good_seg.nii.gz"]
    assert nib.load(str(out / "good_seg.nii.gz")).get_fdata().shape == SHAPE  # complete and readable


def test_an_interrupted_write_leaves_no_file_and_keeps_the_previous_result(
    tmp_path, demo_dir, bundle_root, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()
    previous = out / "Demo_000_seg.nii.gz"
    previous.write_bytes(b"an earlier, complete result")

    def write_half_then_fail(self, filename, verbose=False, **kwargs):
        Path(filename).write_bytes(b"half a NIfTI")
        raise OSError("disk full")

    def save_half_then_fail(image, filename, **kwargs):
        Path(filename).write_bytes(b"half a NIfTI")
        raise OSError("disk full")

    monkeypatch.setattr(NibabelWriter, "write", write_half_then_fail)
    monkeypatch.setattr(ITKWriter, "write", write_half_then_fail)
    monkeypatch.setattr("bundle.saving.nib.save", save_half_then_fail)  # label maps with a NIfTI source
    with pytest.raises(Exception) as error:
        _infer(bundle_root, demo_dir, out, progress=False)
    assert "disk full" in messages(error.value)
    assert _all_files(out) == ["Demo_000_seg.nii.gz"]
    assert previous.read_bytes() == b"an earlier, complete result"


def test_missing_or_mismatched_weights_say_what_to_do(tmp_path, demo_dir, bundle_root):
    with pytest.raises(Exception) as error:
        _infer(tmp_path, demo_dir, tmp_path / "out")
    assert "Train first" in messages(error.value) and "model.pt" in messages(error.value)
    # weights of a [4, 8, 16, 32] segmentor, run without the matching --features override
    with pytest.raises(Exception) as error:
        _infer(bundle_root, demo_dir, tmp_path / "out", features=[8, 16, 32, 64])
    assert "features [4, 8, 16, 32] and 3 input channel(s)" in messages(error.value)
    assert not (tmp_path / "out").exists()


def test_inference_datalist_finds_cases_in_every_layout(tmp_path, demo_dir):
    items = inference_datalist(str(demo_dir))
    assert [item["case"] for item in items] == ["Demo_000", "Demo_001"]
    assert items[0]["image"] == [str(f.resolve()) for f in _case_files(demo_dir, "Demo_000")]

    folder = tmp_path / "msd"
    for case in ("BRATS_002", "BRATS_001"):
        stack_to_4d(_case_files(demo_dir, "Demo_000"), folder / f"{case}.nii.gz")
    (folder / "dataset.json").write_text("{}")
    assert [(i["case"], Path(i["image"]).name) for i in inference_datalist(str(folder))] == [
        ("BRATS_001", "BRATS_001.nii.gz"),
        ("BRATS_002", "BRATS_002.nii.gz"),
    ]
    assert inference_datalist(str(folder / "BRATS_002.nii.gz")) == [
        {"image": str((folder / "BRATS_002.nii.gz").resolve()), "case": "BRATS_002"}
    ]

    # a datalist file: relative paths, cases named after their files when the items do not say
    datalist = {"testing": [{"image": "msd/BRATS_001.nii.gz"}, "msd/BRATS_002.nii.gz"]}
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    items = inference_datalist(str(tmp_path), str(tmp_path / "list.json"))
    assert [item["case"] for item in items] == ["BRATS_001", "BRATS_002"]
    datalist["testing"].append({"image": "msd/BRATS_001.nii.gz"})
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    with pytest.raises(ValueError, match="both case 'BRATS_001'"):
        inference_datalist(str(tmp_path), str(tmp_path / "list.json"))


def test_inference_datalist_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inference_datalist(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=f"no case found in '{tmp_path / 'empty'}'"):
        inference_datalist(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="nothing to segment"):
        inference_datalist("")


def test_slices_cut_to_their_own_foreground_give_the_volume_crops_labels(tmp_path, demo_dir, tiny_bundle):
    # crop_slices (the CPU default) against the volume crop alone, a trained segmentor, a head in a frame of air
    root = tiny_bundle(demo_dir)
    data = _in_air(demo_dir, "Demo_000", tmp_path / "air")
    weights = str(root / "models" / "model.pt")
    _infer(root, data, tmp_path / "slices", ckpt_path=weights, num_workers=4)  # one case: the loader runs inline
    _infer(root, data, tmp_path / "volume", ckpt_path=weights, crop_slices=False)
    slices = np.asarray(nib.load(str(tmp_path / "slices" / "Demo_000_seg.nii.gz")).dataobj)
    volume = np.asarray(nib.load(str(tmp_path / "volume" / "Demo_000_seg.nii.gz")).dataobj)
    assert volume.any()
    np.testing.assert_array_equal(slices, volume)


def test_the_loader_starts_no_more_processes_than_cases_after_the_first(tmp_path, demo_dir):
    # one case: no loader process to start (it would only load that case while the network waits)
    single = _in_air(demo_dir, "Demo_000", tmp_path / "one", frame=(48, 40, 6), offset=(0, 0, 0), blank=True)
    counts = {}
    for dataset_dir in (single, demo_dir):
        parser = ConfigParser()
        parser.read_config(INFERENCE)
        parser.update({"bundle_root": str(ROOT), "dataset_dir": str(dataset_dir), "num_workers": 4})
        counts[len(parser.get_parsed_content("dataset"))] = parser.get_parsed_content("dataloader").num_workers
    assert counts[1] == 0 and len(counts) == 2
    assert all(workers == min(4, cases - 1) >= 1 for cases, workers in counts.items() if cases > 1)
