"""k-fold cross-validation: the folds partition the cases per grade, bad settings are refused naming the key, the
training records the fold, and scripts/cross_validate.py scores every case once with the model that did not see it."""

import csv
import json

import pytest
from helpers import ROOT, TINY, load_script

from bundle.datalist import build_datalist, check_folds, fold_cases, load_datalist, split_cases
from bundle.demo import make_demo_dataset


def _cases(hgg: int, lgg: int, ungraded: int = 0) -> list[dict]:
    cases = [{"case": f"H{i:02d}", "image": f"h{i}", "grade": "HGG"} for i in range(hgg)]
    cases += [{"case": f"L{i:02d}", "image": f"l{i}", "grade": "LGG"} for i in range(lgg)]
    return cases + [{"case": f"U{i:02d}", "image": f"u{i}", "grade": None} for i in range(ungraded)]


def _names(items) -> list[str]:
    return [item["case"] for item in items]


@pytest.mark.parametrize("hgg, lgg, ungraded, k", [(11, 4, 0, 3), (7, 3, 2, 2), (10, 5, 0, 5), (6, 0, 0, 6)])
def test_folds_partition_the_cases_per_grade(hgg, lgg, ungraded, k):
    cases = _cases(hgg, lgg, ungraded)
    held_out = []
    for fold in range(k):
        train, val = fold_cases(cases, k, fold)
        assert not set(_names(train)) & set(_names(val))
        assert sorted(_names(train) + _names(val)) == sorted(_names(cases))
        for grade, n in (("H", hgg), ("L", lgg), ("U", ungraded)):
            in_fold = sum(c.startswith(grade) for c in _names(val))
            assert n // k <= in_fold <= -(-n // k), (grade, fold)  # stratified: floor or ceil of n / k per grade
        held_out += _names(val)
    assert sorted(held_out) == sorted(_names(cases))  # every case in exactly one validation fold
    sizes = [len(fold_cases(cases, k, f)[1]) for f in range(k)]
    assert max(sizes) - min(sizes) <= 1


def test_folds_are_deterministic_and_independent_of_input_order():
    cases = _cases(9, 4)
    first = [fold_cases(cases, 3, f) for f in range(3)]
    again = [fold_cases(list(reversed(cases)), 3, f) for f in range(3)]
    assert first == again
    assert [_names(v) for _, v in first] != [sorted(_names(cases))[i::3] for i in range(3)]  # shuffled, not sliced


@pytest.mark.parametrize(
    "num_folds, fold, key, message",
    [
        (3, 3, "fold", "fold must be in 0 .. num_folds - 1"),
        (3, -1, "fold", "fold must be in"),
        (0, 1, "fold", "fold 1 was given but num_folds is 0"),
        (1, 2, "fold", "num_folds is 1"),
        (-2, 0, "num_folds", "num_folds must be 0 or 1"),
        ("five", 0, "num_folds", "num_folds must be a whole number"),
        (3, 1.5, "fold", "fold must be a whole number"),
        (True, 0, "num_folds", "num_folds must be a whole number"),
    ],
)
def test_bad_fold_settings_name_the_key(num_folds, fold, key, message):
    with pytest.raises(ValueError, match=message) as error:
        check_folds(num_folds, fold)
    assert key in str(error.value)
    with pytest.raises(ValueError, match=message):
        fold_cases(_cases(6, 6), num_folds, fold)


def test_more_folds_than_cases_of_a_grade_is_refused():
    with pytest.raises(ValueError, match=r"num_folds 4 is larger than the number of LGG cases \(3\).*at most 3"):
        fold_cases(_cases(10, 3), 4, 0)
    with pytest.raises(ValueError, match=r"num_folds 7 is larger than the number of cases \(6\)"):
        fold_cases(_cases(6, 0), 7, 0)
    with pytest.raises(ValueError, match="case 'H00' is listed twice"):
        fold_cases(_cases(4, 0) + _cases(1, 0), 2, 0)
    assert check_folds("3", 2.0) == (3, 2)


def test_no_folds_is_the_nine_to_one_split(demo_dir):
    assert build_datalist(demo_dir) == build_datalist(demo_dir, num_folds=1) == build_datalist(demo_dir, num_folds=0)
    train, val = split_cases(build_datalist(demo_dir)["training"] + build_datalist(demo_dir)["validation"])
    assert build_datalist(demo_dir) == {"training": train, "validation": val}


@pytest.fixture(scope="module")
def six_cases(tmp_path_factory):
    out = tmp_path_factory.mktemp("cv") / "data"
    make_demo_dataset(str(out), num_cases=6, shape=(40, 40, 24), seed=1)
    return out


def test_datalist_folds_from_a_folder_and_from_a_file(six_cases, tmp_path):
    held_out = []
    for fold in range(3):
        train = load_datalist("", six_cases, "training", 3, fold)
        val = load_datalist("", six_cases, "validation", 3, fold)
        assert len(val) == 2 and len(train) == 4 and not set(_names(train)) & set(_names(val))
        held_out += _names(val)
    assert sorted(held_out) == [f"Demo_{i:03d}" for i in range(6)]

    # a datalist file: its training and validation sections are pooled, other sections kept
    built = build_datalist(six_cases)
    listed = {"training": built["training"][:-1], "validation": built["validation"], "testing": built["training"][-1:]}
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(listed))
    pool = sorted(_names(listed["training"] + listed["validation"]))
    folds = [load_datalist(str(path), six_cases, "validation", 5, f) for f in range(5)]
    assert sorted(c for fold in folds for c in _names(fold)) == pool
    assert _names(load_datalist(str(path), six_cases, "testing", 5, 0)) == _names(listed["testing"])
    with pytest.raises(ValueError, match="num_folds 6 is larger than the number of cases"):
        load_datalist(str(path), six_cases, "training", 6, 0)


def test_training_config_reads_the_fold_and_refuses_bad_keys(six_cases):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update({"bundle_root": str(ROOT), "dataset_dir": str(six_cases), "num_folds": 3, "fold": 2})
    val = parser.get_parsed_content("val_datalist")
    assert _names(val) == _names(load_datalist("", six_cases, "validation", 3, 2))
    for key, value, message in (("fold", 3, "fold must be in"), ("num_folds", 7, "num_folds 7 is larger")):
        parser = ConfigParser()
        parser.read_config(str(ROOT / "configs" / "train.json"))
        parser.update({"bundle_root": str(ROOT), "dataset_dir": str(six_cases), "num_folds": 3, "fold": 0})
        parser[key] = value
        with pytest.raises(Exception) as error:
            parser.get_parsed_content("train_datalist")
        cause = error.value if isinstance(error.value, ValueError) else error.value.__cause__
        assert message in str(cause) and key in str(cause)


def test_cross_validate_refuses_bad_settings(tmp_path):
    cv = load_script("cross_validate")
    with pytest.raises(ValueError, match="num_folds must be at least 2"):
        cv.cross_validate(num_folds=1, work_dir=str(tmp_path))
    with pytest.raises(ValueError, match="fold cannot be overridden"):
        cv.cross_validate(num_folds=2, work_dir=str(tmp_path), fold=1)
    with pytest.raises(ValueError, match="bundle_root cannot be overridden"):
        cv.cross_validate(num_folds=2, work_dir=str(tmp_path), bundle_root=str(tmp_path))


@pytest.mark.slow
def test_two_fold_cross_validation_scores_every_case_out_of_fold(six_cases, tmp_path, capsys):
    cv = load_script("cross_validate")
    args = dict(num_folds=2, out=str(tmp_path / "report"), work_dir=str(tmp_path / "runs"), dataset_dir=str(six_cases))
    cv.cross_validate(**args, **{**TINY, "max_epochs": 1})

    with open(tmp_path / "report" / "oof_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["case"] for r in rows) == [f"Demo_{i:03d}" for i in range(6)]  # every case exactly once
    for fold in (0, 1):
        run = tmp_path / "runs" / f"fold{fold}"
        split = json.loads((run / "models" / "datalist.json").read_text())
        held_out = {item["case"] for item in split["validation"]}
        assert held_out == {r["case"] for r in rows if r["fold"] == str(fold)}  # scored by the model that held it out
        assert not held_out & {item["case"] for item in split["training"]}
    for r in rows:
        assert 0.0 <= float(r["dice_whole_tumor"]) <= 1.0 and r["hd95_enhancing_tumor"] != ""
    with open(tmp_path / "report" / "oof_summary.csv") as f:
        summary = {(r["metric"], r["region"]): r for r in csv.DictReader(f)}
    for region in ("whole_tumor", "tumor_core", "enhancing_tumor"):
        values = [float(r[f"dice_{region}"]) for r in rows]
        assert float(summary[("dice", region)]["mean"]) == pytest.approx(sum(values) / 6, abs=1e-6)
        assert summary[("dice", region)]["cases"] == "6"
    readme = (tmp_path / "report" / "README.md").read_text()
    assert "all 2 folds done; 6 out-of-fold cases" in readme and "| dice |" in readme

    # a second call reuses the finished folds
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("result.json")}
    capsys.readouterr()
    cv.cross_validate(**args, **{**TINY, "max_epochs": 1})
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("result.json")} == stamps
    assert capsys.readouterr().out.count("already done") == 2
