"""The sweep's VLM-merge column (scripts/sweep_architectures.py, vlm_merge_check)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "sweep_architectures.py"


def _sweep():
    spec = importlib.util.spec_from_file_location("sweep_architectures", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vlm_column_merges_a_vlm_with_its_twin_and_skips_text_models(tmp_path):
    sweep = _sweep()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sweep.vlm_merge_check("mistral3", tmp_path / "mistral3") == "ok"
        assert sweep.vlm_merge_check("llama", tmp_path / "llama") == "n/a"
    assert (tmp_path / "mistral3" / "vlm_merge" / "config.json").exists()
