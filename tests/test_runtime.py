"""edgeq.runtime: batching, output comparison, the host runner and the artifact's target."""
from __future__ import annotations

import numpy as np
import pytest

from board_fixtures import make_artifact
from edgeq.compile.artifact import load_artifact
from edgeq.runtime import HostModel, artifact_target, batches, max_abs_diff, outputs_agree


def test_batches_are_whole_and_in_order() -> None:
    rows = np.arange(7)
    assert [(start, list(x)) for start, x in batches(rows, 3)] == [(0, [0, 1, 2]), (3, [3, 4, 5])]
    assert [start for start, _ in batches(list(range(4)), 1)] == [0, 1, 2, 3]  # lists of indices too


def test_outputs_agree_exactly_or_within_atol() -> None:
    a = np.array([[1.0, 2.0]], np.float32)
    close = a + np.float32(1e-5)
    assert outputs_agree(a, a.copy(), exact=True, atol=0.0)
    assert not outputs_agree(a, close, exact=True, atol=1.0)
    assert outputs_agree(a, close, exact=False, atol=1e-4) and not outputs_agree(a, close, exact=False, atol=1e-6)
    assert not outputs_agree(a, a[:, :1], exact=False, atol=1.0)  # another shape never agrees
    assert max_abs_diff(a, a[:, :1]) == float("inf") and max_abs_diff(a, a + 2) == 2.0


@pytest.fixture(scope="module")
def rasp4(tmp_path_factory: pytest.TempPathFactory):
    return load_artifact(make_artifact(tmp_path_factory.mktemp("runtime") / "tiny-rasp4", "rasp4", golden=3))


def test_host_model_reproduces_the_golden_batch(rasp4) -> None:
    inputs, outputs = rasp4.golden()
    host = HostModel.of(rasp4)
    assert host.library == rasp4.host_library and host.batch == 1
    np.testing.assert_array_equal(host(inputs), outputs)  # three batches of one, in order
    np.testing.assert_array_equal(host(inputs[1:2]), outputs[1:2])


def test_host_model_refuses_a_ragged_batch(rasp4) -> None:
    host = HostModel(rasp4.host_library, batch=2)
    with pytest.raises(ValueError, match="3 inputs are not whole batches of 2"):
        host(rasp4.golden()[0])


def test_artifact_target_is_the_board_it_was_built_for(rasp4) -> None:
    spec = artifact_target(rasp4)
    assert spec.name == "rasp4" and spec.arch == "aarch64" and spec.rpc_key == rasp4.target.rpc_key
