"""Names shared across the bundle: modalities and the label conventions of the BraTS releases."""

#: Channel order of every multi-file case written by the datalist builder and the demo generator.
MODALITIES = ("t1", "t1c", "t2", "flair")

#: Channel order of a 4D single-file case from the Medical Segmentation Decathlon (Task01_BrainTumour).
MSD_MODALITIES = ("flair", "t1", "t1c", "t2")

#: Region definitions (region name -> label values it contains), per dataset convention (BraTS, Menze et al. 2015;
# MSD, Antonelli et al. 2022).
#: "brats" covers BraTS 2013-2021: 1 necrosis / NCR, 2 edema, 3 non-enhancing (2013/2015 only), 4 enhancing.
#: "brats2023" covers BraTS 2023 (adult glioma): 1 NETC, 2 SNFH, 3 ET.
#: "brats2024" is the BraTS 2024 post-treatment glioma task (de Verdier et al. 2024): 1 NETC non-enhancing tumour
#: core, 2 SNFH surrounding FLAIR hyperintensity, 3 ET enhancing tissue, 4 RC resection cavity. RC is a region of
#: its own, disjoint from the tumour, and comes first: regions are painted back into a label map in order
#: (``REGION_LABEL_PRESETS``), so where both RC and a tumour region are predicted, the tumour wins (a residual or
#: recurrent tumour at the cavity's rim is what the post-treatment task is about; a voxel of cavity called tumour
#: costs the cavity's score, the reverse would cost the tumour's).
REGION_PRESETS = {
    "brats": {"whole_tumor": [1, 2, 3, 4], "tumor_core": [1, 3, 4], "enhancing_tumor": [4]},
    "brats2023": {"whole_tumor": [1, 2, 3], "tumor_core": [1, 3], "enhancing_tumor": [3]},
    "brats2024": {
        "resection_cavity": [4],
        "whole_tumor": [1, 2, 3],
        "tumor_core": [1, 3],
        "enhancing_tumor": [3],
    },
    "msd": {"whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [2]},
}

#: Mutually exclusive classes (class name -> label values), background included, for networks with a softmax
#: over classes (``multiclass``; Moeskops et al. 2017): the BraTS labels as classes. BraTS 2013/2015's
#: non-enhancing label 3 joins the necrotic core, as BraTS 2017+ merged them. A predicted class is written
#: back as its first label value.
CLASS_PRESETS = {
    "brats": {"background": [0], "necrotic_core": [1, 3], "edema": [2], "enhancing_tumor": [4]},
    "brats2023": {"background": [0], "necrotic_core": [1], "edema": [2], "enhancing_tumor": [3]},
    "brats2024": {
        "background": [0],
        "necrotic_core": [1],
        "edema": [2],
        "enhancing_tumor": [3],
        "resection_cavity": [4],
    },
    "msd": {"background": [0], "edema": [1], "enhancing_tumor": [2], "necrotic_core": [3]},
}

#: Label value painted for each region when a region prediction is turned back into a label map
#: (regions painted in order, so nested regions keep their innermost value, and brats2024's resection cavity,
#: painted first, gives way to any tumour region predicted at the same voxel).
REGION_LABEL_PRESETS = {"brats": [2, 1, 4], "brats2023": [2, 1, 3], "brats2024": [4, 2, 1, 3], "msd": [1, 3, 2]}

#: Image file extensions the bundle reads and writes, longest first so ".nii.gz" wins over ".nii".
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


def strip_image_suffix(name: str) -> str:
    """``name`` without its image extension (one of ``IMAGE_SUFFIXES``, any case); unchanged if it has none."""
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


#: What each label value written by the post-processing means, per convention (the values of
#: ``REGION_LABEL_PRESETS``: whole tumour outside the core, core outside the enhancing part, enhancing; for
#: brats2024 also the resection cavity), in the words of each challenge.
LABEL_NAMES = {
    "brats": {2: "edema", 1: "necrotic and non-enhancing tumor core", 4: "enhancing tumor"},
    "brats2023": {2: "edema", 1: "necrotic and non-enhancing tumor core", 3: "enhancing tumor"},
    "brats2024": {
        2: "surrounding non-enhancing FLAIR hyperintensity",
        1: "non-enhancing tumor core",
        3: "enhancing tissue",
        4: "resection cavity",
    },
    "msd": {1: "edema", 3: "necrotic and non-enhancing tumor core", 2: "enhancing tumor"},
}


def label_channel_def(convention: str = "brats") -> dict[str, str]:
    """``channel_def`` of the label map the inference writes: ``{"0": "background", "<value>": name, ...}``.

    ``configs/metadata.json`` holds the one of the configs' ``label_convention``; MONAI Label lists these
    names as the model's labels (skipping background) and trains on label maps with these values.
    """
    if convention not in LABEL_NAMES:
        raise ValueError(f"unknown label_convention {convention!r}; choose one of {list(LABEL_NAMES)}.")
    names = LABEL_NAMES[convention]
    return {"0": "background", **{str(v): names[v] for v in sorted(REGION_LABEL_PRESETS[convention])}}
