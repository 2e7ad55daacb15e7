"""Each bundled model card states the val top-1 that `edgeq eval` measures on the shipped weights."""
from __future__ import annotations

import re

import pytest

from conftest import CIFAR_VAL
from edgeq.data import data_config, load_image_folder
from edgeq.evaluate import evaluate
from edgeq.models import REFERENCE_MODELS, create_model


@pytest.mark.shared_cache
@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_card_states_measured_top1(name: str) -> None:
    ref = REFERENCE_MODELS[name]
    card = ref.card_path.read_text()
    stated = re.search(r"Validation top-1: (\d+\.\d\d) %\*\* on .*\(5,000 images\)", card)
    assert stated, f"{ref.card_path} does not state a full-val top-1"
    model = create_model(name)
    measured = evaluate(model, load_image_folder(CIFAR_VAL, data_config(model)), batch_size=250)
    assert f"{measured['top1']:.2f}" == stated.group(1)
