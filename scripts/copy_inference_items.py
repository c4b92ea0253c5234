"""Keep the copies of ``configs/inference.json`` items that let ``configs/evaluate.json`` compose on either base.

The model zoo evaluates with ``--config_file "['configs/train.json','configs/evaluate.json']"``; this bundle also
with ``['configs/inference.json', <overlays>, 'configs/evaluate.json']``. Both must evaluate the same way, and an
overlay placed before ``evaluate.json`` (``isic_inference.json``, ``segan3d_inference.json``) must keep its effect.
So the copies are split by what they are:

* ``train.json`` ends with the inference pipeline items it otherwise lacks (loading, slicing, inversion, writing,
  the evaluator), copied unchanged: unused by training, they are what ``evaluate.json`` patches;
* ``evaluate.json`` starts with the items ``train.json`` defines for training and inference reads from the recipe
  record beside the weights (widths, modalities, regions, ...), and the run lists: an evaluation always scores
  the weights as they were trained, whichever config it is composed on.

Run after changing ``inference.json``: ``python scripts/copy_inference_items.py`` rewrites both blocks (and
nothing else); ``tests/test_overlays.py`` fails, naming the items, while a copy is stale.
"""

from __future__ import annotations

import json
from pathlib import Path

import fire

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: The last item of train.json's own part; the inference copies follow it.
TRAIN_LAST = "training"
#: The first item of evaluate.json's own part; the inference copies precede it.
EVALUATE_FIRST = "data_list_key"


def _block(config: dict, keys) -> str:
    lines = []
    for key in keys:
        body = json.dumps(config[key], indent=4).replace("\n", "\n    ")
        lines.append(f"    {json.dumps(key)}: {body}")
    return ",\n".join(lines)


def _split(text: str, key: str) -> int:
    """The offset of the line defining top-level ``key`` in a config's text."""
    marker = f'\n    "{key}": '
    if text.count(marker) != 1:
        raise ValueError(f"expected one top-level '{key}' item in the config text, found {text.count(marker)}.")
    return text.index(marker) + 1


def plan(configs: Path = CONFIGS) -> tuple[list[str], list[str]]:
    """(items train.json must carry, items evaluate.json must carry), from the current files."""
    inference = json.loads((configs / "inference.json").read_text())
    train_text = (configs / "train.json").read_text()
    train = json.loads(train_text)
    own = {key: train[key] for key in list(train)[: list(train).index(TRAIN_LAST) + 1]}
    evaluate_text = (configs / "evaluate.json").read_text()
    evaluation = json.loads("{\n" + evaluate_text[_split(evaluate_text, EVALUATE_FIRST) :])
    for_train = [k for k in inference if k not in own and k not in evaluation]
    for_evaluate = [k for k in inference if k in own and own[k] != inference[k] and k not in evaluation]
    return for_train, for_evaluate


def main(configs: str = "") -> None:
    """Rewrite the copied blocks of train.json and evaluate.json from inference.json."""
    folder = Path(configs) if configs else CONFIGS
    inference = json.loads((folder / "inference.json").read_text())
    for_train, for_evaluate = plan(folder)

    train_text = (folder / "train.json").read_text()
    start = _split(train_text, TRAIN_LAST)
    end = train_text.index("\n    ]", start) + len("\n    ]")
    train_text = train_text[:end] + (",\n" + _block(inference, for_train) if for_train else "") + "\n}\n"
    json.loads(train_text)
    (folder / "train.json").write_text(train_text)

    evaluate_text = (folder / "evaluate.json").read_text()
    own = evaluate_text[_split(evaluate_text, EVALUATE_FIRST) :]
    evaluate_text = "{\n" + (_block(inference, for_evaluate) + ",\n" if for_evaluate else "") + own
    json.loads(evaluate_text)
    (folder / "evaluate.json").write_text(evaluate_text)
    print(f"train.json carries {len(for_train)} inference items: {', '.join(for_train)}")
    print(f"evaluate.json carries {len(for_evaluate)}: {', '.join(for_evaluate)}")


if __name__ == "__main__":
    fire.Fire(main)
