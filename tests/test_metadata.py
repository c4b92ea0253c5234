"""``configs/metadata.json`` tells the truth: it validates against the bundle schema, describes the network's
inputs and outputs, and names the label values the inference writes (which MONAI Label lists as labels)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out

from bundle.checkpoints import write_recipe
from bundle.constants import REGION_LABEL_PRESETS, label_channel_def
from bundle.networks import SegANSegmentor
from bundle.transforms import RegionsToLabeld

META = ROOT / "configs" / "metadata.json"
INFERENCE = ROOT / "configs" / "inference.json"
SCHEMAS = ROOT.parent / "shared" / "schemas"  # CI clones the project beside shared/


def test_metadata_validates_against_the_bundle_schema(tmp_path):
    metadata = json.loads(META.read_text())
    schema = SCHEMAS / Path(metadata["schema"]).name
    if not schema.is_file():
        pytest.skip(f"no schema copy at {schema}: shared/ is not beside this checkout")
    local = tmp_path / schema.name  # verify_metadata downloads to --filepath unless the file exists: no network
    shutil.copy(schema, local)
    verify_metadata(meta_file=str(META), filepath=str(local))


def test_metadata_that_breaks_the_schema_is_refused(tmp_path):
    schema = SCHEMAS / "meta_schema_20240725.json"
    if not schema.is_file():
        pytest.skip(f"no schema copy at {schema}: shared/ is not beside this checkout")
    shutil.copy(schema, tmp_path / schema.name)
    broken = json.loads(META.read_text())
    del broken["network_data_format"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(Exception, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(tmp_path / schema.name))


@pytest.mark.parametrize("features", [None, [4, 8, 16, 32]])
def test_network_matches_the_declared_inputs_and_outputs(tmp_path, features):
    """``verify_net_in_out`` on the paper's network, and on a bundle whose models/model.pt has other widths (as a
    packaged bundle ships them: with the recipe record that says so)."""
    if features is not None:
        (tmp_path / "models").mkdir()
        torch.save(SegANSegmentor(features=features).state_dict(), tmp_path / "models" / "model.pt")
        write_recipe(str(tmp_path / "models" / "model.pt"), {"features": features})
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(META),
        config_file=str(INFERENCE),
        device="cpu",
        n=2,
        bundle_root=str(tmp_path),
    )


def test_output_channel_def_names_the_label_values_the_inference_writes():
    metadata = json.loads(META.read_text())["network_data_format"]
    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    convention = parser.get_parsed_content("label_convention")  # the recipe's, else the BraTS one
    expected = label_channel_def(convention)
    assert metadata["outputs"]["pred"]["channel_def"] == expected  # what MONAI Label's /info lists
    assert metadata["post_processed_outputs"]["pred"]["channel_def"] == expected
    # nested regions (whole ⊃ core ⊃ enhancing) painted into a label map give exactly these values
    regions = torch.zeros(3, 4, 1, 1)
    regions[0, 1:] = 1
    regions[1, 2:] = 1
    regions[2, 3:] = 1
    label = RegionsToLabeld(keys="pred", labels=REGION_LABEL_PRESETS[convention])({"pred": regions})["pred"]
    assert sorted(str(int(v)) for v in torch.unique(torch.as_tensor(label))) == sorted(expected, key=int)


def test_metadata_calls_the_outputs_logits():
    """The segmentor returns logits (networks.py); thresholding them at 0.5 instead of the sigmoid is a known bug."""
    pred_classes = json.loads(META.read_text())["pred_classes"]
    assert "logits" in pred_classes and "sigmoid, then threshold 0.5" in pred_classes
    assert "probabilit" not in pred_classes.split("(")[0]


def test_model_card_parameter_counts_are_the_networks():
    """docs/README.md's parameter counts, recomputed from the code at the paper's widths."""
    from bundle.networks import SegANCritics

    card = (ROOT / "docs" / "README.md").read_text()

    def millions(module):
        return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M"

    assert f'`"add"` sums instead, {millions(SegANSegmentor(skip="add"))} parameters' in card
    assert f'{millions(SegANSegmentor(skip="cat"))} parameters. Input sizes' in card
    assert f"({millions(SegANCritics())} parameters for 3 critics)" in card
