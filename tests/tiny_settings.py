"""Config overrides that make a training run tiny: a few-kilobyte network on 32x32 slices, 2 epochs."""

TINY = {
    "features": [4, 8, 16, 32],
    "critic_features": [4, 8, 16],
    "crop_size": [32, 32, 12],
    "patch_size": [32, 32],
    "slices_per_volume": 4,
    "volumes_per_batch": 2,
    "val_batch_slices": 8,
    "num_workers": 0,
    "max_epochs": 2,
    "val_interval": 1,
}
