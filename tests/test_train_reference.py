"""The reference-model training script: trains, writes weights and card, resumes where it stopped."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA
from edgeq.models.weights_io import read_weights_metadata


@pytest.mark.shared_cache
def test_train_two_epochs_in_two_runs(tmp_path: Path) -> None:
    base = [sys.executable, str(REPO / "tools" / "train_reference.py"), "--model", "edgeq/swin-cifar10",
            "--data", str(SHARED_DATA), "--epochs", "2", "--train-limit", "64", "--batch-size", "32",
            "--val-limit", "50", "--threads", "1", "--state-dir", str(tmp_path / "state"),
            "--weights-dir", str(tmp_path / "weights")]
    first = subprocess.run(base + ["--max-epochs-this-run", "1"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert [json.loads(line)["epoch"] for line in first.stdout.splitlines() if line.startswith("{")] == [1]
    weights = tmp_path / "weights" / "swin-cifar10.safetensors"
    assert read_weights_metadata(weights)["epoch"] == 1

    second = subprocess.run(base, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout
    assert [json.loads(line)["epoch"] for line in second.stdout.splitlines() if line.startswith("{")] == [2]
    meta = read_weights_metadata(weights)
    assert meta["epoch"] == 2 and meta["epochs"] == 2 and meta["seed"] == 0
    card = weights.with_suffix(".md").read_text()
    assert re.search(r"Validation top-1: \d+\.\d\d %\*\* on .* \(50 images\)", card)
    assert "finished" in card
