"""Ensembles at inference: several trained segmentors (the folds of a cross-validation, or models trained with other
widths or seeds) whose probabilities are averaged before the usual thresholding.

``configs/inference.json`` takes ``--ensemble "['fold0/models/model.pt', 'fold1/models/model.pt', ...]"`` (default
``[]``: the single model of ``ckpt_path``, unchanged). Its ``network`` is then an :class:`EnsembleNetwork` built by
:func:`ensemble_network`, whose forward returns the logit of the averaged probability, so the inferer and the
post-processing (sigmoid or softmax, threshold or argmax, head guard, inversion, label map) are those of one model.

Every member brings its recipe record (``model_recipe.json`` beside it, :func:`bundle.checkpoints.read_recipe`):
they must agree on what they take as input and what they output (:data:`AGREED_SETTINGS`), or the run is refused
naming both files and the setting; widths and skip mode may differ, since each member's network is built from its
own recipe, as the config builds ``network_def`` for one model. ``ckpt_path`` defaults to the first member, whose
recipe sets the run's pre- and post-processing and whose split record evaluation reads; :func:`check_held_out`
refuses evaluating a case that any member was trained on.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .checkpoints import RECIPE_SETTINGS

__all__ = [
    "AGREED_SETTINGS",
    "EnsembleNetwork",
    "logit_of_mean",
    "member_paths",
    "slice_axes",
    "first_member",
    "check_members",
    "ensemble_network",
    "check_held_out",
    "pack",
    "packed_network_def",
]

logger = logging.getLogger(__name__)

#: Recipe settings every member of an ensemble must share: what the members take as input and what they output.
#: ``features`` and ``skip`` (the network's widths and skip mode) may differ, and ``slice_axis`` (a multi-view
#: ensemble: each member sees the volume along the axis it was trained on).
AGREED_SETTINGS = tuple(name for name in RECIPE_SETTINGS if name not in ("features", "skip", "slice_axis", "ensemble"))

#: The config keys holding the run's value of each of :data:`AGREED_SETTINGS` (``multiclass`` is parsed there).
_RUN_KEYS = {name: ("is_multiclass" if name == "multiclass" else name) for name in AGREED_SETTINGS}

#: Probabilities are kept in ``[eps, 1 - eps]`` before their logit is taken, so that the output stays finite.
_EPS = 1e-6

_HOW = (
    "Train the members with the same settings (only `features`, `skip` and `slice_axis` may differ), or drop the "
    "odd one."
)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def logit_of_mean(outputs: Sequence[tuple[torch.Tensor, int]], multiclass: bool = False) -> torch.Tensor:
    """The logit of the weighted mean probability of ``outputs``, pairs of (logits, weight).

    Region models: the sigmoids ``p`` are averaged and ``log(p / (1 - p))`` returned, so a sigmoid gives the mean
    back and thresholding it at 0.5 is thresholding the mean. Multiclass models: the softmaxes over the channel
    axis are averaged and ``log(p)`` returned, whose softmax is ``p`` (it sums to 1) and whose argmax is the mean's.
    Probabilities are clipped to ``[1e-6, 1 - 1e-6]`` first, so the logits are finite (this moves no threshold or
    argmax). A weight counts a logit as that many members (a view's own ensemble).
    """
    total, count = None, 0
    for logits, weight in outputs:
        logits = logits.float()
        p = (torch.softmax(logits, dim=1) if multiclass else torch.sigmoid(logits)).mul_(weight)
        total, count = (p if total is None else total.add_(p)), count + weight
    mean = total.div_(count).clamp_(_EPS, 1.0 - _EPS)
    return mean.log_() if multiclass else torch.logit(mean)


class EnsembleNetwork(torch.nn.Module):
    """Member segmentors run on the same input; the output is the logit of their averaged probability
    (:func:`logit_of_mean`). One member is returned as it is, unchanged.

    Members trained along different axes (``slice_axes``, each member's recipe ``slice_axis``) form a multi-view
    ensemble: each sees its own view of the volume, so they cannot share slices; :meth:`views` groups them by
    axis for :class:`bundle.inferers.ForegroundSliceInferer`, which averages every member's probability.

    Args:
        members: the member networks (``torch.nn.Module``, or callables such as
            :class:`bundle.inferers.OnnxRuntimeNetwork`), each giving logits of the same shape.
        multiclass: softmax over channels (``True``) or a sigmoid per channel (``False``).
        names: the members' weight files, for messages.
        slice_axes: the stored axis each member slices along; default all 2 (axial).
    """

    def __init__(
        self,
        members: Sequence[torch.nn.Module],
        multiclass: bool = False,
        names: Sequence[str] = (),
        slice_axes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member network.")
        self.members = torch.nn.ModuleList(members)
        self.multiclass = bool(multiclass)
        self.names = [str(n) for n in names]
        self.slice_axes = [int(a) for a in slice_axes] or [2] * len(members)
        if len(self.slice_axes) != len(members):
            raise ValueError(f"{len(self.slice_axes)} slice axes for {len(members)} ensemble members.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(set(self.slice_axes)) > 1:
            raise RuntimeError(
                f"ensemble members slice along axes {self.slice_axes}: run it through "
                "bundle.inferers.ForegroundSliceInferer, which gives each view its own slices."
            )
        if len(self.members) == 1:
            return self.members[0](x)
        return logit_of_mean([(member(x), 1) for member in self.members], self.multiclass)

    def views(self) -> list[tuple[int, torch.nn.Module, int]]:
        """(slice axis, the ensemble of the members along it, how many they are) per axis, in axis order."""
        groups = []
        for axis in sorted(set(self.slice_axes)):
            chosen = [i for i, a in enumerate(self.slice_axes) if a == axis]
            if len(chosen) == len(self.members):
                groups.append((axis, self, len(chosen)))
                continue
            part = EnsembleNetwork(
                [self.members[i] for i in chosen],
                self.multiclass,
                [self.names[i] for i in chosen if i < len(self.names)],
                [axis] * len(chosen),
            )
            groups.append((axis, part, len(chosen)))
        return groups


def member_paths(ensemble: Any) -> list[str]:
    """The weight files of ``--ensemble`` (a list of paths), each checked to be a file; ``[]`` for none."""
    if ensemble is None or (isinstance(ensemble, (list, tuple)) and not ensemble):
        return []
    if not isinstance(ensemble, (list, tuple)) or not all(isinstance(p, (str, os.PathLike)) for p in ensemble):
        raise ValueError(
            f"ensemble must be a list of weight files, e.g. --ensemble \"['fold0/models/model.pt','fold1/models/"
            f"model.pt']\", not {ensemble!r}."
        )
    paths = [os.fspath(p) for p in ensemble]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"ensemble member(s) {', '.join(repr(p) for p in missing)}: no such file. List the model.pt files "
            "training wrote (models/model.pt under each run's bundle_root)."
        )
    seen: dict[str, str] = {}
    for path in paths:
        key = os.path.realpath(path)
        if key in seen:
            raise ValueError(f"ensemble lists the same weights twice ('{seen[key]}' and '{path}'): list each once.")
        seen[key] = path
    return paths


def slice_axes(ensemble: Any) -> list[int]:
    """The stored axis each member of ``ensemble`` slices along, from its recipe record (2 where none is recorded)."""
    from .checkpoints import read_recipe

    return [int(read_recipe(path).get("slice_axis", 2)) for path in member_paths(ensemble)]


def first_member(ensemble: Any) -> str:
    """The first weight file of ``ensemble``; ``""`` for none (``ckpt_path`` then keeps its default)."""
    paths = member_paths(ensemble)
    return paths[0] if paths else ""


def check_members(ensemble: Any, settings: Mapping[str, Any] | None = None) -> list[dict]:
    """The recipes of the members, once seen to agree on :data:`AGREED_SETTINGS`; an error naming both files if not.

    A member without a recipe record is refused (what it takes and gives cannot be checked). With ``settings``
    (the run's values, from ``ckpt_path``'s recipe and the command line), a member whose recipe contradicts one
    is refused too, naming the setting, the member and both values.
    """
    from .checkpoints import read_recipe, recipe_path

    paths = member_paths(ensemble)
    recipes = []
    for path in paths:
        recipe = read_recipe(path)
        if not recipe:
            others = [p for p in paths if p != path]
            against = f" against '{others[0]}'" if others else ""
            raise ValueError(
                f"ensemble member '{path}' has no recipe record ('{recipe_path(path)}'), so what it takes as input "
                f"and outputs cannot be checked{against}. Use weights written by this bundle's training (it records "
                "the recipe beside model.pt), or write the record with bundle.checkpoints.write_recipe."
            )
        recipes.append(recipe)
    first, reference = paths[0], recipes[0]
    for path, recipe in zip(paths[1:], recipes[1:]):
        for name in AGREED_SETTINGS:
            mine, theirs = recipe.get(name, "<not recorded>"), reference.get(name, "<not recorded>")
            if _plain(mine) != _plain(theirs):
                raise ValueError(
                    f"ensemble members disagree on `{name}`: '{first}' was trained with {name} {_plain(theirs)!r}, "
                    f"'{path}' with {_plain(mine)!r} (recorded in '{recipe_path(first)}' and '{recipe_path(path)}'). "
                    f"{_HOW}"
                )
    for path, recipe in zip(paths, recipes):
        for name, value in (settings or {}).items():
            if name in recipe and _plain(value) != _plain(recipe[name]):
                raise ValueError(
                    f"`{name}` is {_plain(value)!r} in this run, but ensemble member '{path}' was trained with {name} "
                    f"{_plain(recipe[name])!r} (recorded in '{recipe_path(path)}'). Drop the --{name} override, or "
                    "point --ckpt_path at one of the members (by default it is the first)."
                )
    return recipes


def _parser(parser=None):
    if parser is not None:
        return parser
    from .bootstrap import running_parser

    found = running_parser()
    if found is None:
        raise RuntimeError("ensemble_network() found no ConfigParser to read: pass one, or call it from a config.")
    return found


def _member_network(parser, path: str) -> torch.nn.Module:
    """``network_def`` as the config builds it for the single model at ``path`` (its recipe, the run's overrides)."""
    from monai.bundle import ConfigParser

    member = ConfigParser(copy.deepcopy(parser.get()))
    resolved = {key: parser.get_parsed_content(key) for key in ("bundle_root", "segan")}  # not evaluated again
    member.update({**resolved, "ensemble": [], "ckpt_path": path})
    return member.get_parsed_content("network_def")


def ensemble_network(
    ensemble: Any,
    backend: str = "pytorch",
    device: str | torch.device = "cpu",
    channels_last: bool | str = False,
    compile: bool | str = False,
    parser=None,
) -> EnsembleNetwork:
    """The :class:`EnsembleNetwork` of the weight files in ``ensemble``, each member loaded and checked.

    Called from ``configs/inference.json``'s ``network`` when ``ensemble`` is not empty. The members' recipes are
    checked first (:func:`check_members`, against each other and the run's settings, read from ``parser``: the
    config running this call by default). Each member's network is the config's ``network_def`` built for that
    member alone (``ckpt_path`` set to it: its widths and skip mode, checked against its tensors), its weights
    checked (:func:`bundle.checkpoints.trained_weights`) and loaded strictly. With ``backend`` ``onnxruntime``
    each member runs its export beside it (``fold0/models/model.pt`` -> ``fold0/models/model.onnx``), checked
    to come from those weights (:func:`bundle.provenance.check_origin`).
    """
    from monai.utils import look_up_option

    from .checkpoints import _load_state, trained_weights
    from .speed import place_network

    parser = _parser(parser)
    backend = look_up_option(backend, ["pytorch", "onnxruntime"])
    settings = {name: parser.get_parsed_content(key) for name, key in _RUN_KEYS.items()}
    paths = member_paths(ensemble)
    recipes = check_members(paths, settings)
    axes = [int(recipe.get("slice_axis", 2)) for recipe in recipes]
    if len(set(axes)) > 1 and int(settings.get("context_slices", 0)):
        raise ValueError(
            f"ensemble members slice along different axes ({dict(zip(paths, axes))}) and take context_slices "
            f"{settings['context_slices']}: neighbouring slices are stacked along one axis for all members. Ensemble "
            "views only of models trained with context_slices 0, or ensemble models of one slice_axis."
        )
    members: list[torch.nn.Module] = []
    for path in paths:
        network = _member_network(parser, path)
        if backend == "onnxruntime":
            from .inferers import OnnxRuntimeNetwork

            members.append(OnnxRuntimeNetwork(os.path.splitext(path)[0] + ".onnx", weights=path, reference=network))
            continue
        trained_weights(path, network)
        network.load_state_dict(_load_state(path))
        members.append(place_network(network, device, channels_last=channels_last, compile=compile))
    views = "" if len(set(axes)) == 1 else f" along slice axes {axes}"
    logger.info(f"ensemble of {len(paths)} model(s){views}: {', '.join(paths)}")
    return EnsembleNetwork(members, multiclass=settings["multiclass"], names=paths, slice_axes=axes).eval()


def check_held_out(ensemble: Any, items: Sequence[Mapping], parser=None) -> None:
    """Refuse evaluating an ensemble on a case one of its members was trained on, naming the case and the member.

    Evaluation (``configs/evaluate.json``) reads the split record of ``ckpt_path`` only (the first member by
    default); the folds of a cross-validation were each trained on the others' validation cases, so those would
    be scored by a model that saw them. Each member's split record (``datalist.json`` beside it) is read; a
    member without one is not checked. Plain inference (a config with no ``key_metric``) is not restricted.
    """
    paths = member_paths(ensemble)
    if not paths:
        return
    parser = _parser(parser)
    if "key_metric" not in parser:
        return
    from .cases import case_id
    from .datalist import _split_record

    cases = [str(case_id(item)) for item in items if isinstance(item, Mapping)]
    for path in paths:
        record_path, record = _split_record(os.path.abspath(path))
        if record is None:
            continue
        trained = {str(case_id(i)) for i in record["training"] if isinstance(i, Mapping)}
        seen = [case for case in cases if case in trained]
        if seen:
            listed = ", ".join(seen[:5]) + (" ..." if len(seen) > 5 else "")
            raise ValueError(
                f"{len(seen)} case(s) to evaluate were used to train ensemble member '{path}' ({listed}; split record "
                f"'{record_path}'): their scores would overstate the ensemble. The folds of a cross-validation have "
                "no held-out case in common: evaluate the ensemble on a separate test set with "
                "--data_list_file_path (and --data_list_key)."
            )


def pack(ensemble: Any, output: str) -> dict:
    """Write the members of ``ensemble`` as one weights file, ``output``, with its recipe beside it; the recipe.

    The state dict holds member ``i``'s tensors under ``members.<i>.`` (the state dict of an :class:`EnsembleNetwork`
    of them); the recipe holds the members' agreed settings (:data:`AGREED_SETTINGS`, checked as for ``--ensemble``),
    the first member's widths, skip mode and slice axis, and ``ensemble``: each member's ``features``, ``skip`` and
    ``slice_axis``. ``scripts/package_bundle.py --ensemble`` ships it as the bundle's ``models/model.pt`` with a
    ``network_def`` that builds the ensemble (:func:`packed_network_def`), which is how MONAI Label, which builds
    ``network_def`` and loads ``models/model.pt`` into it, serves an ensemble.
    """
    from .checkpoints import _load_state, write_recipe
    from .files import atomic_path

    paths = member_paths(ensemble)
    recipes = check_members(paths)
    if any("ensemble" in recipe for recipe in recipes):
        raise ValueError("an ensemble member is itself a packed ensemble: pack the original members instead.")
    state = {f"members.{i}.{key}": value for i, path in enumerate(paths) for key, value in _load_state(path).items()}
    first = recipes[0]
    recipe = {name: first[name] for name in AGREED_SETTINGS if name in first}
    recipe.update(features=first["features"], skip=first.get("skip", "cat"), slice_axis=first.get("slice_axis", 2))
    recipe["ensemble"] = [
        {"features": r["features"], "skip": r.get("skip", "cat"), "slice_axis": int(r.get("slice_axis", 2))}
        for r in recipes
    ]
    with atomic_path(output) as tmp:
        torch.save(state, tmp)
    write_recipe(output, recipe)
    logger.info(f"packed {len(paths)} models into {output}")
    return recipe


def packed_network_def(network_def: Mapping[str, Any], recipe: Mapping[str, Any]) -> dict:
    """The ``network_def`` config item of the ensemble a packed recipe describes: an :class:`EnsembleNetwork` whose
    members are ``network_def`` (the single segmentor's item) with each member's widths and skip mode."""
    members = [
        {**copy.deepcopy(dict(network_def)), "features": m["features"], "skip": m["skip"]} for m in recipe["ensemble"]
    ]
    return {
        "_target_": "bundle.ensemble.EnsembleNetwork",
        "members": members,
        "multiclass": "@is_multiclass",
        "slice_axes": [m["slice_axis"] for m in recipe["ensemble"]],
    }
