"""The benchmark (scripts/benchmark.py) runs every section end to end and writes what it prints to JSON.

Its figures are measurements for the machine it runs on (docs/performance.md); a shared CI machine gives no
meaningful wall-clock figure, so this checks only that each section runs and reports what it says it does.
"""

import json

import pytest
from helpers import load_script

pytestmark = pytest.mark.slow  # the whole benchmark, end to end


def test_the_benchmark_runs_every_section_on_tiny_settings_and_writes_its_json(tmp_path, capsys):
    output = tmp_path / "benchmark.json"
    results = load_script("benchmark").benchmark(
        output=str(output), work_dir=str(tmp_path / "work"), quick=True, threads=1
    )
    saved = json.loads(output.read_text())
    assert saved.keys() == results.keys()
    training = saved["training"]
    for widths in ("demo", "paper"):
        assert training[widths]["trainer"]["cpu_s"] > 0 and training[widths]["plain"]["cpu_s"] > 0
        assert (
            training[widths]["ratio_cpu"] == training[widths]["trainer"]["cpu_s"] / training[widths]["plain"]["cpu_s"]
        )
    assert saved["data"]["cached"]["slices"] > 0 and saved["data"]["naive"]["slices"] > 0
    for variant in ("bundle", "onnxruntime", "full_frame", "naive"):
        assert saved["inference"][variant]["wall_s"] > 0 and saved["inference"][variant]["peak_rss_mb"] > 0
    # the tiny case's foreground is its demo head, inside the frame
    assert all(
        f < size for f, size in zip(saved["inference"]["case"]["foreground_box"], saved["inference"]["case"]["frame"])
    )
    assert 0 < saved["flops"]["segmentor_forward"] < saved["flops"]["training_iteration"]
    assert saved["peak"]["gflops_per_cpu_s"] > 0
    assert {"default", "channels_last"} <= saved["options"].keys()
    assert {row["axis"] for row in saved["scaling"]["rows"]} == {"batch", "size", "regions"}
    printed = capsys.readouterr().out
    assert "trainer / plain loop" in printed and f"wrote {output}" in printed
