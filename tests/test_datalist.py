"""Datalists: BraTS cases are found in both layouts and split 9:1 per grade (Xue et al. 2018, section 3)."""

import json
import os
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import load_script

from bundle.cases import find_cases
from bundle.constants import MODALITIES
from bundle.datalist import build_datalist, load_datalist, split_cases

# ITK's SWIG wrappers warn on import under Python >= 3.11; unrelated to what is tested here
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")

# fill value of each BraTS 2015 modality folder, so a test can tell by content which file is which
MHA_VALUES = {"MR_T1": 1, "MR_T1c": 2, "MR_T2": 3, "MR_Flair": 4, "OT": 9}


def _write_brats2015_subject(root, grade_dir, subject, uid, label="3more"):
    import itk

    for i, (modality, value) in enumerate(MHA_VALUES.items()):
        if modality == "OT" and label is None:
            continue
        prefix = f"VSD.Brain_{label}" if modality == "OT" else "VSD.Brain"
        name = f"{prefix}.XX.O.{modality}.{uid + i}"
        folder = root / grade_dir / subject / name
        folder.mkdir(parents=True)
        itk.imwrite(itk.image_from_array(np.full((4, 8, 8), value, np.int16)), str(folder / f"{name}.mha"))


@pytest.fixture(scope="module")
def brats2015(tmp_path_factory):
    """A BRATS 2015 training tree in miniature: 10 HGG + 3 LGG subjects of 8x8x4 voxels, plus one test subject."""
    root = tmp_path_factory.mktemp("BRATS2015")
    for i in range(10):
        _write_brats2015_subject(root, "HGG", f"brats_2013_pat{i:04d}_1", 1000 + 10 * i, "3more" if i % 2 else "2more")
    for i in range(3):
        _write_brats2015_subject(root, "LGG", f"brats_tcia_pat{i:03d}_1", 2000 + 10 * i)
    _write_brats2015_subject(root, "Testing/HGG_LGG", "brats_2013_pat0301_1", 3000, label=None)
    return root


def _write_nifti_case(folder, case, suffixes=("t1", "t1ce", "t2", "flair", "seg")):
    folder.mkdir(parents=True)
    for value, suffix in enumerate(suffixes, start=1):
        image = nib.Nifti1Image(np.full((8, 8, 4), value, np.uint8), np.eye(4))
        nib.save(image, str(folder / f"{case}_{suffix}.nii.gz"))


@pytest.fixture
def brats2018(tmp_path):
    """BraTS 2018 NIfTI layout with grade folders: 4 HGG + 2 LGG cases."""
    for grade, n in (("HGG", 4), ("LGG", 2)):
        for i in range(n):
            case = f"Brats18_{grade}_{i}_1"
            _write_nifti_case(tmp_path / grade / case, case)
    return tmp_path


def test_brats2015_cases_in_modality_order(brats2015):
    cases = find_cases(brats2015)
    assert [c["case"] for c in cases] == sorted(c["case"] for c in cases)
    assert len(cases) == 13
    for case in cases:
        for path, token in zip(case["image"], ("MR_T1.", "MR_T1c.", "MR_T2.", "MR_Flair.")):
            assert f".{token}" in Path(path).name
        assert ".OT." in case["label"]
        assert all(not os.path.isabs(p) and "\\" not in p for p in (*case["image"], case["label"]))
        assert (brats2015 / case["image"][0]).is_file()
    assert {c["grade"] for c in cases if c["case"].startswith("brats_2013")} == {"HGG"}
    assert {c["grade"] for c in cases if c["case"].startswith("brats_tcia")} == {"LGG"}


def test_brats2015_t1_is_not_t1c(brats2015):
    import itk

    case = find_cases(brats2015)[0]
    values = [int(itk.array_view_from_image(itk.imread(str(brats2015 / p)))[0, 0, 0]) for p in case["image"]]
    assert values == [MHA_VALUES[m] for m in ("MR_T1", "MR_T1c", "MR_T2", "MR_Flair")]


def test_test_subjects_only_when_labels_not_required(brats2015):
    assert "brats_2013_pat0301_1" not in {c["case"] for c in find_cases(brats2015)}
    unlabelled = [c for c in find_cases(brats2015, require_label=False) if "label" not in c]
    assert [(c["case"], c["grade"]) for c in unlabelled] == [("brats_2013_pat0301_1", None)]


def test_split_is_per_grade_deterministic_and_complete(brats2015):
    cases = find_cases(brats2015)
    train, val = split_cases(cases, val_fraction=0.1, seed=0)
    assert {c["case"] for c in train} | {c["case"] for c in val} == {c["case"] for c in cases}
    assert not {c["case"] for c in train} & {c["case"] for c in val}
    assert sorted(c["grade"] for c in val) == ["HGG", "LGG"]  # 10 HGG -> 1, 3 LGG -> at least 1
    shuffled = list(cases)
    random.Random(1).shuffle(shuffled)
    assert split_cases(shuffled, 0.1, 0) == (train, val)
    assert build_datalist(brats2015) == {"training": train, "validation": val}


def test_split_counts_match_brats2015():
    cases = [{"image": [f"h{i}"], "case": f"h{i:03d}", "grade": "HGG"} for i in range(220)]
    cases += [{"image": [f"l{i}"], "case": f"l{i:03d}", "grade": "LGG"} for i in range(54)]
    train, val = split_cases(cases, 0.1, seed=0)
    assert (len(train), len(val)) == (247, 27)
    assert sum(c["grade"] == "LGG" for c in val) == 5
    assert split_cases(cases, 0.1, seed=1)[1] != val


def test_brats2018_nifti_layout(brats2018):
    cases = find_cases(brats2018)
    assert [c["grade"] for c in cases] == ["HGG"] * 4 + ["LGG"] * 2
    case = cases[0]
    assert case["image"] == [f"HGG/{case['case']}/{case['case']}_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair")]
    assert case["label"] == f"HGG/{case['case']}/{case['case']}_seg.nii.gz"
    values = [int(nib.load(str(brats2018 / p)).get_fdata()[0, 0, 0]) for p in case["image"]]
    assert values == [{"t1": 1, "t1c": 2, "t2": 3, "flair": 4}[m] for m in MODALITIES]  # t1ce is our t1c
    _, val = split_cases(cases)
    assert sorted(c["grade"] for c in val) == ["HGG", "LGG"]


def test_brats2020_layout_has_no_grade(tmp_path):
    for i in range(3):
        _write_nifti_case(tmp_path / f"BraTS20_Training_{i:03d}", f"BraTS20_Training_{i:03d}")
    cases = find_cases(tmp_path)
    assert [c["grade"] for c in cases] == [None] * 3
    train, val = split_cases(cases)
    assert (len(train), len(val)) == (2, 1)


def test_load_datalist_resolves_paths(brats2018, tmp_path_factory):
    list_file = tmp_path_factory.mktemp("lists") / "datalist.json"
    datalist = build_datalist(brats2018)
    absolute = str(brats2018 / datalist["training"][0]["label"])
    datalist["training"][0]["label"] = absolute
    second = datalist["training"][1]
    datalist["training"].append({"image": second["image"][0], "label": second["label"]})  # a 4D-style single file
    list_file.write_text(json.dumps(datalist))
    items = load_datalist(str(list_file), str(brats2018), "training")
    assert len(items) == len(datalist["training"])
    assert items[0]["label"] == absolute
    for item in items:
        images = item["image"] if isinstance(item["image"], list) else [item["image"]]
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in (*images, item["label"]))
    assert isinstance(items[-1]["image"], str)  # a single 4D file stays one path
    assert items[0]["grade"] == "HGG"


def test_load_datalist_builds_in_memory_without_file(tmp_path):
    for i in range(4):
        _write_nifti_case(tmp_path / f"case{i}", f"case{i}")
    for file_path in (None, ""):
        train = load_datalist(file_path, str(tmp_path), "training")
        val = load_datalist(file_path, str(tmp_path), "validation")
        assert len(train) == 3 and len(val) == 1
        assert all(os.path.isabs(p) for p in train[0]["image"])
        assert train[0]["grade"] == ""  # MONAI's collate cannot batch None


def test_cli_writes_json(brats2015, tmp_path, capsys):
    output = tmp_path / "lists" / "brats2015.json"
    load_script("prepare_datalist").main(dataset_dir=str(brats2015), output=str(output), val_fraction=0.1, seed=0)
    assert json.loads(output.read_text()) == build_datalist(brats2015)
    assert os.listdir(output.parent) == ["brats2015.json"]  # no temporary file left behind
    printed = capsys.readouterr().out
    assert "HGG 10" in printed and "LGG 3" in printed and "validation: 2" in printed


def test_missing_dataset_dir_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_cases(tmp_path / "nowhere")


def test_empty_dataset_dir_lists_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="MetaImage.*NIfTI"):
        find_cases(tmp_path)


def test_missing_modality_names_case_and_modality(tmp_path):
    _write_nifti_case(tmp_path / "Brats18_x", "Brats18_x", suffixes=("t1", "t1ce", "t2", "seg"))
    with pytest.raises(ValueError, match="Brats18_x.*flair"):
        find_cases(tmp_path)


def test_missing_datalist_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.json.*prepare_datalist"):
        load_datalist(str(tmp_path / "absent.json"), str(tmp_path))


def test_datalist_without_key_names_key(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match="list.json.*'validation'"):
        load_datalist(str(tmp_path / "list.json"), str(tmp_path), "validation")


def test_listed_file_missing_names_it(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"image": ["gone_t1.nii.gz"], "case": "gone"}]}))
    with pytest.raises(FileNotFoundError, match="gone_t1.nii.gz"):
        load_datalist(str(tmp_path / "list.json"), str(tmp_path))


def test_decathlon_dataset_json_without_validation_is_split_nine_to_one(tmp_path):
    """MSD Task01's dataset.json lists only "training": validation is held out from it, disjoint and fixed."""
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    items = []
    for i in range(20):
        for folder in ("imagesTr", "labelsTr"):
            (tmp_path / folder / f"BRATS_{i:03d}.nii.gz").write_bytes(b"")
        items.append({"image": f"./imagesTr/BRATS_{i:03d}.nii.gz", "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"})
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"name": "BrainTumour", "training": items, "test": []}))
    train = load_datalist(str(path), str(tmp_path), "training")
    val = load_datalist(str(path), str(tmp_path), "validation")
    assert (len(train), len(val)) == (18, 2)
    assert not {t["image"] for t in train} & {v["image"] for v in val}
    assert val == load_datalist(str(path), str(tmp_path), "validation")
    assert all(os.path.isabs(v["image"]) and v["case"].startswith("BRATS_") for v in val)


@pytest.mark.parametrize("num_cases", [2, 10])
def test_the_model_zoo_test_layout_is_one_case_per_folder(tmp_path, num_cases):
    # ci/unit_tests of the MONAI model zoo: training/HGG/sample_<s>/image_<s>_<mod>.nii.gz and label_<s>_seg.nii.gz
    # (its test writes 10 such cases)

    for s in range(num_cases):
        folder = tmp_path / "training" / "HGG" / f"sample_{s}"
        folder.mkdir(parents=True)
        for name in ("t1", "t1ce", "t2", "flair"):
            nib.save(
                nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(folder / f"image_{s}_{name}.nii.gz")
            )
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(folder / f"label_{s}_seg.nii.gz"))
    cases = find_cases(str(tmp_path))
    assert sorted(c["case"] for c in cases) == sorted(f"sample_{s}" for s in range(num_cases))
    assert cases[0]["grade"] == "HGG"
    assert cases[0]["label"] == "training/HGG/sample_0/label_0_seg.nii.gz"
    assert [Path(p).name for p in cases[0]["image"]] == [f"image_0_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")]


def test_brats_2023_names_are_discovered_with_their_modalities(tmp_path):
    # BraTS 2023+ (GLI, MEN, MET, ...): <case>/<case>-{t1n,t1c,t2w,t2f}.nii.gz and <case>-seg.nii.gz
    order = {"t1n": "t1", "t1c": "t1c", "t2w": "t2", "t2f": "flair"}
    for case in ("BraTS-GLI-00000-000", "BraTS-GLI-00002-000"):
        folder = tmp_path / case
        folder.mkdir()
        for suffix in order:
            nib.save(
                nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(folder / f"{case}-{suffix}.nii.gz")
            )
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(folder / f"{case}-seg.nii.gz"))
    cases = find_cases(str(tmp_path))
    assert [c["case"] for c in cases] == ["BraTS-GLI-00000-000", "BraTS-GLI-00002-000"]
    assert cases[0]["label"] == "BraTS-GLI-00000-000/BraTS-GLI-00000-000-seg.nii.gz"
    # the images in the bundle's modality order (t1, t1c, t2, flair), whatever the file names call them
    assert [Path(p).name.split("-")[-1] for p in cases[0]["image"]] == [f"{s}.nii.gz" for s in order]
