"""Compiled integer kernels on this machine, bit for bit against the numpy references.

Every x86 family is compiled for a named CPU that has that family's features (``FAMILY_CPUS``), not for this
machine's CPU: LLVM's instruction choices then do not depend on where the tests run (with a VNNI host CPU,
LLVM fuses the AVX2 kernel's ``vpmaddwd`` + ``vpaddd`` into ``vpdpwssd``). Instruction checks run for every
family on any machine; results are compared bit for bit for each family this machine can execute, and for
``generic`` everywhere.
"""
from __future__ import annotations

import platform
import re
from pathlib import Path

import numpy as np
import pytest
import tvm

from edgeq.lower.kernels import reference as ref
from edgeq.lower.kernels.attention import log2_av_kernel, qk_kernel
from edgeq.lower.kernels.micro import select_microkernel
from edgeq.lower.kernels.qlinear import qlinear_kernel
from edgeq.lower.kernels.requant import requant_params, requantize_kernel
from edgeq.lower.kernels.runner import HostKernel, host_target

TARGET = host_target(num_cores=2)
X86_HOST = platform.machine().lower() in ("x86_64", "amd64")

# family -> (named CPU it is compiled for, /proc/cpuinfo flags a machine needs to run that code)
FAMILY_CPUS = {
    "generic": ("x86-64", ()),
    "x86_avx2": ("haswell", ("avx2", "fma", "bmi2")),
    "x86_avx2_u8s8": ("haswell", ("avx2", "fma", "bmi2")),
    "x86_avx512bw": ("skylake-avx512", ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd")),
    "x86_vnni512": ("cascadelake", ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512_vnni")),
    "x86_vnni256": ("alderlake", ("avx2", "fma", "bmi2", "avx_vnni")),
}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(match.group(1).split()) if match else set()


HOST_FLAGS = _cpu_flags()


def family_target(family: str) -> tvm.target.Target:
    """The target ``family`` is compiled for in these tests (this machine's own for generic off x86)."""
    if not X86_HOST:
        return family_target(family)
    cpu, _ = FAMILY_CPUS[family]
    return tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu, "num-cores": 2})


def runnable(family: str) -> bool:
    if not X86_HOST:
        return family == "generic"
    return set(FAMILY_CPUS[family][1]) <= HOST_FLAGS


RUNNABLE = [f for f in FAMILY_CPUS if runnable(f)]
# p @ v runs with each GEMM family's attention family (its vector width; the VNNI ones use AVX-512BW or AVX2)
FAMILIES = [f for f in ("generic", "x86_avx2", "x86_avx512bw") if f in RUNNABLE]
# q @ k^T runs on every GEMM family but the int4-only one (VNNI: q as uint8, zero points as sum corrections)
QK_FAMILIES = [f for f in RUNNABLE if f != "x86_avx2_u8s8"]
QLINEAR_CASES = [(f, b) for f in RUNNABLE if f != "x86_avx2_u8s8" for b in (8, 4)] + \
    [("x86_avx2_u8s8", 4)] * ("x86_avx2_u8s8" in RUNNABLE)


def rand(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


def check_qlinear(family, m, k, n, x_dtype, w_bits, out_dtype, x_zp, out_zp, seed=0):
    rng = np.random.default_rng(seed)
    kern = qlinear_kernel(m, k, n, family_target(family), x_dtype=x_dtype, w_bits=w_bits, out_dtype=out_dtype,
                          out_zp=out_zp, family=family)
    assert kern.micro.family == family
    x = rand(rng, x_dtype, (m, k))
    w8 = rng.integers(-8, 8, (n, k)).astype(np.int8) if w_bits == 4 else rand(rng, "int8", (n, k))
    w = ref.pack_int4(w8) if w_bits == 4 else w8  # int4 weights arrive packed two per byte
    bias = rng.integers(-5000, 5000, n).astype(np.int32)
    mult, shift = ref.quantize_multipliers(rng.uniform(2e-4, 2e-2, n))
    packed = kern.pack(w, bias, x_zp, mult, shift)
    out = HostKernel(kern.func, kern.name, family_target(family))(x, *[packed[p] for p in kern.param_names[1:-1]],
                                                  out_shape=(m, n), out_dtype=out_dtype)
    if out_dtype == "int32":
        expect = ref.qlinear_acc(x, x_zp, w, bias)
    else:
        expect = ref.qlinear(x, x_zp, w, bias, mult, shift, out_zp, 8, out_dtype)
        assert len(np.unique(expect)) > 20  # not all saturated: the test would prove little
    assert out.dtype == expect.dtype and out.shape == expect.shape
    np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize("family,w_bits", QLINEAR_CASES)
@pytest.mark.parametrize("x_dtype,x_zp", [("int8", 0), ("int8", -9), ("uint8", 128), ("uint8", 37)])
def test_qlinear_deit_shape(family, w_bits, x_dtype, x_zp):
    check_qlinear(family, 197, 192, 768, x_dtype, w_bits, "int8", x_zp, out_zp=3)


@pytest.mark.parametrize("family,w_bits", QLINEAR_CASES)
@pytest.mark.parametrize("m,k,n", [(7, 13, 5), (1, 1, 1), (13, 31, 17), (6, 64, 33)])
@pytest.mark.parametrize("out_dtype", ["int8", "uint8", "int32"])
def test_qlinear_odd_shapes(family, m, k, n, w_bits, out_dtype):
    out_zp = {"int8": -5, "uint8": 120, "int32": 0}[out_dtype]
    rng_zp = (m * 7 + k) % 50
    for x_dtype, x_zp in (("int8", rng_zp - 25), ("uint8", rng_zp + 100)):
        if out_dtype != "int32" and m * n < 64:
            # too few outputs for the "not all saturated" guard: compare the accumulator path instead
            check_qlinear(family, m, k, n, x_dtype, w_bits, "int32", x_zp, 0)
            continue
        check_qlinear(family, m, k, n, x_dtype, w_bits, out_dtype, x_zp, out_zp, seed=m + k + n)


@pytest.mark.parametrize("family", [f for f in RUNNABLE if f != "x86_avx2_u8s8"])
@pytest.mark.parametrize("x_dtype,x_zp", [("uint8", 9), ("int8", -2)])
def test_qlinear_narrow_activations(family, x_dtype, x_zp):
    """4-bit input codes (``a_bits=4``): signed-activation kernels centre uint8 codes by 8 instead of 128, which
    moves the zero point folded into the bias; the result is the same sum."""
    rng = np.random.default_rng(4)
    m, k, n = 13, 70, 40
    kern = qlinear_kernel(m, k, n, family_target(family), x_dtype=x_dtype, w_bits=8, a_bits=4, out_dtype="int32",
                          family=family)
    lo = 0 if x_dtype == "uint8" else -8
    x = rng.integers(lo, lo + 16, (m, k)).astype(x_dtype)
    w8 = rand(rng, "int8", (n, k))
    bias = rng.integers(-5000, 5000, n).astype(np.int32)
    packed = kern.pack(w8, bias, x_zp)
    out = HostKernel(kern.func, kern.name, family_target(family))(x, *[packed[p] for p in kern.param_names[1:-1]],
                                                                  out_shape=(m, n), out_dtype="int32")
    np.testing.assert_array_equal(out, ref.qlinear_acc(x, x_zp, w8, bias))
    assert "_w8a4_" in kern.name


def test_qlinear_small_output_requant():
    """Tiny shapes through the requantizing epilogue, with hand-picked scales that do not saturate."""
    rng = np.random.default_rng(5)
    m, k, n = 3, 5, 2
    kern = qlinear_kernel(m, k, n, TARGET, out_zp=1)
    x = rand(rng, "int8", (m, k))
    w = rand(rng, "int8", (n, k))
    mult, shift = ref.quantize_multipliers([1 / 300, 1 / 700])
    packed = kern.pack(w, None, 2, mult, shift)
    out = HostKernel(kern.func, kern.name, TARGET)(x, packed["w"], packed["bias"], packed["requant"],
                                                  out_shape=(m, n), out_dtype="int8")
    np.testing.assert_array_equal(out, ref.qlinear(x, 2, w, None, mult, shift, 1))


@pytest.mark.parametrize("family", QK_FAMILIES)
@pytest.mark.parametrize("shape", [(3, 197, 197, 64), (2, 7, 9, 13), (1, 1, 1, 1)])
def test_qk(family, shape):
    rng = np.random.default_rng(6)
    h, t, s, d = shape
    for q_dtype, k_dtype, q_zp, k_zp in (("int8", "int8", 0, 0), ("uint8", "int8", 131, -4), ("int8", "uint8", 9, 250)):
        kern = qk_kernel(h, t, s, d, family_target(family), q_dtype=q_dtype, k_dtype=k_dtype, q_zp=q_zp, k_zp=k_zp, family=family)
        q = rand(rng, q_dtype, (h, t, d))
        k = rand(rng, k_dtype, (h, s, d))
        out = HostKernel(kern.func, kern.name, family_target(family))(q, k, out_shape=(h, t, s), out_dtype="int32")
        np.testing.assert_array_equal(out, ref.qmatmul_qk(q, k, q_zp, k_zp))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(3, 197, 197, 64), (2, 7, 9, 13), (1, 1, 1, 1)])
def test_log2_av(family, shape):
    rng = np.random.default_rng(7)
    h, t, s, d = shape
    for v_dtype, v_zp, base_shift, zero_code, top in (("int8", 0, 15, 255, 40), ("uint8", 128, 12, 15, 16),
                                                      ("int8", -3, 0, 7, 9)):
        kern = log2_av_kernel(h, t, s, d, family_target(family), v_dtype=v_dtype, v_zp=v_zp, base_shift=base_shift,
                              zero_code=zero_code, family=family)
        p = rng.integers(0, top, (h, t, s)).astype(np.uint8)
        v = rand(rng, v_dtype, (h, s, d))
        out = HostKernel(kern.func, kern.name, family_target(family))(p, v, out_shape=(h, t, d), out_dtype="int32")
        np.testing.assert_array_equal(out, ref.log2_av(p, v, v_zp, base_shift, zero_code))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(3, 197, 197, 64), (2, 7, 9, 13)])
def test_log2_av_sqrt2_codes(family, shape):
    """Log-sqrt(2) codes at the softmax-bounded shift (21) and at the general one: all parities, deep codes."""
    rng = np.random.default_rng(8)
    h, t, s, d = shape
    for v_dtype, v_zp, base_shift, zero_code in (("uint8", 131, 21, 255), ("int8", -128, 14, 255),
                                                 ("uint8", 0, 7, 15)):
        kern = log2_av_kernel(h, t, s, d, family_target(family), v_dtype=v_dtype, v_zp=v_zp, base_shift=base_shift,
                              zero_code=zero_code, odd_multiplier=53, frac_bits=7, family=family)
        p = np.minimum(rng.geometric(0.05, (h, t, s)) - 1, 255).astype(np.uint8)
        v = rand(rng, v_dtype, (h, s, d))
        out = HostKernel(kern.func, kern.name, family_target(family))(p, v, out_shape=(h, t, d), out_dtype="int32")
        np.testing.assert_array_equal(out, ref.log2_av(p, v, v_zp, base_shift, zero_code, 53, 7))



@pytest.mark.parametrize("family", FAMILIES)
def test_log2_av_chunk_tails_and_extremes(family):
    """Shapes whose S, T, D leave tails of every tile (S chunks, row tasks, D vector chunks), at the largest
    shifts, with no zero codes and with every code zero, for log2 and log-sqrt(2) codes."""
    rng = np.random.default_rng(9)
    h, t, s, d = 2, 21, 75, 70
    cases = [(dict(zero_code=256, base_shift=ref.MAX_BASE_SHIFT), rng.integers(0, 40, (h, t, s))),
             (dict(zero_code=0, base_shift=3), rng.integers(0, 256, (h, t, s))),
             (dict(zero_code=200, base_shift=21, odd_multiplier=53, frac_bits=7),
              np.minimum(rng.geometric(0.03, (h, t, s)) - 1, 255)),
             (dict(zero_code=256, base_shift=16, odd_multiplier=1, frac_bits=16), rng.integers(0, 256, (h, t, s)))]
    for i, (kw, codes) in enumerate(cases):
        v_dtype, v_zp = ("uint8", 255) if i % 2 else ("int8", -128)  # the widest centered range
        for tiles in ({}, dict(rows=4, s_chunk=16, d_vectors=3)):
            kern = log2_av_kernel(h, t, s, d, family_target(family), v_dtype=v_dtype, v_zp=v_zp, family=family, **kw, **tiles)
            p = codes.astype(np.uint8)
            v = rand(rng, v_dtype, (h, s, d))
            out = HostKernel(kern.func, kern.name, family_target(family))(p, v, out_shape=(h, t, d), out_dtype="int32")
            expect = ref.log2_av(p, v, v_zp, kw["base_shift"], kw["zero_code"], kw.get("odd_multiplier"),
                                 kw.get("frac_bits", 0))
            np.testing.assert_array_equal(out, expect)

@pytest.mark.parametrize("family", [f for f in FAMILIES if f in ("x86_avx2", "x86_avx512bw")])
def test_log2_av_narrow_codes_take_the_multiply_form(family):
    """4-bit codes at the lowering's shifts: every term is an exact product, so p @ v runs as an int16 GEMM
    (``_mul``), bit for bit the shift reference, at the boundary amount == base_shift, for log-sqrt(2) codes,
    and where the result wraps int32 (every code 0 over 301 keys, |v - v_zp| = 255) as the reference does."""
    rng = np.random.default_rng(10)
    cases = [((3, 197, 197, 64), dict(v_dtype="uint8", v_zp=123, base_shift=17), rng.integers(0, 16, (3, 197, 197))),
             ((2, 7, 9, 13), dict(v_dtype="int8", v_zp=-3, base_shift=14), rng.integers(0, 16, (2, 7, 9))),
             ((3, 197, 197, 64), dict(v_dtype="uint8", v_zp=0, base_shift=17, odd_multiplier=53, frac_bits=7),
              rng.integers(0, 16, (3, 197, 197))),
             ((1, 5, 301, 70), dict(v_dtype="uint8", v_zp=255, base_shift=21), np.zeros((1, 5, 301))),
             ((1, 5, 301, 70), dict(v_dtype="int8", v_zp=127, base_shift=21, odd_multiplier=53, frac_bits=7),
              np.full((1, 5, 301), 13))]
    for (h, t, s, d), kw, codes in cases:
        kern = log2_av_kernel(h, t, s, d, family_target(family), zero_code=15, family=family, **kw)
        assert kern.name.endswith("_mul"), kern.name
        p = codes.astype(np.uint8)
        v = rand(rng, kw["v_dtype"], (h, s, d)) if s < 300 else np.full((h, s, d), 0 if kw["v_zp"] > 0 else -128,
                                                                         kw["v_dtype"])
        out = HostKernel(kern.func, kern.name, family_target(family))(p, v, out_shape=(h, t, d), out_dtype="int32")
        expect = ref.log2_av(p, v, kw["v_zp"], kw["base_shift"], 15, kw.get("odd_multiplier"), kw.get("frac_bits", 0))
        np.testing.assert_array_equal(out, expect)


def test_multiply_form_needs_exact_terms_int16_weights_and_an_int32_sum():
    from edgeq.lower.kernels.attention import multiply_form

    assert multiply_form(15, 14, None, 197).shift == 0           # amount 14 == base shift: exact, weight 2**14
    assert multiply_form(15, 13, None, 197) is None              # code 14 would drop a bit
    assert multiply_form(16, 20, None, 197) is None              # code 0's weight 2**15 does not fit int16
    assert multiply_form(255, 21, None, 197) is None             # 8-bit codes: floored terms
    assert multiply_form(15, 17, None, 10**6) is None            # too many keys for an int32 sum
    weights = multiply_form(15, 17, (53, 7), 197)
    assert weights is not None and weights.sqrt2 and weights.shift == 3
    assert multiply_form(15, 9, (53, 7), 197) is None             # odd code 13: amount 7 > 9 - 7
    assert multiply_form(0, 17, None, 197) is None                 # no live code


# family -> (instruction its GEMM inner loop must use, minimum count at 197x192x768, register width)
FAMILY_INSTRUCTIONS = {
    "x86_avx2": ("vpmaddwd", 12, "ymm"),
    "x86_avx512bw": ("vpmaddwd", 16, "zmm"),
    "x86_vnni512": ("vpdpbusd", 24, "zmm"),
    "x86_vnni256": ("vpdpbusd", 12, "ymm"),
}


@pytest.mark.parametrize("family", sorted(FAMILY_INSTRUCTIONS))
def test_x86_family_selection_and_instructions(family):
    """Each x86 family is what its CPU selects, and its int8 and int4 kernels use its instruction.

    Compiled for a named CPU: runs the same on any build machine, whatever its own ISA."""
    if not X86_HOST:
        pytest.skip("x86 code generation is checked on x86 build machines")
    target = family_target(family)
    assert select_microkernel(target).family == family
    instruction, at_least, register = FAMILY_INSTRUCTIONS[family]
    for w_bits in (8, 4):
        kern = qlinear_kernel(197, 192, 768, target, w_bits=w_bits, family=family)
        asm = HostKernel(kern.func, kern.name, target).asm()
        used = re.findall(rf"\b{instruction}\s+%(\w+), %(\w+), %(\w+)", asm)
        assert len(used) >= at_least, (w_bits, len(used))
        assert all(reg.startswith(register) for ops in used for reg in ops)
        # vpmaddubsw saturates int16 pair sums for full-range int8 weights; vpdpbusds saturates the accumulator
        assert "vpmaddubsw" not in asm and "vpdpbusds" not in asm


def test_avx2_int4_weights_use_u8s8():
    """AVX2 without VNNI: int4 weights get the vpmaddubsw kernel (exact for int4), int8 ones never do."""
    target = family_target("x86_avx2")
    kern4 = qlinear_kernel(197, 192, 768, target, w_bits=4)
    assert kern4.micro.family == "x86_avx2_u8s8"
    if X86_HOST:
        assert HostKernel(kern4.func, kern4.name, target).asm().count("vpmaddubsw") >= 16
    with pytest.raises(ValueError):
        qlinear_kernel(8, 8, 8, target, w_bits=8, family="x86_avx2_u8s8")
    with pytest.raises(ValueError):
        qk_kernel(1, 4, 4, 8, target, family="x86_avx2_u8s8")


def test_vnni_targets_run_attention_with_int16_lanes_unless_asked():
    for family, attention in (("x86_vnni512", "x86_avx512bw"), ("x86_vnni256", "x86_avx2"),
                              ("x86_avx512bw", "x86_avx512bw")):
        target = family_target(family)
        assert qk_kernel(1, 4, 4, 8, target).micro.family == attention
        assert log2_av_kernel(1, 4, 4, 8, target).micro.family == attention
        if family != "x86_avx512bw":  # asked for, q @ k^T runs on vpdpbusd with zero-point sum corrections
            kern = qk_kernel(3, 197, 197, 64, target, q_dtype="uint8", q_zp=131, k_zp=-3, family=family)
            assert kern.micro.family == family
            if X86_HOST:
                assert "vpdpbusd" in HostKernel(kern.func, kern.name, target).asm()


def test_pack_rejects_bad_inputs():
    kern = qlinear_kernel(4, 6, 3, TARGET, w_bits=4)
    with pytest.raises(ValueError):
        kern.pack(np.zeros((3, 6), np.int8) + 9, None, 0, [2**30] * 3, [5] * 3)  # int4 out of range
    with pytest.raises(ValueError):
        kern.pack(np.zeros((2, 6), np.int8), None, 0, [2**30] * 2, [5] * 2)  # wrong N
    with pytest.raises(ValueError):
        kern.pack(np.zeros((3, 6), np.int8), None, 0)  # requantizing kernel without multipliers
    with pytest.raises(ValueError):
        qlinear_kernel(4, 6, 3, TARGET, x_dtype="int16")


@pytest.mark.parametrize("shape,per_channel,out_dtype,out_zp", [((3, 197, 64), False, "int8", -3),
                                                               ((197, 768), True, "int8", 4),
                                                               ((7, 5), True, "uint8", 128), ((13,), False, "int8", 0)])
def test_requantize_kernel(shape, per_channel, out_dtype, out_zp):
    rng = np.random.default_rng(8)
    func, name = requantize_kernel(shape, TARGET, per_channel=per_channel, out_zp=out_zp, out_dtype=out_dtype)
    channels = shape[-1] if per_channel else 1
    mult, shift = ref.quantize_multipliers(rng.uniform(1e-5, 1e-2, channels))
    acc = rng.integers(-2**20, 2**20, shape).astype(np.int32)
    rq = requant_params(mult, shift, channels, out_zp, 8, out_dtype)
    rows = int(np.prod(shape[:-1]))
    out = HostKernel(func, name, TARGET)(acc.reshape(rows, shape[-1]), rq, out_shape=(rows, shape[-1]),
                                         out_dtype=out_dtype)
    np.testing.assert_array_equal(out.reshape(shape), ref.requantize(acc, mult, shift, out_zp, 8, out_dtype))


@pytest.mark.parametrize("family", QK_FAMILIES)
@pytest.mark.parametrize("shape", [(2, 7, 37, 13), (1, 5, 21, 8), (1, 3, 17, 2)])
def test_qk_shifted_last_panel(family, shape):
    """S >= nb and not a multiple of it: the last key panel is shifted to end at S (overlapping the one
    before it); odd D keeps the k padding in the same panels."""
    rng = np.random.default_rng(11)
    h, t, s, d = shape
    nb = qk_kernel(1, 1, 1, 1, family_target(family), family=family).micro.nb
    s = nb * (s // 16) + s % 16  # the shapes are written for 16-key panels
    for q_dtype, k_dtype, q_zp, k_zp in (("int8", "int8", 0, 0), ("uint8", "uint8", 131, 120)):
        kern = qk_kernel(h, t, s, d, family_target(family), q_dtype=q_dtype, k_dtype=k_dtype, q_zp=q_zp, k_zp=k_zp, family=family)
        assert s > kern.micro.nb and s % kern.micro.nb
        q = rand(rng, q_dtype, (h, t, d))
        k = rand(rng, k_dtype, (h, s, d))
        out = HostKernel(kern.func, kern.name, family_target(family))(q, k, out_shape=(h, t, s), out_dtype="int32")
        np.testing.assert_array_equal(out, ref.qmatmul_qk(q, k, q_zp, k_zp))
