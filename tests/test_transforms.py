"""Labels become the paper's three regions under each dataset's convention, and back."""

import pytest
import torch
from monai.data import MetaTensor

from bundle.constants import MSD_MODALITIES, REGION_LABEL_PRESETS, REGION_PRESETS
from bundle.transforms import LabelToRegionsd, RegionsToLabeld, SelectModalitiesd


def _label(values):
    return MetaTensor(
        torch.tensor(values, dtype=torch.float32).reshape(1, -1, 1, 1), meta={"filename_or_obj": "case_seg.nii.gz"}
    )


@pytest.mark.parametrize(
    "convention, values, expected",
    [
        # 2013/2015: 1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing
        ("brats", [0, 1, 2, 3, 4], [[0, 1, 1, 1, 1], [0, 1, 0, 1, 1], [0, 0, 0, 0, 1]]),
        # 2023+: 1 NCR, 2 edema, 3 enhancing
        ("brats2023", [0, 1, 2, 3], [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]),
        # MSD Task01: 1 edema, 2 enhancing, 3 NCR/NET
        ("msd", [0, 1, 2, 3], [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 0]]),
    ],
)
def test_labels_convert_to_whole_core_enhancing(convention, values, expected):
    out = LabelToRegionsd("label", REGION_PRESETS[convention])({"label": _label(values)})["label"]
    assert out.shape == (3, len(values), 1, 1)
    assert out[..., 0, 0].tolist() == expected


def test_brats_2018_labels_convert_with_the_default_convention():
    out = LabelToRegionsd("label", REGION_PRESETS["brats"])({"label": _label([0, 1, 2, 4])})["label"]
    assert out[..., 0, 0].tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]


def test_custom_regions_give_any_number_of_maps():
    out = LabelToRegionsd("label", {"GM": [1], "WM": [2]})({"label": _label([0, 1, 2, 2])})["label"]
    assert out[..., 0, 0].tolist() == [[0, 1, 0, 0], [0, 0, 1, 1]]


def test_unexpected_label_value_names_the_file():
    with pytest.raises(ValueError, match=r"case_seg\.nii\.gz.*\[5\]"):
        LabelToRegionsd("label", REGION_PRESETS["brats2023"])({"label": _label([0, 1, 5])})


@pytest.mark.parametrize("convention", ["brats", "brats2023", "msd"])
def test_regions_paint_back_to_the_dataset_labels(convention):
    values = {"brats": [0, 1, 2, 4], "brats2023": [0, 1, 2, 3], "msd": [0, 1, 2, 3]}[convention]
    regions = LabelToRegionsd("label", REGION_PRESETS[convention])({"label": _label(values)})["label"]
    back = RegionsToLabeld("pred", REGION_LABEL_PRESETS[convention])({"pred": regions})["pred"]
    assert back.flatten().tolist() == values


def _image(channel_dim):
    return MetaTensor(torch.arange(4).float().reshape(4, 1, 1, 1), meta={"original_channel_dim": channel_dim})


def test_modalities_are_selected_by_name_from_either_channel_order():
    select = SelectModalitiesd("image", selected=["t1c", "t2", "flair"])
    stacked = select({"image": _image(0)})["image"]  # one file per modality: t1, t1c, t2, flair
    assert stacked.flatten().tolist() == [1, 2, 3]
    msd = select({"image": _image(-1)})["image"]  # one 4D file, channels last: flair, t1, t1c, t2
    assert msd.flatten().tolist() == [2, 3, 0]
    custom = SelectModalitiesd("image", available_4d=MSD_MODALITIES[::-1], selected=["flair"])({"image": _image(-1)})
    assert custom["image"].flatten().tolist() == [3]


def test_wrong_channel_count_and_unknown_modality_are_explained():
    with pytest.raises(ValueError, match="image_modalities"):
        SelectModalitiesd("image")({"image": torch.zeros(3, 1, 1, 1)})
    with pytest.raises(ValueError, match="image_modalities_4d"):
        SelectModalitiesd("image")({"image": MetaTensor(torch.zeros(3, 1, 1, 1), meta={"original_channel_dim": -1})})
    with pytest.raises(ValueError, match="subset"):
        SelectModalitiesd("image", selected=["pd"])


def test_brats2024_labels_give_the_tumour_regions_and_the_resection_cavity_as_its_own():
    # BraTS 2024 post-treatment glioma (de Verdier et al. 2024): 1 NETC, 2 SNFH, 3 ET, 4 RC
    out = LabelToRegionsd("label", REGION_PRESETS["brats2024"])({"label": _label([0, 1, 2, 3, 4])})["label"]
    regions = dict(zip(REGION_PRESETS["brats2024"], out[..., 0, 0].tolist()))
    assert regions == {
        "resection_cavity": [0, 0, 0, 0, 1],
        "whole_tumor": [0, 1, 1, 1, 0],
        "tumor_core": [0, 1, 0, 1, 0],
        "enhancing_tumor": [0, 0, 0, 1, 0],
    }
    back = RegionsToLabeld("pred", REGION_LABEL_PRESETS["brats2024"])({"pred": out})["pred"]
    assert back.flatten().tolist() == [0, 1, 2, 3, 4]  # the values the BraTS 2024 evaluation reads


def test_brats2024_a_voxel_predicted_both_cavity_and_tumour_is_tumour():
    # voxels: RC only, RC + WT, RC + WT + TC, RC + WT + TC + ET
    rc, wt, tc, et = [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]
    regions = torch.tensor([rc, wt, tc, et], dtype=torch.float32).reshape(4, 4, 1, 1)
    label = RegionsToLabeld("pred", REGION_LABEL_PRESETS["brats2024"])({"pred": regions})["pred"]
    assert label.flatten().tolist() == [4, 2, 1, 3]
