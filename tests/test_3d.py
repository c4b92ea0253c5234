"""3D SegAN (issue 18, beyond the paper, which stayed 2D "due to the limitation of our hardware memory"): the same
segmentor, critics and min-max game with ``spatial_dims`` 3, trained on random patches
(``configs/variants/segan3d.json``) and segmenting whole volumes by sliding windows
(``configs/segan3d_inference.json``) with the 2D recipe's pre- and post-processing."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import ROOT
from monai.bundle import ConfigParser
from monai.transforms import Compose

from bundle.demo import make_demo_dataset
from bundle.engines import SegANTrainer
from bundle.losses import MultiScaleL1Loss
from bundle.networks import SegANCritic, SegANCritics, SegANSegmentor

CONFIGS = ROOT / "configs"
TRAIN_3D = [str(CONFIGS / "train.json"), str(CONFIGS / "variants" / "segan3d.json")]
INFERENCE_3D = [str(CONFIGS / "inference.json"), str(CONFIGS / "segan3d_inference.json")]
FEATURES = [4, 8, 16, 32]
#: A 3D run small enough for two CPU cores: 16^3 patches, two volumes of two patches a batch.
TINY_3D = {
    "features": FEATURES,
    "critic_features": [4, 8, 16],
    "roi_size": [16, 16, 16],
    "patches_per_volume": 2,
    "volumes_per_batch": 2,
    "sw_batch_size": 4,
    "num_workers": 0,
    "max_epochs": 1,
    "val_interval": 1,
}


def _segmentor_parameters(c_in, c_out, features, skip="cat"):
    """Parameters of the 3D segmentor by hand: 4x4x4 down convs (bias only in the first, BN elsewhere), 3x3x3 up
    convs with BN, a last 3x3x3 conv with bias."""
    count, widths = 0, [c_in, *features]
    for i in range(len(features)):
        count += widths[i] * widths[i + 1] * 64 + (widths[i + 1] if i == 0 else 2 * widths[i + 1])
    for level in range(len(features) - 1, 0, -1):
        width_in = features[level] * (2 if skip == "cat" and level < len(features) - 1 else 1)
        count += width_in * features[level - 1] * 27 + 2 * features[level - 1]
    width_in = features[0] * (2 if skip == "cat" else 1)
    return count + width_in * c_out * 27 + c_out


@pytest.mark.parametrize("skip", ["cat", "add"])
def test_3d_segmentor_keeps_the_volume_shape_with_4x4x4_down_and_3x3x3_up_blocks(skip):
    net = SegANSegmentor(spatial_dims=3, in_channels=3, out_channels=3, features=FEATURES, skip=skip)
    assert net(torch.randn(2, 3, 32, 16, 48)).shape == (2, 3, 32, 16, 48)
    down = [m for block in net.encoder for m in block.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(c.kernel_size == (4, 4, 4) and c.stride == (2, 2, 2) for c in down)
    up = [m for m in net.modules() if isinstance(m, torch.nn.Upsample)]
    assert up and all(u.mode == "trilinear" for u in up)
    assert sum(p.numel() for p in net.parameters()) == _segmentor_parameters(3, 3, FEATURES, skip)


def test_3d_segmentor_at_paper_widths_has_the_expected_parameter_count():
    net = SegANSegmentor(spatial_dims=3, in_channels=3, out_channels=3)
    assert sum(p.numel() for p in net.parameters()) == _segmentor_parameters(3, 3, [64, 128, 256, 512])


def test_3d_critic_features_are_the_masked_volume_and_every_block():
    critic = SegANCritic(spatial_dims=3, in_channels=3, features=(4, 8, 16))
    feats = critic(torch.randn(2, 3, 16, 16, 16))
    assert [tuple(f.shape) for f in feats] == [(2, 3 * 16**3), (2, 4 * 8**3), (2, 8 * 4**3), (2, 16 * 2**3)]
    critics = SegANCritics(spatial_dims=3, in_channels=3, num_regions=3, features=(4, 8, 16))
    # conv weights 4x4x4, BatchNorm without affine (clip_params "weights"): only conv weights and the first bias
    assert sum(p.numel() for p in critics.parameters()) == 3 * (3 * 4 * 64 + 4 + 4 * 8 * 64 + 8 * 16 * 64)
    assert len(critics(torch.randn(2, 3, 16, 16, 16), torch.rand(2, 3, 16, 16, 16))) == 3


def test_gradient_checkpointing_changes_memory_not_the_result():
    torch.manual_seed(0)
    plain = SegANSegmentor(spatial_dims=3, features=FEATURES)
    saving = SegANSegmentor(spatial_dims=3, features=FEATURES, gradient_checkpointing=True)
    saving.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 16, 16, 16)
    out_plain, out_saving = plain(x), saving(x)
    torch.testing.assert_close(out_saving, out_plain)
    out_plain.square().mean().backward()
    out_saving.square().mean().backward()
    for p, q in zip(plain.parameters(), saving.parameters()):
        torch.testing.assert_close(q.grad, p.grad)
    scripted = torch.jit.script(saving.eval())  # the checkpointed path is training-only: export is unchanged
    torch.testing.assert_close(scripted(x), saving(x))


def test_the_recipe_turns_gradient_checkpointing_on_by_one_key():
    parser = ConfigParser()
    parser.read_config(TRAIN_3D)
    parser.update({"features": FEATURES, "gradient_checkpointing": True})
    network = parser.get_parsed_content("network_def")
    assert network.gradient_checkpointing and isinstance(network.encoder[0].conv, torch.nn.Conv3d)
    assert parser.get_parsed_content("critic_def#spatial_dims") == 3


def _volume_batch():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 2, 16, 16, 16, generator=g) + 0.5
    label = torch.zeros(2, 2, 16, 16, 16)
    label[:, 0, 4:12, 4:12, 4:12] = 1
    label[:, 1, 6:10, 6:10, 6:10] = 1
    return {"image": image, "label": label}


def _trainer_3d(seg_lr, critic_lr, epochs=1):
    torch.manual_seed(0)
    seg = SegANSegmentor(spatial_dims=3, in_channels=2, out_channels=2, features=FEATURES)
    critic = SegANCritics(spatial_dims=3, in_channels=2, num_regions=2, features=(4, 8, 16), clip_params="all")
    return SegANTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=[_volume_batch()],
        network=seg,
        critic=critic,
        optimizer=torch.optim.SGD(seg.parameters(), lr=seg_lr),
        critic_optimizer=torch.optim.SGD(critic.parameters(), lr=critic_lr),
        clip=0.05 if critic_lr else None,
    )


def _loss_3d(trainer, pred=None):
    b = _volume_batch()
    with torch.no_grad():
        trainer.network.train()
        trainer.critic.train()
        pred = torch.sigmoid(trainer.network(b["image"])) if pred is None else pred
        return MultiScaleL1Loss()(trainer.critic(b["image"], pred), trainer.critic(b["image"], b["label"])).item()


def test_3d_critic_step_ascends_the_loss_for_a_fixed_segmentor():
    trainer = _trainer_3d(seg_lr=0.0, critic_lr=1e-3)
    trainer.critic.clamp_(trainer.clip)
    with torch.no_grad():
        trainer.network.train()
        fixed = torch.sigmoid(trainer.network(_volume_batch()["image"]))
    before = _loss_3d(trainer, fixed)
    trainer.run()
    assert _loss_3d(trainer, fixed) > before


def test_3d_segmentor_step_descends_the_loss_through_a_fixed_critic():
    trainer = _trainer_3d(seg_lr=0.5, critic_lr=0.0, epochs=5)
    before = _loss_3d(trainer)
    trainer.run()
    assert _loss_3d(trainer) < before


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segan3d") / "demo"
    make_demo_dataset(str(folder), num_cases=4, shape=(40, 36, 26), seed=4)
    return folder


def _inference_parser(data, **overrides):
    parser = ConfigParser()
    parser.read_config(INFERENCE_3D)
    parser.update(
        {
            "dataset_dir": str(data),
            "features": FEATURES,
            "roi_size": [16, 16, 16],
            "sw_batch_size": 4,
            "num_workers": 0,
            **overrides,
        }
    )
    return parser


class _VoxelwiseLogits(torch.nn.Module):
    """A stand-in segmentor whose logit at a voxel depends on that voxel only: the first channel minus 0.25."""

    def forward(self, x):
        return (x[:, :1] - 0.25).repeat(1, 3, *([1] * (x.dim() - 2)))


def test_sliding_windows_restack_every_voxel_to_its_place_in_the_input_geometry(data):
    parser = _inference_parser(data, head_guard=False)
    case = parser.get_parsed_content("dataset#data")[0]
    item = parser.get_parsed_content("preprocessing")(case)
    inferer = parser.get_parsed_content("inferer")
    assert type(inferer).__name__ == "ForegroundSlidingWindowInferer" and inferer.mode == "gaussian"
    assert any(s > 16 for s in item["image"].shape[1:])  # several overlapping windows, blended
    item["pred"] = inferer(item["image"].unsqueeze(0), _VoxelwiseLogits())[0]
    item = Compose(parser.get_parsed_content("prediction_transforms"))(item)

    reference = Compose(parser.get_parsed_content("image_transforms")[:5])(case)["image"]  # normalised, uncropped
    expected = (reference[0] > 0.25).numpy()
    assert tuple(item["pred"].shape[1:]) == expected.shape == nib.load(case["image"][0]).shape
    assert expected.any() and (item["pred"][0].numpy() > 0).tolist() == expected.tolist()


def test_a_case_with_no_head_gets_an_empty_map_without_a_network_call():
    from bundle.volumetric import ForegroundSlidingWindowInferer

    inferer = ForegroundSlidingWindowInferer(out_channels=3, roi_size=[16, 16, 16])
    out = inferer(torch.zeros(1, 3, 0, 0, 0), lambda x: pytest.fail("no window to segment"))
    assert out.shape == (1, 3, 0, 0, 0)


def test_the_3d_recipe_autocasts_its_networks_to_bfloat16_on_a_cpu(data, tmp_path):
    parser = ConfigParser()
    parser.read_config(TRAIN_3D)
    parser.update(
        {
            **TINY_3D,
            "bundle_root": str(tmp_path),
            "dataset_dir": str(data),
            "amp": "true",
            "amp_dtype": "bfloat16",
            "progress": False,
            "tensorboard": False,
        }
    )
    trainer = parser.get_parsed_content("train#trainer")
    dtypes = {}
    for role in ("network", "critic"):
        conv = next(m for m in parser.get_parsed_content(role).modules() if isinstance(m, torch.nn.Conv3d))
        conv.register_forward_hook(lambda m, i, out, role=role: dtypes.setdefault(role, out.dtype) and None)
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: engine.terminate())
    trainer.run()
    assert dtypes == {"network": torch.bfloat16, "critic": torch.bfloat16}
    output = trainer.state.output
    assert output["image"].shape == (4, 3, 16, 16, 16) and output["label"].shape == (4, 3, 16, 16, 16)
    assert output["pred"].dtype == torch.float32 and torch.isfinite(output["loss"])


def _options(settings):
    return [a for k, v in settings.items() for a in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One epoch (two iterations) of the 3D recipe through ``python -m monai.bundle run training``, bf16 autocast."""
    root = tmp_path_factory.mktemp("run3d")
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        json.dumps(TRAIN_3D),
        *_options(
            {
                **TINY_3D,
                "bundle_root": str(root),
                "dataset_dir": str(data),
                "amp": "true",
                "amp_dtype": "bfloat16",
                "progress": "false",
                "tensorboard": "false",
            }
        ),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, done.stdout + done.stderr


@pytest.mark.slow
def test_the_3d_recipe_trains_through_monai_bundle_run_with_bf16_autocast(trained):
    root, log = trained
    assert "non-finite" not in log.lower() and "Epoch[1] Complete" in log
    state = torch.load(root / "models" / "model.pt", map_location="cpu")
    assert state["encoder.0.conv.weight"].shape == (4, 3, 4, 4, 4)  # a 3D segmentor was trained and saved


@pytest.mark.slow
def test_3d_inference_writes_label_maps_in_the_input_geometry(trained, data, tmp_path):
    root, _ = trained
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        json.dumps(INFERENCE_3D),
        *_options(
            {
                "bundle_root": str(root),
                "dataset_dir": str(data),
                "output_dir": str(tmp_path),
                "roi_size": [16, 16, 16],
                "num_workers": 0,
                "progress": "false",
            }
        ),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for image in sorted(data.glob("Demo_000/*t1c*")) + sorted(data.glob("Demo_003/*t1c*")):
        written = nib.load(str(tmp_path / f"{image.parent.name}_seg.nii.gz"))
        source = nib.load(str(image))
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 4}


@pytest.mark.slow
def test_the_3d_segmentor_exports_to_torchscript_and_onnx(trained, tmp_path):
    root, _ = trained
    from monai.bundle.scripts import ckpt_export

    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(root / "models" / "model.pt"),
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=INFERENCE_3D,
        features=FEATURES,
    )
    parser = ConfigParser()
    parser.read_config(INFERENCE_3D)
    parser.update({"features": FEATURES, "ckpt_path": str(root / "models" / "model.pt")})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(root / "models" / "model.pt", map_location="cpu"))
    network.eval()
    x = torch.randn(1, 3, 16, 32, 48)
    with torch.no_grad():
        expected = network(x)
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "model.ts"))(x), expected)

    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from monai.bundle.scripts import onnx_export

    axes = {0: "batch", 2: "height", 3: "width", 4: "depth"}
    onnx_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.onnx"),
        ckpt_file=str(root / "models" / "model.pt"),
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=INFERENCE_3D,
        use_trace=True,
        input_shape=[1, 3, 32, 32, 32],
        features=FEATURES,
        converter_kwargs={
            "dynamo": False,
            "input_names": ["image"],
            "output_names": ["pred"],
            "dynamic_axes": {"image": axes, "pred": axes},
        },
    )
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": x.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)


def test_the_3d_metadata_overlay_states_volume_shapes_that_verify_net_in_out_accepts():
    from monai.bundle.scripts import verify_net_in_out

    verify_net_in_out(
        net_id="network_def",
        meta_file=[str(CONFIGS / "metadata.json"), str(CONFIGS / "segan3d_metadata.json")],
        config_file=INFERENCE_3D,
        features=FEATURES,
    )
    with pytest.raises(RuntimeError):  # the 2D metadata's slice shape does not fit a 3D network
        verify_net_in_out(
            net_id="network_def", meta_file=str(CONFIGS / "metadata.json"), config_file=INFERENCE_3D, features=FEATURES
        )


def test_the_export_origin_check_probes_a_3d_network_with_a_volume(tmp_path):
    from bundle.networks import SegANSegmentor
    from bundle.provenance import check_origin

    network = SegANSegmentor(spatial_dims=3, in_channels=3, out_channels=3, features=(4, 8, 16, 32))
    weights = tmp_path / "model.pt"
    torch.save(network.state_dict(), weights)
    export = tmp_path / "model.onnx"
    export.write_bytes(b"stands in for an export")
    network.eval()
    with torch.no_grad():
        assert check_origin(str(export), str(weights), run_export=network, network=network, in_channels=3) == "computed"
