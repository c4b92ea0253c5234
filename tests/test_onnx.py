"""ONNX deployment: MONAI's ``onnx_export`` writes models/model.onnx, and ``backend: onnxruntime`` runs the same
pre- and post-processing around it, with outputs equal to eager PyTorch."""

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import ROOT
from monai.bundle import ConfigParser
from monai.bundle.scripts import onnx_export, run

from bundle.demo import make_demo_dataset

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

INFERENCE = str(ROOT / "configs" / "inference.json")
FEATURES = [4, 8, 16, 32]
# the README's command: traced (no torch.export), batch, height and width left dynamic
CONVERTER = {
    "dynamo": False,
    "input_names": ["image"],
    "output_names": ["pred"],
    "dynamic_axes": {"image": {0: "batch", 2: "height", 3: "width"}, "pred": {0: "batch", 2: "height", 3: "width"}},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    make_demo_dataset(str(root / "data"), num_cases=1, shape=(40, 37, 24), seed=5)
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update({"features": FEATURES})
    torch.manual_seed(0)
    (root / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
    onnx_export(
        net_id="network_def",
        filepath=str(root / "models" / "model.onnx"),
        ckpt_file=str(root / "models" / "model.pt"),
        meta_file=str(ROOT / "configs" / "metadata.json"),
        config_file=INFERENCE,
        use_trace=True,
        input_shape=[1, 3, 64, 64],
        converter_kwargs=CONVERTER,
        features=FEATURES,
    )
    return root


def test_onnxruntime_gives_the_eager_logits_at_any_batch_and_slice_size(root):
    from bundle.inferers import OnnxRuntimeNetwork

    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update({"features": FEATURES})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(root / "models" / "model.pt"))
    network.eval()
    onnx_network = OnnxRuntimeNetwork(str(root / "models" / "model.onnx"))
    for shape in [(1, 3, 64, 64), (5, 3, 48, 80)]:  # not the export's shape
        x = torch.randn(shape)
        with torch.no_grad():
            expected = network(x)
        torch.testing.assert_close(onnx_network(x), expected, rtol=0, atol=1e-4)


def test_the_onnxruntime_backend_writes_the_pytorch_label_map(root, tmp_path):
    maps = {}
    for backend in ("pytorch", "onnxruntime"):
        run(
            config_file=INFERENCE,
            bundle_root=str(root),
            dataset_dir=str(root / "data"),
            output_dir=str(tmp_path / backend),
            backend=backend,
            features=FEATURES,
            num_workers=0,
            progress=False,
        )
        maps[backend] = np.asarray(nib.load(str(tmp_path / backend / "Demo_000_seg.nii.gz")).dataobj)
    assert maps["pytorch"].any()
    assert (maps["onnxruntime"] != maps["pytorch"]).mean() < 1e-4  # at most a voxel whose logit rounds across 0


def test_a_missing_onnx_model_says_how_to_export_it(root, tmp_path):
    with pytest.raises(Exception) as error:
        run(
            config_file=INFERENCE,
            bundle_root=str(root),
            dataset_dir=str(root / "data"),
            output_dir=str(tmp_path),
            backend="onnxruntime",
            onnx_path=str(tmp_path / "none.onnx"),
            features=FEATURES,
            num_workers=0,
        )
    text = []
    e = error.value
    while e is not None:
        text.append(str(e))
        e = e.__cause__ or e.__context__
    assert "onnx_export" in "\n".join(text) and "none.onnx" in "\n".join(text)
