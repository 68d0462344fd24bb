"""benchmarks/bench_step.py's rounds: every step kept, a round's time its fastest step, counts checked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_step  # noqa: E402  (benchmarks/ is not a package)


def test_a_round_of_two_steps_keeps_both_and_reports_the_faster(tmp_path):
    out = tmp_path / "step.json"
    argv = ["--model", "tiny", "--quick", "--no-peft", "--no-memory", "--methods", "lora", "--device", "cpu"]
    bench_step.main(argv + ["--steps", "3", "--steps-per-round", "2", "--seq", "16", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["condition"] for r in rows] == ["limit (frozen base)", "lorakit lora"]
    for row in rows:
        assert len(row["ms_every_step_by_round"]) == 3 and all(len(s) == 2 for s in row["ms_every_step_by_round"])
        assert row["ms_per_step_all"] == [min(s) for s in row["ms_every_step_by_round"]]


@pytest.mark.parametrize("flag", ["--steps-per-round", "--steps"])
def test_counts_below_one_are_refused(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_step.parse_args([flag, "0"])
    assert exit_info.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
