"""Time the per-case evaluation metrics that are not MONAI's on one BraTS-sized (240x240x155) synthetic case.

    OMP_NUM_THREADS=1 python scripts/time_metrics.py --repeats 2
    OMP_NUM_THREADS=1 python scripts/time_metrics.py --salt 0.0005   # predictions with islands all over the frame

The reference is the label of ``bundle.phantom.make_demo_case`` (difficulty 0.5); the prediction of each region
(whole tumour, core, enhancing) is that region dilated by one voxel, plus, with ``--salt``, that fraction of the
frame's voxels switched on at random. Prints the seconds of ``bundle.metrics.brats_hd95`` and, when ``panoptica``
is installed, of ``bundle.lesionwise.lesion_wise_scores`` for the three regions, and their values.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import fire
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from bundle.metrics import brats_hd95  # noqa: E402
from bundle.phantom import make_demo_case  # noqa: E402


def main(repeats: int = 2, salt: float = 0.0, shape=(240, 240, 155), seed: int = 0) -> None:
    """Time HD95 and the lesion-wise scores of the three regions ``repeats`` times each, alternating."""
    _, label = make_demo_case(shape=tuple(shape), seed=seed, index=0, difficulty=0.5)
    truths = [np.isin(label, [1, 2, 4]), np.isin(label, [1, 4]), label == 4]
    rng = np.random.default_rng(seed)
    preds = [ndimage.binary_dilation(t, iterations=1) | (rng.random(t.shape) < salt) for t in truths]
    try:
        from bundle.lesionwise import lesion_evaluator, lesion_wise_scores

        evaluator = lesion_evaluator()
    except ImportError as error:
        print(f"lesion-wise scores skipped: {error}")
        evaluator = None
    for repeat in range(repeats):
        start = time.perf_counter()
        values = [brats_hd95(p, t, (1.0, 1.0, 1.0)) for p, t in zip(preds, truths)]
        print(f"[{repeat}] HD95, 3 regions: {time.perf_counter() - start:.2f} s  {np.round(values, 3).tolist()}")
        if evaluator is not None:
            start = time.perf_counter()
            scores = [lesion_wise_scores(p, t, (1.0, 1.0, 1.0), evaluator=evaluator) for p, t in zip(preds, truths)]
            seconds = time.perf_counter() - start
            summary = [(round(s["dice"], 3), int(s["tp"]), int(s["fp"]), int(s["fn"])) for s in scores]
            print(f"[{repeat}] lesion-wise, 3 regions: {seconds:.2f} s  (dice, tp, fp, fn) {summary}")


if __name__ == "__main__":
    fire.Fire(main)
