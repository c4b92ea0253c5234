"""The BraTS 2024 post-treatment glioma labels (de Verdier et al. 2024: 1 NETC, 2 SNFH, 3 ET, 4 RC) end to end:
training with ``--label_convention brats2024`` learns four maps (the resection cavity beside the three tumour
regions), inference writes the label values the BraTS 2024 evaluation reads, evaluation scores the cavity as a
region, and the metadata that MONAI Label lists as the model's labels names the four labels."""

import json
import shutil
import zipfile

import nibabel as nib
import numpy as np
import pytest
from helpers import ROOT, load_script
from monai.bundle import ConfigParser
from monai.bundle.scripts import run

from bundle.checkpoints import read_recipe
from bundle.constants import REGION_LABEL_PRESETS, REGION_PRESETS

# MONAI's own HausdorffDistanceMetric passes a deprecated argument to get_mask_edges; nothing to do with this bundle
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*:FutureWarning")

INFERENCE = str(ROOT / "configs" / "inference.json")
EVALUATE = str(ROOT / "configs" / "evaluate.json")
REGIONS = ["resection_cavity", "whole_tumor", "tumor_core", "enhancing_tumor"]
LABELS = {  # what MONAI Label's /info lists: the names of outputs.pred.channel_def, lower-cased, background skipped
    "non-enhancing tumor core": 1,
    "surrounding non-enhancing flair hyperintensity": 2,
    "enhancing tissue": 3,
    "resection cavity": 4,
}
package_bundle = load_script("package_bundle")


def _info_labels(metadata: dict) -> dict:
    """The labels MONAI Label 0.8.5's ``BundleInferTask`` reads from a bundle's metadata (first output's channel_def)."""
    _, pred = next(iter(metadata["network_data_format"]["outputs"].items()))
    return {name.lower(): int(value) for value, name in pred["channel_def"].items() if name.lower() != "background"}


def test_packaged_metadata_of_brats2024_weights_names_the_four_labels():
    regions = dict(REGION_PRESETS["brats2024"])
    recipe = {"label_convention": "brats2024", "regions": regions, "region_labels": REGION_LABEL_PRESETS["brats2024"]}
    metadata = package_bundle._metadata(json.loads((ROOT / "configs" / "metadata.json").read_text()), recipe)
    assert _info_labels(metadata) == LABELS
    formats = metadata["network_data_format"]
    assert formats["outputs"]["pred"]["num_channels"] == 4
    assert formats["post_processed_outputs"]["pred"]["value_range"] == [0, 1, 2, 3, 4]
    assert "channel 0 resection_cavity (4)" in metadata["label_classes"] and "logits" in metadata["pred_classes"]


@pytest.mark.slow
def test_train_infer_evaluate_and_package_with_the_post_treatment_labels(
    post_treatment_dir, post_treatment_bundle, tmp_path
):
    recipe = read_recipe(str(post_treatment_bundle / "models" / "model.pt"))
    assert recipe["label_convention"] == "brats2024" and list(recipe["regions"]) == REGIONS

    run(
        config_file=INFERENCE,
        bundle_root=str(post_treatment_bundle),
        dataset_dir=str(post_treatment_dir),
        output_dir=str(tmp_path / "pred"),
        num_workers=0,
        progress=False,
    )
    case = "BraTS-DEMO-00000-000"
    written = nib.load(str(tmp_path / "pred" / f"{case}_seg.nii.gz"))
    source = nib.load(str(post_treatment_dir / case / f"{case}-t1n.nii.gz"))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 3, 4}

    run(
        config_file=[INFERENCE, EVALUATE],
        bundle_root=str(post_treatment_bundle),
        dataset_dir=str(post_treatment_dir),
        output_dir=str(tmp_path / "eval"),
        num_workers=0,
        progress=False,
        overlay_cases=1,
    )
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    for metric in ("dice", "precision", "sensitivity", "hd95"):
        assert list(summary["metrics"][metric]) == REGIONS

    shipped = tmp_path / "segan"  # the bundle beside the trained weights, as package_bundle.py zips it
    for part in ("bundle", "configs", "docs", "models"):
        shutil.copytree(ROOT / part, shipped / part, ignore=shutil.ignore_patterns("__pycache__", "*.pt", "*.ts"))
    shutil.copy(ROOT / "LICENSE", shipped)
    for weights in (post_treatment_bundle / "models").glob("model*"):
        shutil.copy(weights, shipped / "models")
    archive = package_bundle.main(output_dir=str(tmp_path / "dist"), bundle_root=str(shipped))
    with zipfile.ZipFile(archive) as z:
        name = next(n for n in z.namelist() if n.endswith("configs/metadata.json"))
        assert _info_labels(json.loads(z.read(name))) == LABELS


@pytest.mark.parametrize(
    "multiclass, channels, values",
    [
        (False, REGIONS, [4, 2, 1, 3]),
        (True, ["background", "necrotic_core", "edema", "enhancing_tumor", "resection_cavity"], [0, 1, 2, 3, 4]),
    ],
)
def test_train_json_builds_the_brats2024_outputs_with_and_without_softmax(multiclass, channels, values):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update({"label_convention": "brats2024", "multiclass": multiclass})
    assert parser.get_parsed_content("region_names") == channels
    assert parser.get_parsed_content("region_labels") == values
    assert parser.get_parsed_content("out_channels") == len(channels)
