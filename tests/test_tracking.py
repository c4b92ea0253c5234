"""What a training run leaves for watching it: TensorBoard events (when tensorboard is installed), a PNG of the
loss and Dice curves beside ``validation_metrics.json``, and a progress bar instead of a log line per iteration."""

from types import SimpleNamespace

import pytest
from helpers import ROOT, TINY
from monai.bundle import ConfigParser
from monai.bundle.scripts import run

TRAIN = str(ROOT / "configs" / "train.json")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("bundle")
    run("training", config_file=TRAIN, bundle_root=str(root), dataset_dir=str(demo_dir), **TINY)
    return root


@pytest.mark.slow
def test_training_draws_loss_and_dice_curves_beside_the_validation_metrics(trained):
    curves = trained / "eval" / "training_curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trained / "eval" / "validation_metrics.json").is_file()


@pytest.mark.slow
def test_tensorboard_events_hold_losses_learning_rates_and_region_dice(trained):
    pytest.importorskip("tensorboard", reason="TensorBoard events are written only when tensorboard is installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "eval" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "adversarial_loss", "critic_loss", "lr_segmentor", "lr_critic"} <= tags
    assert {"val_mean_dice", "val_dice_whole_tumor", "val_dice_tumor_core", "val_dice_enhancing_tumor"} <= tags
    assert [e.step for e in events.Scalars("val_mean_dice")] == [1, 2]


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_replaces_the_log_line_per_iteration(progress):
    """With the bar (the default) the losses are logged once per epoch, at its last iteration; without it, every one."""
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"progress": progress})
    handlers = parser.get("train#handlers")
    bar = next(i for i, h in enumerate(handlers) if h["_target_"] == "ignite.handlers.ProgressBar")
    stats = next(i for i, h in enumerate(handlers) if h["_target_"] == "StatsHandler")
    assert parser.get_parsed_content(f"train#handlers#{bar}#_disabled_") is (not progress)
    iteration_log = parser.get_parsed_content(f"train#handlers#{stats}#iteration_log")
    engine = SimpleNamespace(state=SimpleNamespace(epoch_length=3))
    logged = [i for i in range(1, 7) if (iteration_log(engine, i) if callable(iteration_log) else iteration_log)]
    assert logged == ([3, 6] if progress else [1, 2, 3, 4, 5, 6])


@pytest.mark.slow
def test_mlflow_tracking_logs_losses_and_validation_dice(tmp_path, demo_dir):
    """``--tracking configs/mlflow.json``: MONAI's bundle tracking, with a trainer handler that reads this trainer's losses."""
    pytest.importorskip("mlflow", reason="mlflow is not installed (heavy; not in the test extra)")
    import mlflow
    from monai.utils import path_to_sqlite_uri

    run(
        "training",
        config_file=TRAIN,
        bundle_root=str(tmp_path),
        dataset_dir=str(demo_dir),
        tracking=str(ROOT / "configs" / "mlflow.json"),
        **TINY,
    )
    client = mlflow.tracking.MlflowClient(tracking_uri=path_to_sqlite_uri(str(tmp_path / "eval" / "mlruns.db")))
    (run_info,) = client.search_runs([client.get_experiment_by_name("segan").experiment_id])
    assert {"loss", "adversarial_loss", "critic_loss", "val_mean_dice", "val_dice_whole_tumor"} <= set(
        run_info.data.metrics
    )
    assert [m.step for m in client.get_metric_history(run_info.info.run_id, "val_mean_dice")] == [1, 2]
