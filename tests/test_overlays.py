"""Overlays only say what differs from configs/train.json: every training overlay composed on it keeps the
same trainer arguments (AMP included), handler list and run lists unless the overlay states the difference by
a named key (``train#trainer_def`` for another method's trainer, ``critic`` null for a method without one,
``main_process`` and ``+initialize`` for several processes)."""

import glob
import json
import os

import pytest
import torch
from helpers import ROOT, TINY, load_script
from monai.bundle import ConfigParser

CONFIGS = ROOT / "configs"
TRAIN = str(CONFIGS / "train.json")

#: Every training overlay, each composed as a user runs it (the Moeskops ones on top of their class setup).
OVERLAYS = {
    **{os.path.relpath(f, CONFIGS): [f] for f in sorted(glob.glob(str(CONFIGS / "variants" / "*.json")))},
    **{
        f"moeskops/{name}.json": [str(CONFIGS / "moeskops" / f"{n}.json") for n in ("multiclass", "fcn", name)]
        for name in ("multiclass", "fcn", "dilated", "adversarial")
    },
    **{name: [str(CONFIGS / name)] for name in ("multi_gpu_train.json", "demo.json", "adam.json", "isic.json")},
    "isic_demo.json": [str(CONFIGS / "isic.json"), str(CONFIGS / "isic_demo.json")],
}
#: Keys an overlay must never re-spell: a copy drifts from train.json (it did: amp_kwargs, curves, cudnn).
RESPELLED = ("train", "train#handlers", "train#trainer", "initialize", "run", "training", "start_checks")


def _parser(files, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([TRAIN, *files])
    parser.update(overrides)
    return parser


def _base() -> ConfigParser:
    return _parser([])


def test_every_overlay_file_is_covered():
    files = {os.path.relpath(f, CONFIGS) for f in glob.glob(str(CONFIGS / "*" / "*.json"))}
    training = {f for f in files if f.startswith(("variants/", "moeskops/"))}
    assert training <= set(OVERLAYS)


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_no_overlay_re_spells_the_trainer_the_handlers_or_the_run_lists(name):
    with open(OVERLAYS[name][-1]) as f:
        keys = set(json.load(f))
    assert not keys & set(RESPELLED), f"{name} re-spells {sorted(keys & set(RESPELLED))}: set a named key instead"


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_every_overlay_keeps_the_shared_trainer_arguments_handlers_and_run_lists(name):
    base, parser = _base(), _parser(OVERLAYS[name])
    assert parser["train#trainer"] == base["train#trainer"]  # amp, amp_kwargs, handlers, data: one spelling
    assert parser["train#handlers"] == base["train#handlers"]
    assert parser["run"] == base["run"] and parser["training"] == base["training"]
    if name == "multi_gpu_train.json":  # initialising the process group comes on top of train.json's steps
        assert parser["initialize"][: len(base["initialize"])] == base["initialize"]
        assert any("init_process_group" in step for step in parser["initialize"])
    else:
        assert parser["initialize"] == base["initialize"]


def test_the_old_run_id_runs_initialize_then_run():
    """``monai.bundle run training`` of MONAI < 1.2 runs only the ``training`` list."""
    base = _base()
    assert base["training"] == base["initialize"] + base["run"]
    assert any("set_cudnn_benchmark" in step for step in base["initialize"])


def test_folders_are_locked_and_cleaned_by_the_main_process_only():
    checks = _base()["start_checks"]
    for name in ("lock_folder", "writable_folder", "remove_stale_temporaries"):
        assert all(check.endswith("if @main_process else None") for check in checks if name in check)


@pytest.mark.parametrize(
    "name, trainer, critic",
    [
        (None, "SegANTrainer", True),
        ("variants/unet.json", "AutocastSupervisedTrainer", False),
        ("moeskops/adversarial.json", "MoeskopsTrainer", True),
        ("variants/s3_1c.json", "SegANTrainer", True),
    ],
)
def test_every_method_trains_under_the_same_amp_settings_and_handlers(name, trainer, critic, demo_dir, tmp_path):
    files = OVERLAYS[name] if name else []
    settings = {"amp": True, "amp_dtype": "bfloat16", "device": "$torch.device('cpu')", "progress": False}
    if name and name.startswith("moeskops"):
        settings["patch_size"] = [48, 48]  # room for the discriminator's 21 + 2 x 2 pixel image patches
    parser = _parser(files, **{**TINY, "dataset_dir": str(demo_dir), "bundle_root": str(tmp_path), **settings})
    engine = parser.get_parsed_content("train#trainer")
    assert type(engine).__name__ == trainer
    assert engine.amp is True and engine.amp_kwargs == {"dtype": torch.bfloat16}
    base = _parser([], **{**TINY, "dataset_dir": str(demo_dir), "bundle_root": str(tmp_path), **settings})
    handlers = [type(h).__name__ for h in parser.get_parsed_content("train#handlers")]
    expected = [type(h).__name__ for h in base.get_parsed_content("train#handlers")]
    if not critic:  # no critic: nothing to schedule, log or save for it
        expected.remove("LrScheduleHandler")
        assert parser.get_parsed_content("critic") is None
    assert handlers == expected and "TrainingCurves" in handlers
    state = parser.get_parsed_content("train#state_saver").save_dict
    assert ("critic" in state) == critic and {"network", "optimizer", "trainer", "model_saver"} <= set(state)


def test_moeskops_la_updates_the_segmenter_at_the_discriminator_loss_rate():
    """Moeskops et al. 2017, section 3.1: 1e-3 for the segmentation loss, 1e-5 for the discriminator loss
    (Ld and La); ``adversarial_learning_rate`` set to ``@learning_rate`` gives the other reading."""
    parser = _parser(OVERLAYS["moeskops/adversarial.json"], **TINY)
    trainer_def = parser.get_parsed_content("train#trainer_def")
    rates = {
        name: trainer_def.keywords[name].param_groups[0]["lr"]
        for name in ("adversarial_optimizer", "discriminator_optimizer")
    }
    assert rates == {"adversarial_optimizer": 1e-5, "discriminator_optimizer": 1e-5}
    assert parser.get_parsed_content("optimizer").param_groups[0]["lr"] == 1e-3
    assert parser["train#state"]["adversarial_optimizer"] == "@adversarial_optimizer"  # saved and resumed


#: Items evaluate.json sets differently from inference.json on purpose: the held-out split, stopping at a broken
#: case instead of skipping it, and the output key the metrics read.
EVALUATION_CHANGES = {"data_list_key", "continue_on_error", "output_key", "output_format"}


def _raw(files) -> dict:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in files])
    return parser.get()


def test_evaluate_json_composes_identically_on_train_json_and_inference_json():
    """The zoo evaluates with ``[train.json, evaluate.json]``; this bundle also with ``[inference.json,
    evaluate.json]``. train.json ends with the inference pipeline items it lacks and evaluate.json starts with the
    recipe-read items and run lists (scripts/copy_inference_items.py), each copied unchanged from inference.json,
    so both compositions define every item evaluation reads the same way: a stale copy fails here, naming it."""
    copier = load_script("copy_inference_items")
    fix = "run `python scripts/copy_inference_items.py`"
    inference = json.loads((CONFIGS / "inference.json").read_text())
    train = json.loads((CONFIGS / "train.json").read_text())
    evaluate = json.loads((CONFIGS / "evaluate.json").read_text())
    train_copies = dict(list(train.items())[list(train).index(copier.TRAIN_LAST) + 1 :])
    evaluate_copies = dict(list(evaluate.items())[: list(evaluate).index(copier.EVALUATE_FIRST)])
    assert (list(train_copies), list(evaluate_copies)) == copier.plan(CONFIGS), f"the copied items changed: {fix}"
    copies = {**train_copies, **evaluate_copies}
    stale = sorted(k for k, v in copies.items() if v != inference[k])
    assert stale == [], f"the copies of {stale} differ from inference.json: {fix}"
    on_train, on_inference = _raw(["train.json", "evaluate.json"]), _raw(["inference.json", "evaluate.json"])
    differing = [k for k in on_inference if on_train.get(k) != on_inference[k]]
    assert differing == [], f"{differing} differ between the two compositions: {fix}"


def test_an_overlay_before_evaluate_json_keeps_its_pipeline_items():
    """``['inference.json', <overlay>, 'evaluate.json']``: evaluate.json re-states only what the weights' recipe
    decides, so an overlay's loading, inferer or post-processing (ISIC's 2D images, 3D SegAN's sliding window)
    is what evaluation runs."""
    for overlay, items in {
        "isic_inference.json": ("image_transforms", "inferer", "prediction_transforms"),
        "segan3d_inference.json": ("inferer", "roi_size"),
    }.items():
        alone = json.loads((CONFIGS / overlay).read_text())
        composed = _raw(["inference.json", overlay, "evaluate.json"])
        assert all(composed[item] == alone[item] for item in items), overlay
