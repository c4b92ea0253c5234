"""BraTS post-processing, each step a config key that is off by default: small connected components removed per
region, a small enhancing tumour relabelled as tumour core (BraTS scoring), and a threshold per region; and the
choice of steps on the out-of-fold predictions of a cross-validation (nnU-Net's rule, Isensee et al. 2021)."""

import csv
import json
import warnings

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, load_script, messages
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from bundle.constants import CLASS_PRESETS, REGION_PRESETS
from bundle.postprocessing import (
    RelabelSmallEnhancingd,
    RemoveSmallComponentsd,
    SaveProbabilitiesd,
    ThresholdRegionsd,
    enhancing_rule_regions,
    load_probabilities,
)
from bundle.settings_check import check_settings

INFERENCE = str(ROOT / "configs" / "inference.json")
EVALUATE = str(ROOT / "configs" / "evaluate.json")
NAMES = ["whole_tumor", "tumor_core", "enhancing_tumor"]
WT, TC, ET = range(3)


def _maps() -> MetaTensor:
    """Region maps (3, 12, 12, 12): a 27-voxel lesion in every region, and a 5-voxel island in the whole tumour
    whose voxels touch only at edges and corners (one component in the 26-neighbourhood)."""
    maps = torch.zeros(3, 12, 12, 12)
    maps[:, 1:4, 1:4, 1:4] = 1
    for i in range(5):
        maps[WT, 6 + i, 6 + i % 2, 6 + i] = 1
    return MetaTensor(maps, affine=torch.eye(4))


@pytest.mark.parametrize("min_size, kept", [(10, False), (3, True), (5, True), (6, False), (0, True)])
def test_a_component_below_the_size_is_removed_and_the_rest_kept(min_size, kept):
    out = RemoveSmallComponentsd("pred", min_size, NAMES)({"pred": _maps()})["pred"]
    assert int(out[WT, 6:, 6:, 6:].sum()) == (5 if kept else 0)
    assert int(out[:, 1:4, 1:4, 1:4].sum()) == 3 * 27  # the large lesion stays in every region
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and torch.equal(out.affine, torch.eye(4))


def test_component_sizes_per_region_as_a_list_or_a_mapping():
    maps = _maps()
    maps[ET, 9:11, 0:2, 0] = 1  # a 4-voxel enhancing island
    for size in ({"enhancing_tumor": 10}, [0, 0, 10]):
        out = RemoveSmallComponentsd("pred", size, NAMES)({"pred": maps})["pred"]
        assert int(out[WT, 6:, 6:, 6:].sum()) == 5 and int(out[ET, 9:11, 0:2, 0].sum()) == 0


def test_the_same_components_as_monai_remove_small_objects_in_3d():
    pytest.importorskip("skimage")
    from monai.transforms import RemoveSmallObjects

    maps = (torch.rand(3, 10, 10, 10, generator=torch.Generator().manual_seed(0)) > 0.8).float()
    ours = RemoveSmallComponentsd("pred", 4, NAMES)({"pred": maps})["pred"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-image 0.26 deprecates the min_size MONAI passes
        # one channel at a time: on (C, H, W, D) scikit-image connects voxels across channels too
        theirs = torch.cat([RemoveSmallObjects(min_size=4, connectivity=3)(maps[c : c + 1]) for c in range(3)])
    assert torch.equal(ours, theirs.float()) and 0 < ours.sum() < maps.sum()


def test_a_small_enhancing_tumour_becomes_core_and_stays_in_the_whole_tumour():
    maps = torch.zeros(3, 10, 10, 10)
    maps[WT, 1:8, 1:8, 1:8] = 1
    maps[TC, 2:5, 2:5, 2:5] = 1
    maps[ET, 6:8, 6:8, 2:7] = 1  # 20 voxels, outside the predicted core
    out = RelabelSmallEnhancingd("pred", 50, REGION_PRESETS["brats"])({"pred": maps})["pred"]
    assert out[ET].sum() == 0
    assert out[TC].sum() == 27 + 20 and out[TC, 6:8, 6:8, 2:7].all()  # kept in the core
    assert torch.equal(out[WT], maps[WT])  # already whole tumour
    kept = RelabelSmallEnhancingd("pred", 20, REGION_PRESETS["brats"])({"pred": maps})["pred"]
    assert torch.equal(kept, maps)  # 20 voxels are not below 20
    off = RelabelSmallEnhancingd("pred", 0, {"tumor": [1]})({"pred": maps[:1]})["pred"]  # off: any regions do
    assert torch.equal(off, maps[:1])


@pytest.mark.parametrize("convention", sorted(REGION_PRESETS))
def test_the_enhancing_rule_knows_every_convention(convention):
    regions = list(REGION_PRESETS[convention])  # into core and whole tumour
    expected = sorted(regions.index(name) for name in ("whole_tumor", "tumor_core"))
    assert enhancing_rule_regions(REGION_PRESETS[convention]) == (regions.index("enhancing_tumor"), expected)
    classes = CLASS_PRESETS[convention]
    names = list(classes)
    assert enhancing_rule_regions(classes) == (names.index("enhancing_tumor"), [names.index("necrotic_core")])


def test_the_enhancing_rule_without_an_enhancing_region_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="`et_min_volume` relabels .* no 'enhancing_tumor' region.*--et_min_volume 0"):
        RelabelSmallEnhancingd("pred", 50, {"lesion": [255]})
    with pytest.raises(ValueError, match="`et_min_volume`: no region .* contains"):
        enhancing_rule_regions({"edema": [2], "enhancing_tumor": [4]})


def test_a_threshold_per_region_applies_to_its_channel():
    prob = torch.tensor([0.35, 0.45, 0.55, 0.65]).reshape(1, 4, 1, 1).repeat(3, 1, 1, 1)
    for threshold in ([0.3, 0.5, 0.6], {"whole_tumor": 0.3, "enhancing_tumor": 0.6}):
        out = ThresholdRegionsd("pred", threshold, NAMES)({"pred": prob})["pred"]
        assert out[:, :, 0, 0].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    out = ThresholdRegionsd("pred", 0.5, NAMES)({"pred": prob})["pred"]
    assert out[:, :, 0, 0].tolist() == [[0, 0, 1, 1]] * 3


def test_saved_probabilities_come_back_under_the_case_name(tmp_path):
    prob = torch.rand(3, 4, 5, 6)
    SaveProbabilitiesd("pred", tmp_path, NAMES)({"pred": prob, "case": "HGG/pat1"})
    loaded, names = load_probabilities(tmp_path / "HGG" / "pat1.npz")
    assert names == NAMES and np.allclose(loaded, prob.numpy(), atol=1e-3)
    assert [p.name for p in tmp_path.rglob("*")] == ["HGG", "pat1.npz"]  # no temporary file left


def _parser(files=INFERENCE, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(overrides)
    return parser


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("threshold", 1.5, "`threshold` is 1.5 (float); it must be a number in (0, 1), or one such value per region"),
        ("threshold", [0.4, 0.5], "`threshold` has 2 values [0.4, 0.5] for 3 regions"),
        ("threshold", {"core": 0.4}, "`threshold` names regions ['core'] that are not among the regions"),
        ("min_component_size", -10, "`min_component_size` is -10 (int); it must be an integer >= 0"),
        ("min_component_size", [10, 10.5, 0], "it must be an integer >= 0, or one such value per region"),
        ("min_component_size", [10, 0], "`min_component_size` has 2 values"),
        ("et_min_volume", "50", "`et_min_volume` is '50' (str); it must be an integer >= 0"),
        ("save_probabilities", "maybe", "`save_probabilities` is 'maybe' (str); it must be true or false"),
    ],
)
def test_bad_postprocessing_settings_are_refused_naming_the_key(key, value, message):
    with pytest.raises(ValueError) as error:
        check_settings(_parser(**{key: value}))
    assert message in str(error.value) and f"--{key}" in str(error.value)


def test_the_enhancing_rule_on_regions_without_enhancing_tumour_is_refused_at_start():
    parser = _parser(et_min_volume=50, regions={"tumor": [1, 2, 3, 4]}, region_labels=[1])
    with pytest.raises(ValueError, match="`et_min_volume` relabels .* no 'enhancing_tumor' region"):
        check_settings(parser)
    check_settings(_parser(et_min_volume=50, min_component_size={"enhancing_tumor": 20}, threshold=[0.4, 0.5, 0.6]))


def test_the_steps_are_off_by_default_and_sit_after_the_inversion():
    for files in (INFERENCE, [INFERENCE, EVALUATE]):
        parser = _parser(files)
        assert (parser["threshold"], parser["min_component_size"], parser["et_min_volume"]) == (0.5, 0, 0)
        targets = [t if isinstance(t, str) else t["_target_"] for t in parser["prediction_transforms"]]
        invert = targets.index("@invert")
        for name in ("ThresholdRegionsd", "RemoveSmallComponentsd", "RelabelSmallEnhancingd"):
            assert targets.index(f"bundle.postprocessing.{name}") > invert  # in the case's geometry


@pytest.mark.slow
def test_the_keys_work_through_monai_bundle_run(tmp_path, demo_dir):
    """Inference with every step on (a whole-tumour threshold of 0.3, every core component removed, every enhancing
    tumour relabelled as core), checked against the probabilities the same run with the steps off saved."""
    import nibabel as nib
    from monai.bundle.scripts import run

    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    torch.manual_seed(0)
    network = _parser(features=TINY["features"]).get_parsed_content("network_def")
    torch.save(network.state_dict(), root / "models" / "model.pt")
    common = dict(
        config_file=INFERENCE,
        bundle_root=str(root),
        dataset_dir=str(demo_dir),
        features=TINY["features"],
        num_workers=0,
        progress=False,
        head_guard=False,
        crop_foreground=False,
    )
    run(**common, output_dir=str(tmp_path / "off"), threshold=[0.5, 0.5, 0.5], save_probabilities=True)
    huge = 40 * 40 * 24 + 1  # more voxels than a case has: every component, every enhancing tumour goes
    run(
        **common,
        output_dir=str(tmp_path / "on"),
        threshold={"whole_tumor": 0.3},
        min_component_size={"tumor_core": huge},
        et_min_volume=huge,
    )
    for case in ("Demo_000", "Demo_001"):
        off = np.asarray(nib.load(str(tmp_path / "off" / f"{case}_seg.nii.gz")).dataobj)
        on = np.asarray(nib.load(str(tmp_path / "on" / f"{case}_seg.nii.gz")).dataobj)
        prob, names = load_probabilities(tmp_path / "off" / "probabilities" / f"{case}.npz")
        assert names == NAMES and prob.shape[1:] == off.shape
        clear = (np.abs(prob - 0.5) > 2e-3).all(0) & (np.abs(prob[0] - 0.3) > 2e-3)  # beyond float16's rounding
        assert clear.mean() > 0.9 and (off == 4).any() and (off == 1).any()  # something to remove
        assert np.array_equal((off > 0)[clear], (prob >= 0.5).any(0)[clear])  # the saved maps give the label map
        # the core's components all removed, then the enhancing tumour relabelled as core: label 1 is what was 4
        enhancing = prob[2] >= 0.5
        assert not (on == 4).any() and np.array_equal((on == 1)[clear], enhancing[clear])
        assert np.array_equal((on > 0)[clear], ((prob[0] >= 0.3) | enhancing)[clear])  # whole tumour at 0.3


def test_choosing_refuses_a_cross_validation_without_probabilities(tmp_path):
    cv = load_script("cross_validate")
    with pytest.raises(FileNotFoundError) as error:
        cv.choose_postprocessing_settings([{"fold": 0, "cases": [{"case": "A"}]}], tmp_path, tmp_path / "out")
    assert "A.npz" in messages(error.value)
    with pytest.raises(ValueError, match="--choose_postprocessing is 'maybe'; give true or false"):
        cv.cross_validate(num_folds=2, work_dir=str(tmp_path / "runs"), choose_postprocessing="maybe")


@pytest.mark.slow
def test_cross_validate_chooses_postprocessing_and_writes_an_overlay(tmp_path, demo_dir, capsys):
    """A tiny 2-fold cross-validation: out-of-fold probabilities saved, a small grid tried on them, the overlay
    written and usable on inference.json."""
    cv = load_script("cross_validate")
    out = tmp_path / "report"
    grid = dict(thresholds=[0.4, 0.5], component_sizes=[0, 5], et_volumes=[0, 30])
    cv.cross_validate(
        num_folds=2,
        out=str(out),
        work_dir=str(tmp_path / "runs"),
        dataset_dir=str(demo_dir),
        choose_postprocessing=True,
        **grid,
        **{**TINY, "max_epochs": 1},
    )
    printed = capsys.readouterr().out
    chosen = json.loads((out / "postprocessing.json").read_text())
    assert set(chosen) == {"threshold", "min_component_size", "et_min_volume"}
    assert list(chosen["threshold"]) == NAMES and set(chosen["threshold"].values()) <= {0.4, 0.5}
    assert set(chosen["min_component_size"].values()) <= {0, 5} and chosen["et_min_volume"] in (0, 30)
    table = (out / "postprocessing.md").read_text()
    assert "| threshold | whole_tumor | 0.4 |" in table and "| et_min_volume | enhancing_tumor | 30 |" in table
    assert "postprocessing.json" in printed and "| step |" in printed
    for fold in (0, 1):
        assert len(list((tmp_path / "runs" / f"fold{fold}" / "eval" / "probabilities").glob("*.npz"))) == 2
    check_settings(_parser([INFERENCE, str(out / "postprocessing.json")]))
    # the first row (every step off) scores the saved maps as the evaluation scored the written label maps
    with open(out / "oof_summary.csv") as f:
        evaluated = [float(r["mean"]) for r in csv.DictReader(f) if r["metric"] == "dice"]
    first = table.split("| threshold | whole_tumor | 0.5 |")[1].split("|")[:3]
    assert [float(d) for d in first] == pytest.approx(evaluated, abs=0.01)
