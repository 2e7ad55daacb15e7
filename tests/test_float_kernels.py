"""fp32 GEMM kernels (edgeq.lower.kernels.fgemm) against numpy, on shapes that are not multiples of the tiles.

Host builds run here; the aarch64 (Cortex-A72 NEON) build is checked by its assembly (``fmla`` vectors) and,
when the cross compiler and qemu are installed, run under qemu and compared with the x86 result.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from aarch64_qemu import aarch64_available, aarch64_tools, run_aarch64

from edgeq.lower.kernels.fgemm import float_gemm_kernel, gemm_tiles
from edgeq.lower.kernels.runner import HostKernel, host_target

A72 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4}

needs_qemu = pytest.mark.skipif(not aarch64_available(), reason=f"aarch64 toolchain/qemu missing: {aarch64_tools()}")


def operands(batch, m, k, n, mode, bias, seed=0):
    """Kernel inputs and the numpy float64 reference of ``x @ w (+ bias)``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, m, k)).astype(np.float32)
    w = rng.standard_normal((k, n) if mode == "packed" else (batch, k, n)).astype(np.float32)
    expected = x.astype(np.float64) @ w.astype(np.float64)
    if mode == "nk":
        w = np.ascontiguousarray(np.swapaxes(w, -1, -2))
    inputs = [x, w]
    if bias:
        b = rng.standard_normal(n).astype(np.float32)
        inputs.append(b)
        expected = expected + b
    return inputs, expected


def run_host(kernel, inputs):
    args = list(inputs)
    if kernel.mode == "packed":
        args[1] = kernel.pack(inputs[1])
    return HostKernel(kernel.func, kernel.name, host_target(2))(*args, out_shape=kernel.out_shape, out_dtype="float32")


@pytest.mark.parametrize("batch,m,k,n,mode,bias", [
    (1, 13, 7, 29, "packed", True),     # every dimension off the 6 x 16 tile
    (1, 1, 1, 1, "packed", False),      # degenerate
    (1, 65, 48, 192, "packed", False),  # patch embedding of the CIFAR ViT (M off the tile)
    (3, 11, 9, 17, "kn", True),         # batched p @ v with a runtime right operand
    (3, 7, 5, 33, "nk", False),         # batched q @ k^T reading k untransposed
    (2, 6, 16, 16, "kn", False),        # exact tiles
])
def test_gemm_matches_numpy(batch, m, k, n, mode, bias):
    kernel = float_gemm_kernel(batch, m, k, n, host_target(2), mode=mode, bias=bias)
    inputs, expected = operands(batch, m, k, n, mode, bias)
    got = run_host(kernel, inputs)
    assert got.shape == (batch, m, n)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_kernel_is_marked_scheduled_and_named_by_shape():
    kernel = float_gemm_kernel(1, 10, 12, 20, host_target(2), mode="packed", bias=True)
    assert bool(kernel.func.attrs["tirx.is_scheduled"])
    assert "m10k12n20" in kernel.name and kernel.name.endswith("_bias")
    haswell = float_gemm_kernel(1, 10, 12, 20, {"kind": "llvm", "mcpu": "haswell"}, mode="packed")
    assert haswell.weight_shape == (2, 12, 16)


def test_pack_pads_panels_with_zeros():
    kernel = float_gemm_kernel(1, 4, 3, 5, {"kind": "llvm", "mcpu": "haswell"}, mode="packed")
    w = np.arange(15, dtype=np.float32).reshape(3, 5)
    packed = kernel.pack(w)
    assert packed.shape == (1, 3, 16)
    np.testing.assert_array_equal(packed[0, :, :5], w)
    assert not packed[0, :, 5:].any()
    with pytest.raises(ValueError, match="expects"):
        kernel.pack(w.T)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mode"):
        float_gemm_kernel(1, 2, 2, 2, host_target(), mode="mn")
    with pytest.raises(ValueError, match="positive"):
        float_gemm_kernel(1, 0, 2, 2, host_target())
    runtime = float_gemm_kernel(1, 2, 2, 2, host_target(), mode="kn")
    with pytest.raises(ValueError, match="packed"):
        runtime.pack(np.zeros((2, 2), np.float32))


def test_tiles_follow_the_target():
    assert gemm_tiles({"kind": "llvm", "mcpu": "haswell"}).family == "x86_avx2"
    assert gemm_tiles({"kind": "llvm", "mcpu": "skylake-avx512"}).family == "x86_avx512"
    assert gemm_tiles(A72).family == "arm_neon"


def test_aarch64_build_uses_neon_fma():
    import tvm

    kernel = float_gemm_kernel(1, 13, 7, 29, A72, mode="packed", bias=True)
    asm = tvm.compile(tvm.IRModule({kernel.name: kernel.func}), target=tvm.target.Target(A72)).mod.inspect_source("asm")
    assert re.search(r"^\s*fmla\s+v\d+\.4s", asm, flags=re.M), "no NEON fmla in the A72 build"


@needs_qemu
@pytest.mark.parametrize("mode", ["packed", "nk"])
def test_aarch64_build_matches_x86(mode):
    batch, m, k, n = (1, 13, 7, 29) if mode == "packed" else (2, 7, 5, 19)
    inputs, expected = operands(batch, m, k, n, mode, bias=mode == "packed", seed=3)
    arm = float_gemm_kernel(batch, m, k, n, A72, mode=mode, bias=mode == "packed")
    args = list(inputs)
    if mode == "packed":
        args[1] = arm.pack(inputs[1])
    got = run_aarch64(arm.func, arm.name, A72, args, arm.out_shape, "float32")
    host = run_host(float_gemm_kernel(batch, m, k, n, host_target(2), mode=mode, bias=mode == "packed"), inputs)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, host, rtol=1e-6, atol=1e-6)
