"""The 2D RGB skin-lesion setting of the SegAN ISIC re-implementation report (ISIC 2017): its layout is found, and
SegAN trains on RGB images
and writes one PNG mask per image at the image's original size."""

import os

import numpy as np
import pytest
from PIL import Image

from bundle.datalist import build_datalist, inference_datalist
from bundle.lesion_demo import make_lesion_dataset


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _isic_tree(root, splits=None, size=(20, 28)):
    """ISIC 2017 as released (the test set as ``Test_v2``), with its superpixel images and metadata file."""
    splits = splits or {"Training": 3, "Validation": 1, "Test_v2": 1}
    rng = np.random.default_rng(0)
    for split, n in splits.items():
        for i in range(n):
            name = f"ISIC_{split[:2]}{i:05d}"
            _save(root / f"ISIC-2017_{split}_Data" / f"{name}.jpg", rng.integers(0, 255, (*size, 3), dtype=np.uint8))
            _save(root / f"ISIC-2017_{split}_Data" / f"{name}_superpixels.png", np.zeros((*size, 3), np.uint8))
            _save(root / f"ISIC-2017_{split}_Part1_GroundTruth" / f"{name}_segmentation.png", np.zeros(size, np.uint8))
    (root / "ISIC-2017_Training_Data" / "ISIC-2017_Training_Data_metadata.csv").write_text("image_id,age\n")


def test_isic_2017_layout_gives_its_own_training_validation_and_test_sets(tmp_path):
    _isic_tree(tmp_path)
    datalist = build_datalist(tmp_path)
    assert {k: len(v) for k, v in datalist.items()} == {"training": 3, "validation": 1, "testing": 1}
    item = datalist["training"][0]
    assert item == {
        "image": "ISIC-2017_Training_Data/ISIC_Tr00000.jpg",
        "label": "ISIC-2017_Training_Part1_GroundTruth/ISIC_Tr00000_segmentation.png",
        "case": "ISIC_Tr00000",
    }
    # inference on the dataset root segments the test images; on an image folder, every image but superpixels
    assert [i["case"] for i in inference_datalist(tmp_path)] == ["ISIC_Te00000"]
    assert [i["case"] for i in inference_datalist(tmp_path / "ISIC-2017_Training_Data")] == [
        "ISIC_Tr00000",
        "ISIC_Tr00001",
        "ISIC_Tr00002",
    ]


def test_images_beside_same_named_masks_are_split_9_to_1(tmp_path):
    for i in range(10):
        _save(tmp_path / "images" / f"lesion{i}.jpg", np.zeros((8, 8, 3), np.uint8))
        if i != 3:  # an image without a mask is not training data
            _save(tmp_path / "masks" / f"lesion{i}.png", np.zeros((8, 8), np.uint8))
    datalist = build_datalist(tmp_path)
    assert len(datalist["training"]) == 8 and len(datalist["validation"]) == 1
    cases = {i["case"]: i for i in datalist["training"] + datalist["validation"]}
    assert "lesion3" not in cases
    assert cases["lesion5"]["label"] == "masks/lesion5.png"


def test_an_isic_tree_without_validation_images_holds_out_a_tenth_of_training(tmp_path):
    _isic_tree(tmp_path, splits={"Training": 10})
    datalist = build_datalist(tmp_path)
    assert len(datalist["training"]) == 9 and len(datalist["validation"]) == 1 and "testing" not in datalist


def test_lesion_demo_is_written_in_the_isic_layout(tmp_path):
    make_lesion_dataset(tmp_path / "demo", num_images=(3, 1, 1), seed=0)
    datalist = build_datalist(tmp_path / "demo")
    assert {k: len(v) for k, v in datalist.items()} == {"training": 3, "validation": 1, "testing": 1}
    image = np.asarray(Image.open(tmp_path / "demo" / datalist["training"][0]["image"]))
    mask = np.asarray(Image.open(tmp_path / "demo" / datalist["training"][0]["label"]))
    assert image.ndim == 3 and image.shape[2] == 3 and image.shape[:2] == mask.shape
    assert set(np.unique(mask)) == {0, 255} and 0.02 < (mask > 0).mean() < 0.5
    # the lesion is darker than the skin around it
    assert image[mask > 0].mean() < image[mask == 0].mean() - 20


@pytest.mark.slow
def test_2d_rgb_training_writes_a_model_and_png_masks_at_each_images_size(tmp_path):
    from helpers import ROOT
    from monai.bundle.scripts import run

    data = make_lesion_dataset(tmp_path / "data", num_images=(4, 1, 2), seed=1)
    configs = lambda *names: [str(ROOT / "configs" / f"{n}.json") for n in names]  # noqa: E731
    tiny = {"features": [4, 8, 16, 32], "image_size": [32, 32], "num_workers": 0}
    run(
        "training",
        config_file=configs("train", "adam", "isic"),
        bundle_root=str(tmp_path),
        dataset_dir=data,
        critic_features=[4, 8, 16],
        batch_size=4,
        max_epochs=1,
        val_interval=1,
        **tiny,
    )
    assert (tmp_path / "models" / "model.pt").is_file()

    out = tmp_path / "masks"
    run(
        config_file=configs("inference", "isic_inference"),
        bundle_root=str(tmp_path),
        dataset_dir=data,
        output_dir=str(out),
        progress=False,
        **tiny,
    )
    test_images = sorted((tmp_path / "data" / "ISIC-2017_Test_Data").iterdir())
    assert sorted(os.listdir(out)) == [f"{p.stem}_segmentation.png" for p in test_images]
    for image in test_images:
        mask = Image.open(out / f"{image.stem}_segmentation.png")
        assert mask.size == Image.open(image).size and mask.mode == "L"
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
