"""One bootstrap: every stand-alone config finds the bundle's folder and code with the same two items, and the
package refuses to be silently replaced by another copy already imported in the process."""

import json
import shutil
import warnings

import pytest
from helpers import ROOT
from monai.bundle import ConfigParser

import bundle
from bundle import bootstrap

#: Configs run on their own (the rest are overlays composed on these).
STAND_ALONE = ("train.json", "inference.json")


@pytest.mark.parametrize("name", STAND_ALONE)
def test_every_stand_alone_config_spells_the_bootstrap_items_as_bootstrap_does(name):
    config = json.loads((ROOT / "configs" / name).read_text())
    assert config["bundle_root"] == bootstrap.BUNDLE_ROOT
    assert config["segan"] == bootstrap.SEGAN


def test_no_overlay_re_spells_the_bootstrap_items():
    overlays = [p for p in (ROOT / "configs").rglob("*.json") if p.name not in STAND_ALONE + ("metadata.json",)]
    assert overlays
    for path in overlays:
        config = json.loads(path.read_text())
        assert not {"bundle_root", "segan"} & set(config), f"{path.name} re-spells the bootstrap"


def test_bundle_root_is_dot_without_a_running_workflow():
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    assert parser.get_parsed_content("bundle_root") == "."  # no ConfigWorkflow on the stack: the working folder
    assert parser.get_parsed_content("segan") is bundle


def test_package_is_silent_for_an_identical_copy_and_warns_for_different_code(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "bundle", copy / "bundle", ignore=shutil.ignore_patterns("__pycache__"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bootstrap.package(copy) is bundle
        assert bootstrap.package(ROOT) is bundle
    (copy / "bundle" / "networks.py").write_text("# another bundle's networks\n")
    with pytest.warns(RuntimeWarning, match="its own process") as record:
        assert bootstrap.package(copy) is bundle
    assert str((copy / "bundle").resolve()) in str(record[0].message)


def test_running_parser_finds_the_parser_evaluating_an_expression():
    parser = ConfigParser({"imports": ["$import bundle"], "found": "$bundle.bootstrap.running_parser()"})
    assert parser.get_parsed_content("found") is parser
    assert bootstrap.running_parser() is None
