"""Kernels for the other target families: aarch64 (Cortex-A72 NEON, +dotprod, +i8mm) and CUDA, plus Relax glue.

aarch64 builds are checked by their assembly (the widening multiply-accumulate instructions the schedules
are meant to produce), exported with the cross compiler when ``aarch64-linux-gnu-gcc`` is installed, and
run bit for bit under ``qemu-aarch64`` when that is installed too. CUDA builds are compile-only.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import tvm

from aarch64_qemu import aarch64_available, aarch64_tools, run_aarch64

from edgeq.lower.kernels import reference as ref
from edgeq.lower.kernels.attention import log2_av_kernel, qk_kernel
from edgeq.lower.kernels.micro import (code_bits, int16_accumulation_steps, select_attention_microkernel,
                                      select_microkernel)
from edgeq.lower.kernels.qlinear import _qlinear_func, _schedule_cpu, qlinear_kernel

A72 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4}
A72_DOT = {**A72, "mattr": ["+neon", "+dotprod"]}
A76 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "num-cores": 4}
A720 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a720", "num-cores": 4}  # implies i8mm
CUDA = {"kind": "cuda", "arch": "sm_87"}

needs_qemu = pytest.mark.skipif(not aarch64_available(), reason=f"aarch64 toolchain/qemu missing: {aarch64_tools()}")


def count(asm: str, op: str) -> int:
    return len(re.findall(rf"^\s*{op}\s", asm, flags=re.M))


def test_family_selection():
    assert select_microkernel(A72).family == "arm_neon"
    assert select_microkernel(A72_DOT).family == "arm_dotprod"
    assert select_microkernel(A76).family == "arm_dotprod"  # cortex-a76 implies dotprod
    assert select_microkernel(A720).family == "arm_i8mm"
    assert select_microkernel({**A72, "mattr": ["+neon", "+i8mm"]}).family == "arm_i8mm"
    assert select_attention_microkernel(A720).family == "arm_dotprod"  # q·kᵀ and p·v keep one row per step
    assert select_microkernel(CUDA).family == "cuda"
    assert select_microkernel({"kind": "llvm", "mcpu": "haswell"}).family == "x86_avx2"
    assert select_microkernel({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}).family == "generic"
    with pytest.raises(ValueError):
        select_microkernel(A72, family="avx9000")


def arm_asm(kern, target) -> str:
    lib = tvm.compile(tvm.IRModule({kern.name: kern.func}), target=target)
    return lib.mod.inspect_source("asm")


def test_a72_w8a8_qlinear_uses_smull_sadalp():
    kern = qlinear_kernel(197, 192, 768, A72, w_bits=8)
    assert kern.micro.family == "arm_neon"
    asm = arm_asm(kern, A72)
    assert count(asm, "smull") >= 8 and count(asm, "sadalp") >= 8
    assert count(asm, "sdot") == 0  # the A72 has no dot product


@pytest.mark.parametrize("w_bits,a_bits,steps", [(4, 8, 31), (8, 4, 31), (4, 4, 511)])
def test_a72_narrow_qlinear_accumulates_in_int16_lanes(w_bits, a_bits, steps):
    kern = qlinear_kernel(197, 192, 768, A72, w_bits=w_bits, a_bits=a_bits)
    assert kern.micro.family == "arm_neon_s16" and kern.micro.int16_steps == steps
    asm = arm_asm(kern, A72)
    # the tile's 16 int16 accumulators take one smlal per step; the chunk's widening is a few sadalp
    assert count(asm, "smlal") >= 16 and count(asm, "sdot") == 0
    # the dot-product core keeps sdot at every width
    assert qlinear_kernel(197, 192, 768, A72_DOT, w_bits=w_bits, a_bits=a_bits).micro.family == "arm_dotprod"


@pytest.mark.parametrize("w_bits,a_bits", [(w, a) for w in range(2, 9) for a in range(2, 9)])
def test_int16_accumulation_bound_is_tight(w_bits, a_bits):
    steps = int16_accumulation_steps(w_bits, a_bits)
    largest = 2 ** (w_bits - 1) * 2 ** (a_bits - 1)              # (-2**(w-1)) * (-2**(a-1))
    most_negative = -(2 ** (w_bits - 1)) * (2 ** (a_bits - 1) - 1)  # or (2**(w-1) - 1) * -2**(a-1), no larger
    assert steps * largest <= 2**15 - 1 < (steps + 1) * largest
    assert steps * most_negative >= -(2**15)


def test_int16_family_refuses_full_width_products():
    with pytest.raises(ValueError, match="int16 lane in one step"):
        qlinear_kernel(8, 32, 16, A72, w_bits=8, a_bits=8, family="arm_neon_s16")
    with pytest.raises(ValueError, match="a_bits"):
        qlinear_kernel(8, 32, 16, A72, a_bits=9)


def test_code_bits():
    assert code_bits(0, 15, "uint8") == 4 and code_bits(0, 16, "uint8") == 5 and code_bits(0, 255, "uint8") == 8
    assert code_bits(-8, 7, "int8") == 4 and code_bits(-7, 7, "int8") == 4 and code_bits(-9, 7, "int8") == 5
    assert code_bits(-128, 127, "int8") == 8
    with pytest.raises(ValueError):
        code_bits(-1, 3, "uint8")


def test_dotprod_qlinear_uses_sdot():
    kern = qlinear_kernel(197, 192, 768, A72_DOT)
    asm = arm_asm(kern, A72_DOT)
    assert count(asm, "sdot") >= 8


@pytest.mark.parametrize("w_bits", [8, 4])
def test_i8mm_qlinear_uses_smmla(w_bits):
    kern = qlinear_kernel(197, 192, 768, A720, w_bits=w_bits)
    assert kern.micro.family == "arm_i8mm" and kern.micro.rows == 2
    asm = arm_asm(kern, A720)
    # the register tile: 4 row pairs x 4 channel pairs, one smmla each per 8-deep step
    assert count(asm, "smmla") >= 16 and count(asm, "sdot") == 0 and count(asm, "smull") == 0


@pytest.mark.skipif(aarch64_tools()["gcc"] is None, reason="aarch64-linux-gnu-gcc not installed")
def test_aarch64_export(tmp_path):
    from tvm.support import cc

    kern = qlinear_kernel(197, 192, 768, A72)
    lib = tvm.compile(tvm.IRModule({kern.name: kern.func}), target=A72)
    path = tmp_path / "qlinear_a72.so"
    lib.export_library(str(path), fcompile=cc.cross_compiler("aarch64-linux-gnu-gcc"))
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64


@needs_qemu
@pytest.mark.parametrize("target", [A72, A72_DOT, A720], ids=["a72", "dotprod", "i8mm"])
@pytest.mark.parametrize("m,k,n,x_dtype,w_bits,out_dtype", [
    (197, 192, 768, "int8", 8, "int8"),
    (197, 192, 768, "uint8", 4, "int8"),
    (7, 13, 5, "uint8", 8, "int32"),
    (9, 30, 33, "int8", 4, "uint8"),
])
def test_aarch64_qlinear_bit_exact_under_qemu(target, m, k, n, x_dtype, w_bits, out_dtype):
    rng = np.random.default_rng(m + n)
    out_zp = 100 if out_dtype == "uint8" else 0
    kern = qlinear_kernel(m, k, n, target, x_dtype=x_dtype, w_bits=w_bits, out_dtype=out_dtype, out_zp=out_zp)
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, info.max + 1, (m, k)).astype(x_dtype)
    w8 = rng.integers(-8, 8, (n, k)).astype(np.int8) if w_bits == 4 else rng.integers(-128, 128, (n, k)).astype(np.int8)
    x_zp = 11 if x_dtype == "uint8" else -3
    check_under_qemu(kern, target, x, x_zp, w8, rng, scales=(1e-4, 2e-2))


def check_under_qemu(kern, target, x, x_zp, w8, rng, scales):
    """Pack ``w8`` (int4 values packed when the kernel stores 4 bits), run ``kern`` under qemu, compare bit for bit
    with the numpy reference (random bias and requantization scales drawn from ``scales``)."""
    m, n = kern.m, kern.n
    w = ref.pack_int4(w8) if kern.w_bits == 4 else w8
    bias = rng.integers(-3000, 3000, n).astype(np.int32)
    mult, shift = ref.quantize_multipliers(rng.uniform(*scales, n))
    packed = kern.pack(w, bias, x_zp, mult, shift)
    out = run_aarch64(kern.func, kern.name, target, [x] + [packed[p] for p in kern.param_names[1:-1]], (m, n),
                      kern.out_dtype)
    if kern.out_dtype == "int32":
        expect = ref.qlinear_acc(x, x_zp, w, bias)
    else:
        expect = ref.qlinear(x, x_zp, w, bias, mult, shift, kern.out_zp, 8, kern.out_dtype)
    np.testing.assert_array_equal(out, expect)


@needs_qemu
@pytest.mark.parametrize("m,x_dtype", [(1, "int8"), (6, "uint8")])
def test_i8mm_largest_sums_bit_exact_under_qemu(m, x_dtype):
    """smmla adds into int32 without an int16 stage: every product the largest, 4,104-deep rows, one odd row."""
    k, n = 4104, 10
    x = np.full((m, k), -128 if x_dtype == "int8" else 0, x_dtype)
    x_zp = 0 if x_dtype == "int8" else 127  # uint8 0 enters the kernel as 0 - 128: its products are -128 * -128 too
    kern = qlinear_kernel(m, k, n, A720, x_dtype=x_dtype, out_dtype="int32")
    packed = kern.pack(np.full((n, k), -128, np.int8), None, x_zp)
    out = run_aarch64(kern.func, kern.name, A720, [x, packed["w"], packed["bias"]], (m, n), "int32")
    expect = ref.qlinear_acc(x, x_zp, np.full((n, k), -128, np.int8), None)
    assert expect.min() == expect.max() == (int(x[0, 0]) - x_zp) * -128 * k
    np.testing.assert_array_equal(out, expect)


def _extreme_operands(m, k, n, x_dtype, w_bits, a_bits):
    """Every product at its largest positive value, (-2**(w-1)) * (-2**(a-1)): the int16 lanes' worst case."""
    x_zp = 2 ** (a_bits - 1) - 1 if x_dtype == "uint8" else 0
    x = np.zeros((m, k), x_dtype) if x_dtype == "uint8" else np.full((m, k), -(2 ** (a_bits - 1)), np.int8)
    w8 = np.full((n, k), -(2 ** (w_bits - 1)), np.int8)
    return x, x_zp, w8


@needs_qemu
@pytest.mark.parametrize("m,k,n,x_dtype,w_bits,a_bits,out_dtype,extreme", [
    (197, 192, 768, "uint8", 4, 8, "int8", False),
    (9, 30, 33, "int8", 8, 4, "uint8", False),
    (11, 77, 40, "uint8", 4, 4, "int8", False),
    (5, 2 * 31 * 3 + 6, 9, "int8", 4, 8, "int32", True),   # three full 31-step chunks and a short one
    (5, 2 * 31 * 3 + 6, 9, "uint8", 4, 8, "int32", True),
    (6, 2 * 31 * 2, 17, "int8", 8, 4, "int32", True),
    (6, 2 * 511 + 2, 17, "uint8", 4, 4, "int32", True),     # one 511-step chunk and a one-step tail
])
def test_aarch64_int16_accumulation_bit_exact_under_qemu(m, k, n, x_dtype, w_bits, a_bits, out_dtype, extreme):
    rng = np.random.default_rng(m + k + n)
    out_zp = 100 if out_dtype == "uint8" else 0
    kern = qlinear_kernel(m, k, n, A72, x_dtype=x_dtype, w_bits=w_bits, a_bits=a_bits, out_dtype=out_dtype,
                          out_zp=out_zp)
    assert kern.micro.family == "arm_neon_s16"
    if extreme:
        x, x_zp, w8 = _extreme_operands(m, k, n, x_dtype, w_bits, a_bits)
    else:
        lo = 0 if x_dtype == "uint8" else -(2 ** (a_bits - 1))
        x = rng.integers(lo, lo + 2**a_bits, (m, k)).astype(x_dtype)
        w8 = rng.integers(-(2 ** (w_bits - 1)), 2 ** (w_bits - 1), (n, k)).astype(np.int8)
        x_zp = 3 if x_dtype == "uint8" else -1
    check_under_qemu(kern, A72, x, x_zp, w8, rng, scales=(1e-6, 2e-4))


@needs_qemu
def test_one_step_past_the_int16_bound_overflows_under_qemu():
    """The extreme operands above do reach the bound: a kernel allowed one more step wraps its int16 lanes."""
    m, k, n = 4, 2 * 32, 16
    micro = dataclasses.replace(qlinear_kernel(m, k, n, A72, w_bits=4, out_dtype="int32").micro, int16_steps=32)
    func = _schedule_cpu(_qlinear_func(m, k, n, micro, "int8", 4, "int32", 8, 0), micro, 4, w_bits=4)
    func = func.with_attr("global_symbol", "past_the_bound").with_attr("tirx.is_scheduled", True)
    x, x_zp, w8 = _extreme_operands(m, k, n, "int8", 4, 8)
    kern = qlinear_kernel(m, k, n, A72, w_bits=4, out_dtype="int32")
    packed = kern.pack(ref.pack_int4(w8), None, x_zp)
    out = run_aarch64(func, "past_the_bound", A72, [x, packed["w"], packed["bias"]], (m, n), "int32")
    expect = ref.qlinear_acc(x, x_zp, ref.pack_int4(w8), None)
    assert (expect == 2 * 32 * 1024).all() and not np.array_equal(out, expect)


@needs_qemu
@pytest.mark.parametrize("target", [A72, A72_DOT], ids=["a72", "dotprod"])
def test_aarch64_attention_bit_exact_under_qemu(target):
    rng = np.random.default_rng(11)
    kern = qk_kernel(3, 197, 197, 64, target, q_dtype="uint8", q_zp=120, k_zp=-2)
    q = rng.integers(0, 256, (3, 197, 64)).astype(np.uint8)
    k = rng.integers(-128, 128, (3, 197, 64)).astype(np.int8)
    out = run_aarch64(kern.func, kern.name, target, [q, k], (3, 197, 197), "int32")
    np.testing.assert_array_equal(out, ref.qmatmul_qk(q, k, 120, -2))
    kern = log2_av_kernel(2, 7, 9, 13, target, v_zp=5, zero_code=15)
    p = rng.integers(0, 18, (2, 7, 9)).astype(np.uint8)
    v = rng.integers(-128, 128, (2, 9, 13)).astype(np.int8)
    out = run_aarch64(kern.func, kern.name, target, [p, v], (2, 7, 13), "int32")
    np.testing.assert_array_equal(out, ref.log2_av(p, v, 5, 15, 15))
    # log-sqrt(2) codes at the softmax-bounded shift: the same int32 results as the reference (and so as x86)
    kern = log2_av_kernel(2, 7, 9, 13, target, v_dtype="uint8", v_zp=131, base_shift=21, zero_code=255,
                          odd_multiplier=53, frac_bits=7)
    p = np.minimum(rng.geometric(0.05, (2, 7, 9)) - 1, 255).astype(np.uint8)
    v = rng.integers(0, 256, (2, 9, 13)).astype(np.uint8)
    out = run_aarch64(kern.func, kern.name, target, [p, v], (2, 7, 13), "int32")
    np.testing.assert_array_equal(out, ref.log2_av(p, v, 131, 21, 255, 53, 7))


@needs_qemu
def test_aarch64_log2_av_tails_and_largest_shifts_under_qemu():
    """NEON's sshl path with tails of every tile, the largest shifts and zero codes, bit for bit."""
    rng = np.random.default_rng(12)
    h, t, s, d = 2, 19, 45, 13      # 16-row tasks + 3, one 40-code chunk + 5, 13 of 16 lanes
    log2 = dict(v_dtype="int8", v_zp=-128, base_shift=ref.MAX_BASE_SHIFT, zero_code=30)
    sqrt2 = dict(v_dtype="uint8", v_zp=255, base_shift=21, zero_code=200, odd_multiplier=53, frac_bits=7)
    for kw, codes, op in ((log2, rng.integers(0, 40, (h, t, s)), "sshl"),
                          (sqrt2, np.minimum(rng.geometric(0.03, (h, t, s)) - 1, 255), "sshl")):
        kern = log2_av_kernel(h, t, s, d, A72, **kw)
        lib = tvm.compile(tvm.IRModule({kern.name: kern.func}), target=tvm.target.Target(A72))
        assert count(lib.mod.inspect_source("asm"), op) >= 4
        p = codes.astype(np.uint8)
        info = np.iinfo(kw["v_dtype"])
        v = rng.integers(info.min, info.max + 1, (h, s, d)).astype(kw["v_dtype"])
        out = run_aarch64(kern.func, kern.name, A72, [p, v], (h, t, d), "int32")
        expect = ref.log2_av(p, v, kw["v_zp"], kw["base_shift"], kw["zero_code"], kw.get("odd_multiplier"),
                             kw.get("frac_bits", 0))
        np.testing.assert_array_equal(out, expect)

@pytest.mark.parametrize("make", [
    lambda t: qlinear_kernel(197, 192, 768, t),
    lambda t: qlinear_kernel(7, 13, 5, t, x_dtype="uint8", w_bits=4, out_dtype="int32"),
    lambda t: qk_kernel(3, 197, 197, 64, t, q_zp=1, k_zp=2),
    lambda t: log2_av_kernel(3, 197, 197, 64, t),
], ids=["qlinear", "qlinear_int4", "qk", "log2_av"])
def test_cuda_kernels_compile(make):
    target = tvm.target.Target(CUDA, host=A72)
    kern = make(target)
    lib = tvm.compile(tvm.IRModule({kern.name: kern.func}), target=target)
    source = "\n".join(m.inspect_source() for m in lib.mod.imports)
    assert "__global__" in source
    if kern.micro.family == "cuda" and "log2av" not in kern.name:
        assert "__dp4a" in source


def test_relax_call_tir_demo_runs_on_the_vm():
    from qlinear_module import qlinear_module, vm_matches_reference

    from edgeq.lower.kernels.runner import host_target

    mod, _, _ = qlinear_module(host_target())
    assert "call_tir" in mod.script()
    assert vm_matches_reference(host_target(2))
    assert vm_matches_reference({"kind": "llvm"}, m=20, k=48, n=40)  # generic family, default llvm target


def test_host_mattr_adds_the_cpu_flags_llvm_model_lacks():
    """A hypervisor can report an older CPU model: the family-deciding flags come from /proc/cpuinfo."""
    from edgeq.compile.targets import host_mattr

    cpuinfo = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx_vnni\n"
    assert host_mattr("haswell", cpuinfo) == ["+avx512f", "+avx512bw", "+avxvnni"]
    assert host_mattr("cascadelake", "flags : avx2 fma avx512f avx512bw avx512_vnni\n") == []
    assert host_mattr("haswell", "no flags line\n") == []
    widened = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell", "mattr": host_mattr("haswell", cpuinfo)}
    assert select_microkernel(widened).family == "x86_vnni256"
