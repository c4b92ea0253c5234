"""``scripts/submit_brats.py``: a folder of cases in, one ``<case id>.nii.gz`` per case out, on the case's own grid,
in the label values of the chosen BraTS year, zipped; a case that would fail the challenge's check is refused by name.
"""

import shutil
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import load_script

from bundle.checkpoints import write_recipe
from bundle.networks import SegANSegmentor

submit = load_script("submit_brats")
FEATURES = (4, 8, 16, 32)
SUFFIX_2021 = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}


@pytest.fixture(scope="module")
def brats_weights(tmp_path_factory):
    """Untrained weights with the recipe of a BraTS 2013-2021 training (what matters here is where outputs go)."""
    model = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.manual_seed(0)
    torch.save(SegANSegmentor(features=FEATURES).state_dict(), model)
    write_recipe(str(model), {"features": list(FEATURES), "skip": "cat", "label_convention": "brats"})
    return model


def _brats2021_case(demo_dir, folder, case="BraTS2021_00000"):
    """Demo case ``Demo_000`` renamed as a BraTS 2021 case, without its label (as validation cases come)."""
    (folder / case).mkdir(parents=True)
    for suffix in SUFFIX_2021.values():
        shutil.copy(demo_dir / "Demo_000" / f"Demo_000_{suffix}.nii.gz", folder / case / f"{case}_{suffix}.nii.gz")
    return folder / case


@pytest.mark.slow
def test_a_brats2024_submission_is_one_file_per_case_on_its_grid_zipped(
    post_treatment_dir, post_treatment_bundle, tmp_path, capsys
):
    archive = submit.main(
        input_dir=str(post_treatment_dir),
        output_dir=str(tmp_path / "submission"),
        label_convention="brats2024",
        ckpt_path=str(post_treatment_bundle / "models" / "model.pt"),
        num_workers=0,
        progress=False,
    )
    cases = [f"BraTS-DEMO-{i:05d}-000" for i in range(4)]
    assert zipfile.ZipFile(archive).namelist() == [f"{case}.nii.gz" for case in cases]  # at the top level
    for case in cases:
        written = nib.load(str(tmp_path / "submission" / f"{case}.nii.gz"))
        source = nib.load(str(post_treatment_dir / case / f"{case}-t2f.nii.gz"))
        assert written.shape == source.shape and np.array_equal(written.affine, source.affine)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 3, 4}
    out = capsys.readouterr().out
    assert "4 case(s)" in out and "BraTS-DEMO-00003-000.nii.gz: 40x40x24" in out and "wrote" in out


@pytest.mark.slow
def test_a_brats2021_submission_is_named_as_2021_cases(demo_dir, brats_weights, tmp_path):
    _brats2021_case(demo_dir, tmp_path / "in")
    archive = submit.main(
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        "brats",
        ckpt_path=str(brats_weights),
        num_workers=0,
        progress=False,
    )
    assert zipfile.ZipFile(archive).namelist() == ["BraTS2021_00000.nii.gz"]
    written = np.asarray(nib.load(str(tmp_path / "out" / "BraTS2021_00000.nii.gz")).dataobj)
    assert set(np.unique(written)) <= {0, 1, 2, 4}


def test_a_case_whose_modalities_disagree_is_refused_by_name_before_inference(
    demo_dir, brats_weights, tmp_path, monkeypatch
):
    case = _brats2021_case(demo_dir, tmp_path / "in")
    t2 = nib.load(str(case / "BraTS2021_00000_t2.nii.gz"))
    shifted = t2.affine.copy()
    shifted[0, 3] += 1.0
    nib.save(nib.Nifti1Image(np.asarray(t2.dataobj), shifted), str(case / "BraTS2021_00000_t2.nii.gz"))
    monkeypatch.setattr(submit, "run", lambda **_: pytest.fail("inference ran"))
    with pytest.raises(ValueError, match=r"case 'BraTS2021_00000': .*_t2\.nii\.gz' has origin"):
        submit.main(str(tmp_path / "in"), str(tmp_path / "out"), "brats", ckpt_path=str(brats_weights))


def test_a_prediction_off_the_case_grid_is_refused_by_name_and_removed(demo_dir, brats_weights, tmp_path, monkeypatch):
    _brats2021_case(demo_dir, tmp_path / "in")

    def off_grid(**kwargs):  # an inference that wrote the label map one voxel short on the slice axis
        image = nib.load(str(tmp_path / "in" / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz"))
        label = np.zeros(image.shape[:2] + (image.shape[2] - 1,), np.uint8)
        nib.save(nib.Nifti1Image(label, image.affine), f"{kwargs['output_dir']}/BraTS2021_00000.nii.gz")

    (tmp_path / "out").mkdir()
    monkeypatch.setattr(submit, "run", off_grid)
    with pytest.raises(
        ValueError, match=r"case 'BraTS2021_00000': .* has shape \[40, 40, 23\] instead of \[40, 40, 24\]"
    ):
        submit.main(str(tmp_path / "in"), str(tmp_path / "out"), "brats", ckpt_path=str(brats_weights))
    assert not any((tmp_path / "out").iterdir()) and not (tmp_path / "out.zip").exists()


def test_weights_of_another_year_and_an_unknown_year_are_refused(brats_weights, tmp_path):
    with pytest.raises(
        ValueError, match="trained for label_convention 'brats', not 'brats2024'.*--label_convention brats"
    ):
        submit.main(str(tmp_path), str(tmp_path / "out"), "brats2024", ckpt_path=str(brats_weights))
    with pytest.raises(ValueError, match="brats, brats2023, brats2024"):
        submit.main(str(tmp_path), str(tmp_path / "out"), "brats2019", ckpt_path=str(brats_weights))


def test_grids_differing_in_spacing_or_direction_are_told_apart():
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    assert submit.grid_difference((2, 2, 2), affine, (2, 2, 2), affine) == ""
    assert submit.grid_difference((2, 2, 2), np.diag([1.0, 1.0, 2.0, 1.0]), (2, 2, 2), affine).startswith("spacing")
    assert submit.grid_difference((2, 2, 2), np.diag([-1.0, 1.0, 1.0, 1.0]), (2, 2, 2), affine).startswith("direction")
