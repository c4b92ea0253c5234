"""Names shared across the bundle: modalities and the label conventions of the BraTS releases."""

#: Channel order of every multi-file case written by the datalist builder and the demo generator.
MODALITIES = ("t1", "t1c", "t2", "flair")

#: Channel order of a 4D single-file case from the Medical Segmentation Decathlon (Task01_BrainTumour).
MSD_MODALITIES = ("flair", "t1", "t1c", "t2")

#: Region definitions (region name -> label values it contains), per dataset convention (BraTS, Menze et al. 2015;
# MSD, Antonelli et al. 2022).
#: "brats" covers BraTS 2013-2021: 1 necrosis / NCR, 2 edema, 3 non-enhancing (2013/2015 only), 4 enhancing.
REGION_PRESETS = {
    "brats": {"whole_tumor": [1, 2, 3, 4], "tumor_core": [1, 3, 4], "enhancing_tumor": [4]},
    "brats2023": {"whole_tumor": [1, 2, 3], "tumor_core": [1, 3], "enhancing_tumor": [3]},
    "msd": {"whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [2]},
}

#: Mutually exclusive classes (class name -> label values), background included, for networks with a softmax
#: over classes (``multiclass``; Moeskops et al. 2017): the BraTS labels as classes. BraTS 2013/2015's
#: non-enhancing label 3 joins the necrotic core, as BraTS 2017+ merged them. A predicted class is written
#: back as its first label value.
CLASS_PRESETS = {
    "brats": {"background": [0], "necrotic_core": [1, 3], "edema": [2], "enhancing_tumor": [4]},
    "brats2023": {"background": [0], "necrotic_core": [1], "edema": [2], "enhancing_tumor": [3]},
    "msd": {"background": [0], "edema": [1], "enhancing_tumor": [2], "necrotic_core": [3]},
}

#: Label value painted for each region when a region prediction is turned back into a label map
#: (regions painted in order, so nested regions keep their innermost value).
REGION_LABEL_PRESETS = {"brats": [2, 1, 4], "brats2023": [2, 1, 3], "msd": [1, 3, 2]}

#: Image file extensions the bundle reads and writes, longest first so ".nii.gz" wins over ".nii".
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


def strip_image_suffix(name: str) -> str:
    """``name`` without its image extension (one of ``IMAGE_SUFFIXES``, any case); unchanged if it has none."""
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


#: What each label value written by the post-processing means, per convention (the values of
#: ``REGION_LABEL_PRESETS``: whole tumour outside the core, core outside the enhancing part, enhancing).
LABEL_NAMES = {
    "brats": {2: "edema", 1: "necrotic and non-enhancing tumor core", 4: "enhancing tumor"},
    "brats2023": {2: "edema", 1: "necrotic and non-enhancing tumor core", 3: "enhancing tumor"},
    "msd": {1: "edema", 3: "necrotic and non-enhancing tumor core", 2: "enhancing tumor"},
}


def label_channel_def(convention: str = "brats") -> dict[str, str]:
    """``channel_def`` of the label map the inference writes: ``{"0": "background", "<value>": name, ...}``.

    ``configs/metadata.json`` holds the one of the configs' ``label_convention``; MONAI Label lists these
    names as the model's labels (skipping background) and trains on label maps with these values.
    """
    if convention not in LABEL_NAMES:
        raise ValueError(f"unknown label_convention {convention!r}; choose one of {sorted(LABEL_NAMES)}.")
    names = LABEL_NAMES[convention]
    return {"0": "background", **{str(v): names[v] for v in sorted(REGION_LABEL_PRESETS[convention])}}
