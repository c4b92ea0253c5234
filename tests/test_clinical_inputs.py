"""Clinical inputs: a case stored in any orientation, voxel size or slice spacing, or with its modalities on
different grids, is segmented as the same case stored as BraTS stores it, and written on its own grid.

End to end: tiny weights trained on the demo segment one demo case as stored, then the same case rewritten
(LPS, sagittal, coronal, 0.5 mm in plane, 3 mm slices, FLAIR on another grid). Each written label map is
compared, in the rewritten file's own geometry, with the original's label map carried there by the same
rewrite (permuted, flipped, every third slice, or each 0.5 mm voxel from its nearest 1 mm voxel), and both
with the ground-truth label carried the same way:

* per BraTS region (whole tumour, core, enhancing), the rewritten case's Dice against the label is within
  0.02 of the original's on the same voxels: the task's accuracy is unchanged by how the case was stored;
* where the rewrite keeps every original voxel (orientation, 0.5 mm, FLAIR's grid), the two label maps are
  identical: the canonical frame restores the original voxels and the inverse puts each back (at a 0.5 mm
  voxel halfway between two 1 mm ones nearest neighbour may take either). From 3 mm slices the network sees
  the same slices, but the intensity statistics of a third of the head: Dice between the maps >= 0.95.
"""

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import ROOT
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from bundle.geometry import CanonicalFramed
from bundle.loading import LoadCaseImaged

INFERENCE = str(ROOT / "configs" / "inference.json")
SUFFIXES = ("t1", "t1ce", "t2", "flair", "seg")
CASE = "Demo_001"


def _affine(*columns, origin=(0.0, 0.0, 0.0)):
    affine = np.eye(4)
    affine[:3, :3] = np.stack(columns, axis=1)
    affine[:3, 3] = origin
    return affine


# the canonical frame, on tensors ---------------------------------------------------------------------------------


def test_a_case_already_canonical_passes_through_untouched_and_inverts_to_itself():
    image = MetaTensor(torch.rand(2, 8, 8, 4), affine=torch.as_tensor(_affine([1, 0, 0], [0, 1, 0], [0, 0, 3])))
    frame = Compose([CanonicalFramed("image")])
    out = frame({"image": image})["image"]
    assert out.data_ptr() == image.data_ptr()  # no copy, no resampling: BraTS-like data pays nothing
    restored = Invertd("image", frame, orig_keys="image")({"image": out})["image"]
    assert torch.equal(restored, image)


@pytest.mark.parametrize(
    "columns, axes, flips",
    [
        (([-1, 0, 0], [0, -1, 0], [0, 0, 1]), (0, 1, 2), (0, 1)),  # LPS
        (([0, 1, 0], [0, 0, 1], [1, 0, 0]), (2, 0, 1), ()),  # sagittal: stored axes A, S, R
        (([1, 0, 0], [0, 0, 1], [0, 1, 0]), (0, 2, 1), ()),  # coronal: stored axes R, S, A
    ],
)
def test_any_orientation_is_sliced_along_inferior_superior_and_a_label_map_returns_to_its_grid(columns, axes, flips):
    ras = torch.rand(1, 6, 7, 5)
    stored = ras.flip([a + 1 for a in flips]).permute(0, *[a + 1 for a in np.argsort(axes)])
    image = MetaTensor(stored, affine=torch.as_tensor(_affine(*columns)))
    frame = Compose([CanonicalFramed("image")])
    out = frame({"image": image})
    assert torch.equal(out["image"].as_tensor(), ras)
    out["pred"] = out["image"] > 0.5
    back = Invertd("pred", frame, orig_keys="image", nearest_interp=True)(out)["pred"]
    assert torch.equal(back.as_tensor() > 0, stored > 0.5) and np.allclose(back.affine, image.affine)


def test_in_plane_voxels_are_resampled_to_pixdim_and_the_slice_spacing_is_kept():
    image = MetaTensor(torch.rand(1, 9, 9, 4), affine=torch.as_tensor(_affine([0.5, 0, 0], [0, 0.5, 0], [0, 0, 3])))
    out = CanonicalFramed("image", pixdim=[1.0, 1.0])({"image": image})["image"]
    assert tuple(out.shape) == (1, 5, 5, 4) and np.allclose(np.diag(out.affine)[:3], [1, 1, 3])
    assert torch.allclose(out[:, :, :, :], image[:, ::2, ::2, :], atol=1e-6)  # the voxels that coincide


def test_an_orientation_whose_slices_are_not_axial_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"`orientation` is 'RSA'.*the last I or S.*Fix --orientation"):
        CanonicalFramed("image", axcodes="RSA")


# modalities on different grids ---------------------------------------------------------------------------------


def _case(demo_dir, tmp_path, name=CASE):
    case = tmp_path / "data" / name
    shutil.copytree(demo_dir / name, case)
    return {s: case / f"{name}_{s}.nii.gz" for s in SUFFIXES}


def _item(files):
    return {"image": [str(files[s]) for s in SUFFIXES[:4]], "label": str(files["seg"]), "case": CASE}


def _loader():
    return LoadCaseImaged(["image", "label"], modality_names=["t1", "t1c", "t2", "flair"], reference_modality="t1c")


def test_a_modality_on_another_grid_is_resampled_onto_the_reference_modality(demo_dir, tmp_path):
    files = _case(demo_dir, tmp_path)
    expected = _loader()(_item(files))["image"]
    _store(files["flair"], _half_mm)
    _store(files["flair"], _sagittal)
    loaded = _loader()(_item(files))
    assert loaded["image"].meta["filename_or_obj"] == str(files["t1ce"])  # the grid outputs are written on
    assert torch.allclose(loaded["image"], expected, atol=1e-4)


def test_modalities_that_do_not_overlap_in_space_are_refused_naming_both_files(demo_dir, tmp_path):
    files = _case(demo_dir, tmp_path)
    image = nib.load(files["t2"])
    moved = image.affine.copy()
    moved[2, 3] += 500.0
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), moved), files["t2"])
    with pytest.raises(ValueError) as error:
        _loader()(_item(files))
    text = str(error.value)
    assert f"'{files['t2']}' does not overlap '{files['t1ce']}' (its reference_modality, t1c) in space" in text


# rewriting a stored case ----------------------------------------------------------------------------------------


def _lps(array, affine, label):
    flipped = affine.copy()
    for axis in (0, 1):
        flipped[:3, 3] += affine[:3, axis] * (array.shape[axis] - 1)
        flipped[:3, axis] *= -1
    return array[::-1, ::-1].copy(), flipped


def _permuted(order):
    def rewrite(array, affine, label):
        permuted = affine.copy()
        permuted[:, :3] = affine[:, list(order)]
        return np.ascontiguousarray(array.transpose(order)), permuted

    return rewrite


_sagittal = _permuted((1, 2, 0))  # stored axes A, S, R: slices along the third axis are sagittal
_coronal = _permuted((0, 2, 1))  # stored axes R, S, A: coronal slices


def _half_mm(array, affine, label):
    """0.5 mm in plane on the same field of view: the original voxels at the even indices, and between them
    their mean (images) or the lower neighbour (labels)."""
    for axis in (0, 1):
        array = np.moveaxis(array, axis, 0)
        fine = np.repeat(array, 2, axis=0)[:-1].astype(array.dtype)
        if not label:
            fine[1::2] = (array[:-1] + array[1:]) / 2
        array = np.moveaxis(fine, 0, axis)
    fine_affine = affine.copy()
    fine_affine[:3, :2] *= 0.5
    return np.ascontiguousarray(array), fine_affine


def _thick_slices(array, affine, label):
    thick = affine.copy()
    thick[:3, 2] *= 3
    return np.ascontiguousarray(array[:, :, ::3]), thick


def _store(path, rewrite):
    image = nib.load(str(path))
    label = str(path).endswith("_seg.nii.gz")
    array, affine = rewrite(np.asarray(image.dataobj), image.affine, label)
    nib.save(nib.Nifti1Image(array, affine), str(path))


#: The BraTS regions of a label map written with labels 1 (core), 2 (edema), 4 (enhancing).
REGIONS = {"whole": lambda m: m > 0, "core": lambda m: (m == 1) | (m == 4), "enhancing": lambda m: m == 4}


def _as_written(rewrite, array, affine, written):
    """The original's label map carried onto the rewritten grid by ``rewrite``; where a voxel lies halfway
    between original voxels (0.5 mm from 1 mm), nearest neighbour may take either, so the written map's pick is
    kept when it is one of them."""
    lower, _ = rewrite(array, affine, True)
    if lower.shape == written.shape and rewrite is _half_mm:
        candidates = [lower]
        for axis in (0, 1):
            candidates += [np.roll(c, -1, axis=axis) for c in candidates]  # the upper neighbour along the axis
        tied = np.zeros(written.shape, dtype=bool)
        for candidate in candidates:
            tied |= candidate == written
        return np.where(tied, written, lower)
    return lower


def _dice(a, b):
    return 1.0 if not (a.any() or b.any()) else 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def trained(demo_dir, tiny_bundle):
    """Tiny weights trained on the demo (Dice term, Adam): enough to segment its synthetic tumours."""
    settings = {"max_epochs": 30, "optimizer_name": "adam", "learning_rate": 0.01, "dice_weight": 1.0}
    return tiny_bundle(demo_dir, progress=False, **settings) / "models" / "model.pt"


def _segment(data_dir, out_dir, weights):
    from monai.bundle.scripts import run

    run(
        config_file=INFERENCE,
        dataset_dir=str(data_dir),
        output_dir=str(out_dir),
        ckpt_path=str(weights),
        num_workers=0,
        progress=False,
    )
    return nib.load(str(out_dir / f"{CASE}_seg.nii.gz"))


@pytest.fixture(scope="module")
def original(demo_dir, trained, tmp_path_factory):
    """The label map written for the case as the demo stores it (RAS, 1 mm)."""
    tmp = tmp_path_factory.mktemp("original")
    shutil.copytree(demo_dir / CASE, tmp / "data" / CASE)
    written = _segment(tmp / "data", tmp / "out", trained)
    assert (np.asarray(written.dataobj) > 0).sum() > 20  # the tiny model segments a tumour
    return written


@pytest.mark.slow
@pytest.mark.parametrize(
    "rewrite, which",
    [
        (_lps, "all"),
        (_sagittal, "all"),
        (_coronal, "all"),
        (_half_mm, "all"),
        (_thick_slices, "all"),
        (lambda a, f, label: _sagittal(*_half_mm(a, f, label), label), "flair"),
    ],
    ids=["lps", "sagittal", "coronal", "half_mm_in_plane", "3mm_slices", "flair_on_another_grid"],
)
def test_a_rewritten_case_is_segmented_as_the_original_on_its_own_grid(
    demo_dir, trained, original, tmp_path, rewrite, which
):
    files = _case(demo_dir, tmp_path)
    for suffix in SUFFIXES if which == "all" else ("flair",):
        _store(files[suffix], rewrite)
    written = _segment(tmp_path / "data", tmp_path / "out", trained)

    grid = nib.load(str(files["t1ce"]))  # the reference modality: the grid of the case
    assert written.shape == grid.shape and np.allclose(written.affine, grid.affine)
    got = np.asarray(written.dataobj)
    label = np.asarray(nib.load(str(files["seg"])).dataobj)
    if which == "all":
        expected = _as_written(rewrite, np.asarray(original.dataobj), original.affine, got)
    else:
        expected = np.asarray(original.dataobj)
    for name, region in REGIONS.items():  # within 0.02 of the original's Dice against the label, on the same voxels
        change = _dice(region(got), region(label)) - _dice(region(expected), region(label))
        assert abs(change) <= 0.02, f"{name}: Dice against the label changed by {change:+.3f}"
    if rewrite is _thick_slices:  # the same slices, but the head's statistics come from a third of them
        assert all(_dice(region(got), region(expected)) >= 0.95 for region in REGIONS.values())
    else:  # resampled only where voxels coincide: the same label map
        np.testing.assert_array_equal(got, expected)
