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


def _training_module():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import train_reference
    finally:
        sys.path.pop(0)
    return train_reference


def test_mixing_keeps_soft_targets_normalised_and_cutmix_weight_is_the_pasted_area() -> None:
    import torch

    train = _training_module()
    images = torch.zeros(4, 3, 32, 32)
    images[1::2] = 1.0  # the batch's reverse pairs 0 with 3 and 1 with 2: each pair differs everywhere
    targets = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 10).float()
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        mixed, soft = train.mix(images, targets, 0.0, 1.0, generator)
        assert torch.allclose(soft.sum(1), torch.ones(4))
        pasted = (mixed[0] != images[0]).float().mean().item()
        assert soft[0, 3].item() == pytest.approx(pasted)
    untouched, same = train.mix(images, targets, 0.0, 0.0, torch.Generator())
    assert untouched is images and same is targets


def test_card_command_leaves_out_file_placement_options() -> None:
    train = _training_module()
    argv = "--model edgeq/vit-cifar10 --epochs 5 --threads 1 --weights-dir /tmp/w --skip-card --save-every=10 --mixup 0.8"
    assert train.result_defining_args(argv.split()) == ["--model", "edgeq/vit-cifar10", "--epochs", "5", "--mixup", "0.8"]
