"""What MONAI Label 0.8.5's ``monaibundle`` app does with the bundle, without the server.

Its ``BundleInferTask`` reads ``configs/inference.json`` from the bundle copied into ``<app>/model/<name>/``,
sets ``bundle_root``, builds ``network_def`` and loads ``models/model.pt`` itself, runs ``preprocessing`` (with
``LoadImaged`` returning metadata), ``inferer`` and ``postprocessing`` without ``SaveImaged``, and lists the
labels of ``outputs.pred.channel_def``. Its ``BundleTrainTask`` runs ``configs/train.json`` (run id ``run``, no
initialize) with the datastore's cases, one 4D image and one label map per case, a number of epochs, a device
and a ``CheckpointLoader`` of ``models/model.pt`` in front of ``train#handlers``. ``scripts/monailabel_check.py``
checks the same against the real server.
"""

import json
import os
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import ROOT, stack_to_4d
from monai.bundle import ConfigParser
from monai.bundle.scripts import run
from monai.transforms import Compose, LoadImaged, SaveImaged

from bundle.checkpoints import write_recipe
from bundle.constants import MSD_MODALITIES
from bundle.demo import make_demo_dataset
from bundle.networks import SegANSegmentor

FEATURES = (4, 8, 16, 32)  # not the paper's: the configs must build what models/model.pt holds
SUFFIX = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}


@pytest.fixture(scope="module")
def app_bundle(tmp_path_factory):
    """The bundle as copied into a MONAI Label app: ``<app>/model/segan`` with small trained-elsewhere weights."""
    root = tmp_path_factory.mktemp("app") / "model" / "segan"
    for part in ("bundle", "configs"):
        shutil.copytree(ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "models").mkdir()
    torch.manual_seed(1)
    torch.save(SegANSegmentor(features=FEATURES).state_dict(), root / "models" / "model.pt")
    write_recipe(
        str(root / "models" / "model.pt"), {"features": list(FEATURES), "skip": "cat"}
    )  # as training leaves it
    return root


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """A MONAI Label datastore: one 4D NIfTI per case (channels in ``image_modalities_4d`` order) and its label."""
    demo = tmp_path_factory.mktemp("demo")
    make_demo_dataset(str(demo), num_cases=2, shape=(40, 40, 24), seed=4)
    store = tmp_path_factory.mktemp("studies")
    cases = []
    for case in ("Demo_000", "Demo_001"):
        files = [demo / case / f"{case}_{SUFFIX[m]}.nii.gz" for m in MSD_MODALITIES]
        image = stack_to_4d(files, store / f"{case}.nii.gz")
        (store / "labels").mkdir(exist_ok=True)
        label = shutil.copy(demo / case / f"{case}_seg.nii.gz", store / "labels" / f"{case}.nii.gz")
        cases.append({"image": image, "label": str(label)})
    return cases


def _label_server_parser(bundle_root, config):
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / config))
    parser.config.update({"bundle_root": str(bundle_root)})
    return parser


def test_info_labels_are_the_label_values_of_the_returned_map(app_bundle):
    metadata = json.loads((app_bundle / "configs" / "metadata.json").read_text())
    _, pred = next(iter(metadata["network_data_format"]["outputs"].items()))  # what BundleInferTask reads
    labels = {name.lower(): int(value) for value, name in pred["channel_def"].items() if name.lower() != "background"}
    assert labels == {"necrotic and non-enhancing tumor core": 1, "edema": 2, "enhancing tumor": 4}


def _served_and_own(app_bundle, image, tmp_path, monkeypatch):
    """The label map of 4D ``image`` as MONAI Label's ``BundleInferTask`` returns it, and the bundle's own."""
    monkeypatch.syspath_prepend(str(app_bundle))
    parser = _label_server_parser(app_bundle, "inference.json")
    parser.config.update({"device": "cpu"})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(app_bundle / "models" / "model.pt", weights_only=True), strict=True)
    network.eval()

    pre = list(parser.get_parsed_content("preprocessing").transforms)
    for t in pre:
        if isinstance(t, LoadImaged):
            t._loader.image_only = False  # as MONAI Label does: it needs the metadata to write the result
    post = [t for t in parser.get_parsed_content("postprocessing").transforms if not isinstance(t, SaveImaged)]
    inferer = parser.get_parsed_content("inferer")

    run(
        config_file=str(app_bundle / "configs" / "inference.json"),
        bundle_root=str(app_bundle),
        dataset_dir=str(image),
        output_dir=str(tmp_path),
        num_workers=0,
        progress=False,
    )
    name = os.path.basename(str(image)).split(".")[0]
    own = nib.load(str(tmp_path / f"{name}_seg.nii.gz"))

    data = Compose(pre)({"image": str(image)})
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    served = Compose(post)(data)["pred"]
    assert served.dtype == torch.uint8  # ITK, MONAI Label's writer, has no int64 image type
    assert np.allclose(served.affine, nib.load(str(image)).affine)  # the geometry MONAI Label writes it with
    return np.asarray(served).squeeze(0), own


def test_served_label_map_equals_the_bundle_inference(app_bundle, studies, tmp_path, monkeypatch):
    served, own = _served_and_own(app_bundle, studies[0]["image"], tmp_path, monkeypatch)
    assert served.shape == own.shape
    np.testing.assert_array_equal(served, np.asarray(own.dataobj))
    assert set(np.unique(served)) <= {0, 1, 2, 4}


def test_a_study_stored_sagittal_is_served_on_its_own_grid_as_the_axial_one(app_bundle, studies, tmp_path, monkeypatch):
    """Clinical inputs through ``/infer``: the same 4D study stored with sagittal slices (axes A, S, R) and
    flipped to L, is segmented in the canonical frame and returned on its own grid, voxel for voxel the axial
    study's map carried there."""
    axial = nib.load(studies[0]["image"])
    order = (1, 2, 0, 3)
    array = np.asarray(axial.dataobj).transpose(order)[:, :, ::-1]
    affine = axial.affine[:, [1, 2, 0, 3]]
    affine[:3, 3] += affine[:3, 2] * (array.shape[2] - 1)
    affine[:3, 2] *= -1
    sagittal = tmp_path / "studies" / "Demo_000.nii.gz"
    sagittal.parent.mkdir()
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), str(sagittal))

    served, own = _served_and_own(app_bundle, sagittal, tmp_path / "sagittal", monkeypatch)
    np.testing.assert_array_equal(served, np.asarray(own.dataobj))
    reference, _ = _served_and_own(app_bundle, studies[0]["image"], tmp_path / "axial", monkeypatch)
    np.testing.assert_array_equal(served, reference.transpose(order[:3])[:, :, ::-1])


@pytest.mark.slow
def test_training_with_monailabel_overrides_writes_a_model_it_can_serve(app_bundle, studies, tmp_path):
    bundle_root = tmp_path / "segan"
    shutil.copytree(app_bundle, bundle_root)
    model = bundle_root / "models" / "model.pt"
    before = torch.load(model, weights_only=True)
    parser = _label_server_parser(bundle_root, "train.json")
    handlers = parser.get("train#handlers")
    handlers.insert(
        0,
        {"_target_": "CheckpointLoader", "load_path": str(model), "load_dict": {"model": "$@network"}, "strict": False},
    )
    sys.path.insert(0, str(bundle_root))
    try:
        run(
            run_id="run",
            init_id=None,
            final_id=None,
            meta_file=str(bundle_root / "configs" / "metadata.json"),
            config_file=str(bundle_root / "configs" / "train.json"),
            bundle_root=str(bundle_root),
            **{
                "train#trainer#max_epochs": 1,
                "train#dataset#data": studies[:1],
                "validate#dataset#data": studies[1:],
                "device": "cpu",
                "train#handlers": handlers,
            },
            num_workers=0,
            slices_per_volume=2,
            volumes_per_batch=1,  # speed only: MONAI Label sets none of these
        )
    finally:
        sys.path.remove(str(bundle_root))
    after = torch.load(model, weights_only=True)
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert any(not torch.equal(after[k], before[k]) for k in before)  # fine-tuned, and written back for /infer
