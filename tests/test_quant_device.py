"""``--device``: where calibration, sensitivity trials and reconstruction run, and its bad input.

This machine has no GPU, so CUDA runs are not exercised here; what is tested is that the device is resolved and
refused clearly, that work on the CPU device is the default's bit for bit, and that the model comes back on the
CPU with everything reconstruction keeps beside its state (the float weights) moved along.
"""
from __future__ import annotations

import pytest
import torch

from cli_runner import run_cli
from edgeq.errors import DeviceUnavailableError
from edgeq.quant import quantize
from edgeq.quant.device import resolve_device
from edgeq.quant.modules import _QuantWeighted
from edgeq.quant.reconstruct import ReconstructionConfig

pytestmark = pytest.mark.usefixtures("single_thread")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


def test_resolve_device_names():
    assert resolve_device(None) == resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected_auto = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected_auto
    for name, message in (("gpu", "not a device"), ("mps", "cpu or cuda devices"), ("cuda:99", "CUDA")):
        with pytest.raises(DeviceUnavailableError, match=message):
            resolve_device(name)


@no_cuda
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(DeviceUnavailableError, match="no CUDA device") as caught:
        resolve_device("cuda")
    assert caught.value.exit_code == 24


def test_cpu_device_is_the_default_bit_for_bit(vit_model):
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    recon = ReconstructionConfig(method="adaround", iters=3, batch_size=8)
    plain = quantize(vit_model, images, "w4a4", reconstruction=recon, cache=False)
    on_cpu = quantize(vit_model, images, "w4a4", reconstruction=recon, cache=False, device="cpu")
    for (name, a), (_, b) in zip(plain.model.state_dict().items(), on_cpu.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(t.device.type == "cpu" for t in on_cpu.model.state_dict().values())


def test_moving_a_quantized_layer_moves_its_float_weight(vit_model, calib_images):
    qmodel = quantize(vit_model, calib_images, "w8a8")
    layer = next(m for m in qmodel.model.modules() if isinstance(m, _QuantWeighted))
    assert layer.float_weight is not None and layer.float_weight.dtype == torch.float32
    layer.to(torch.float64)  # what .to(device) does to the buffers, it does to the float weight
    assert layer.float_weight.dtype == torch.float64 and layer.weight_scale.dtype == torch.float64


@no_cuda
@pytest.mark.parametrize("command", [
    ["quantize", "--model", "edgeq/vit-cifar10", "--bits", "w8a8", "--device", "cuda"],
    ["plan", "--model", "edgeq/vit-cifar10", "--method", "sensitivity", "--budget", "avg-bits=4", "--device", "cuda"],
    ["build", "--target", "host", "--device", "tpu"],
])
def test_cli_device_refused_before_any_work(capsys, tmp_path, command):
    out = tmp_path / "result"
    out.write_text("earlier result")
    if command[0] != "build":
        command = command + ["--out", str(out)]
    code, stdout, stderr = run_cli(capsys, *command)
    assert code == 24
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeq: error: --device") and "Traceback" not in stderr
    assert out.read_text() == "earlier result"
