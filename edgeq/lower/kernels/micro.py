"""Target families, their integer micro-kernels, and the weight layouts they read.

All GEMM-like kernels here share one structure (see :mod:`edgeq.lower.kernels.qlinear`):

* activations are turned into signed int8 values (``uint8`` inputs: ``x - 128``, the zero point moves
  by the same 128, which keeps ``x - zp`` unchanged) and packed ``kg`` consecutive ``k`` per *group*
  into one scalar ``A[m, g]`` (``kg`` lanes of ``lane_bits`` bits each);
* weights are laid out in *panels* of ``nb`` output channels: ``P[nb_i, g, n_l * kg + t]`` holds
  ``w[nb_i * nb + n_l, g * kg + t]`` (zero padded in N and K);
* one micro-kernel step adds, for one row ``m``, one group ``g`` and ``vl`` output channels, the
  ``kg``-long dot products into an ``int32 x vl`` accumulator vector:

  ============  ==  ==  =====  ==========================================================================
  family        kg  vl  lane   instruction pattern
  ============  ==  ==  =====  ==========================================================================
  x86_vnni512   4   16  int8   ``vpbroadcastd`` of 4 uint8 activations (x + 128), ``vpdpbusd`` zmm
                                (uint8 x int8 dot of 4 added to int32, no int16 stage, no saturation)
  x86_vnni256   4   8   int8   the same on ymm (AVX-VNNI without AVX-512)
  x86_avx512bw  2   16  int16  as x86_avx2 on zmm (``vpmaddwd`` 512-bit)
  x86_avx2      2   8   int16  ``vpbroadcastd`` of a (x[k], x[k+1]) int16 pair, ``vpmaddwd``, ``vpaddd``
  arm_neon      2   4   int8   ``dup`` of the (x[k], x[k+1]) int8 pair, ``smull`` (8x int16) and
                                ``sadalp`` (pairwise widening accumulate into 4x int32)
  arm_neon_s16  2   4   int8   Cortex-A72 with int4 weights or activations of 4 bits or fewer: ``smlal``
                                (multiply-add into 8x int16) for as many steps as
                                :func:`int16_accumulation_steps` allows, then one ``sadalp`` widens
  arm_dotprod   4   4   int8   ``dup`` of 4 int8, ``sdot``
  arm_i8mm      8   2   int8   two activation rows at once (``rows=2``): their 2x8 int8 block times a 2x8 block
                                of two channels' weights, ``smmla`` (a 2x2 int32 tile, 32 MACs per instruction)
  x86_avx2_u8s8 16  8   int8   int4 weights only: 4x (``vpmaddubsw`` of uint8 activations x int8 weights,
                                ``vpaddw``), one ``vpmaddwd`` by ones: exact as int4 keeps int16 sums < 2**15
  generic       1   8   int8   plain widening multiply-add vectors (LLVM picks the instructions)
  cuda          4   1   int8   ``__dp4a`` per output element
  ============  ==  ==  =====  ==========================================================================

  All of them are exact: no int16 saturation anywhere. AVX2's ``vpmaddubsw`` saturates int16 pair sums for
  full-range int8 weights (255*127*2 > 2**15; onnxruntime's MLAS u8s8 path is inexact there), so int8
  weights are widened to int16 for ``vpmaddwd``; only int4 weights use ``vpmaddubsw``.

The family comes from the TVM target (:func:`select_microkernel`): ``kind`` cuda -> ``cuda``;
an aarch64 ``mtriple`` -> ``arm_i8mm`` when LLVM reports the ``i8mm`` feature for the target's ``mcpu``/``mattr``
(e.g. ``"mcpu": "cortex-a720"``), else ``arm_dotprod`` when it reports ``dotprod`` (e.g.
``"mattr": ["+neon", "+dotprod"]`` or ``"mcpu": "cortex-a76"``), else
``arm_neon`` (Cortex-A72), which :func:`~edgeq.lower.kernels.qlinear.qlinear_kernel` turns into ``arm_neon_s16``
when the weight and activation widths let an int16 lane take two or more products
(:func:`int16_accumulation_steps`); x86 by the LLVM features of the target's ``mcpu``/``mattr``, widest first
(:data:`X86_FAMILY_FEATURES`): AVX-512 VNNI -> ``x86_vnni512``, AVX-VNNI -> ``x86_vnni256``, AVX-512BW ->
``x86_avx512bw``, AVX2 -> ``x86_avx2``; anything else -> ``generic``. q @ k^T and p @ v use a family's
``attention_family`` (:func:`select_attention_microkernel`): their operands both carry zero points, which the
int16-lane kernels fold into the packed values.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx

from edgeq.compile.targets import GENERIC_KERNEL_FAMILY, as_tvm_target as as_target  # as_target: the kernel builders' name

__all__ = ["Microkernel", "MICROKERNELS", "as_target", "select_microkernel", "select_attention_microkernel",
           "kernel_family", "pack_weight_panels", "int16_accumulation_steps", "code_bits"]


@dataclass(frozen=True)
class Microkernel:
    family: str
    kg: int  # consecutive k per packed activation group / per weight lane group
    vl: int  # output channels of one step (its int32 accumulator has vl * rows lanes)
    nb: int  # output channels per weight panel (a multiple of vl)
    mr: int  # activation rows held in registers
    lane_dtype: str  # dtype of one unpacked weight lane in a panel
    lane_bits: int  # bits of one activation element inside a packed group
    a_dtype: str  # dtype of a packed activation (sub)group
    ksub: int = 1  # activation scalars per step (each holds kg // ksub elements)
    act_unsigned: bool = False  # activations enter as uint8 (x + 128 for int8) instead of int8
    attention_family: str | None = None  # the family q @ k^T and p @ v use instead (None: this one)
    int16_steps: int = 0  # steps an int16 accumulator lane takes before it is widened (0: widened every step)
    # activation rows one step multiplies: 2 for smmla, whose accumulator is the row-major 2x2 tile
    # (row 0: channels 0, 1; row 1: channels 0, 1); mr then counts row pairs
    rows: int = 1

    @property
    def sub_kg(self) -> int:
        return self.kg // self.ksub

    def act_offset(self, x_dtype: str, a_bits: int = 8) -> int:
        """What the kernel adds to an ``x_dtype`` activation before multiplying (and to its zero point).

        Signed-activation kernels centre uint8 activations: ``a_bits``-bit values in [0, 2**a_bits) become
        [-2**(a_bits-1), 2**(a_bits-1)), which keeps narrow products narrow (see :func:`int16_accumulation_steps`).
        """
        if self.act_unsigned:
            return 128 if x_dtype == "int8" else 0
        return -(2 ** (a_bits - 1)) if x_dtype == "uint8" else 0

    def lane_nk(self, lane):
        """(channel within the panel, k within the group) held by panel lane ``lane`` (int or TIR expr).

        Plain layout: ``lane = n * kg + k``. With ``ksub > 1`` every (vector j, sub-step i) reads
        ``vl x sub_kg`` contiguous lanes: ``lane = ((j * ksub + i) * vl + n_in_vector) * sub_kg + t``.
        """
        if self.ksub == 1:
            return lane // self.kg, lane % self.kg
        t = lane % self.sub_kg
        n8 = (lane // self.sub_kg) % self.vl
        i = (lane // (self.sub_kg * self.vl)) % self.ksub
        j = lane // (self.sub_kg * self.vl * self.ksub)
        return j * self.vl + n8, i * self.sub_kg + t

    def step(self, acc, a, w):
        """``acc + dot(a, w)`` for one step: acc int32 x (vl*rows), ``a`` the ``ksub`` activation scalars of the
        group (a single scalar when ksub == 1; with rows == 2 the int8 vector of both rows' groups),
        w lane_dtype x (vl*kg)."""
        vl = self.vl
        if self.family == "x86_avx2_u8s8":
            # uint8 x int8 byte pairs -> int16 (vpmaddubsw), ksub of them summed in int16 (vpaddw), then
            # widened and pair-summed into int32 by vpmaddwd with ones. Exact only while every int16 lane
            # stays below 2**15: int4 weights give |pair| <= 255 * 16 and 4 sub-steps <= 16320.
            width = vl * self.sub_kg
            acc16 = None
            for i, ai in enumerate(a):
                av = tirx.reinterpret(f"uint8x{width}", tirx.Broadcast(ai, vl))
                wi = tirx.Shuffle([w], [tirx.const(i * width + e, "int32") for e in range(width)])
                prod = tirx.call_llvm_pure_intrin(f"int16x{width // 2}", "llvm.x86.avx2.pmadd.ub.sw", av, wi)
                acc16 = prod if acc16 is None else acc16 + prod
            ones = tirx.Broadcast(tirx.const(1, "int16"), width // 2)
            return acc + tirx.call_llvm_pure_intrin(f"int32x{vl}", "llvm.x86.avx2.pmadd.wd", acc16, ones)
        if isinstance(a, (list, tuple)):
            (a,) = a
        if self.family in ("x86_avx2", "x86_avx512bw"):
            av = tirx.reinterpret(f"int16x{2 * vl}", tirx.Broadcast(a, vl))
            intrin = "llvm.x86.avx2.pmadd.wd" if vl == 8 else "llvm.x86.avx512.pmaddw.d.512"
            return acc + tirx.call_llvm_pure_intrin(f"int32x{vl}", intrin, av, w)
        if self.family in ("x86_vnni512", "x86_vnni256"):
            # vpdpbusd: per int32 lane, 4 uint8 activations times 4 int8 weights added to the accumulator
            # without saturation (|sum| <= 4 * 255 * 128): exact for every int8/int4 weight
            av = tirx.reinterpret(f"int8x{4 * vl}", tirx.Broadcast(a, vl))
            return tirx.call_llvm_pure_intrin(f"int32x{vl}", f"llvm.x86.avx512.vpdpbusd.{32 * vl}", acc, av, w)
        if self.family == "arm_neon":
            av = tirx.reinterpret("int8x8", tirx.Broadcast(a, 4))
            prod = tirx.call_llvm_pure_intrin("int16x8", "llvm.aarch64.neon.smull.v8i16", av, w)
            return acc + tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.saddlp.v4i32.v8i16", prod)
        if self.family == "arm_neon_s16":  # int16 accumulator: LLVM fuses the add into smlal
            av = tirx.reinterpret("int8x8", tirx.Broadcast(a, 4))
            return acc + tirx.call_llvm_pure_intrin("int16x8", "llvm.aarch64.neon.smull.v8i16", av, w)
        if self.family == "arm_dotprod":
            av = tirx.reinterpret("int8x16", tirx.Broadcast(a, 4))
            return tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc, av, w)
        if self.family == "arm_i8mm":  # a: int8x16, two rows of 8 k; w: two channels of 8 k; no saturation
            return tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.smmla.v4i32.v16i8", acc, a, w)
        if self.family == "generic":
            return acc + tirx.Cast(f"int32x{vl}", w) * tirx.Broadcast(tirx.Cast("int32", a), vl)
        raise ValueError(f"no vector step for family {self.family!r}")

    def widen(self, acc, acc16):
        """``acc`` (int32 x vl) plus the pairwise sums of an int16 accumulator (``sadalp``)."""
        if self.family != "arm_neon_s16":
            raise ValueError(f"family {self.family!r} has no int16 accumulator")
        return acc + tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.saddlp.v4i32.v8i16", acc16)


def code_bits(qmin: int, qmax: int, dtype: str) -> int:
    """The narrowest activation width (2..8) whose range holds the integer codes ``[qmin, qmax]`` stored as
    ``dtype``: ``[0, 2**bits)`` for uint8, ``[-2**(bits-1), 2**(bits-1))`` for int8 (see ``qlinear_kernel``'s
    ``a_bits``)."""
    if dtype not in ("int8", "uint8"):
        raise ValueError(f"activation codes are int8 or uint8, not {dtype!r}")
    for bits in range(2, 9):
        lo, hi = (0, 2**bits - 1) if dtype == "uint8" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        if lo <= qmin <= qmax <= hi:
            return bits
    raise ValueError(f"codes [{qmin}, {qmax}] do not fit {dtype}")


def int16_accumulation_steps(w_bits: int, a_bits: int) -> int:
    """How many products of a signed ``w_bits``-bit weight and a signed ``a_bits``-bit activation one int16 lane
    can add up exactly: the largest ``n`` with ``n * 2**(w_bits-1) * 2**(a_bits-1) <= 2**15 - 1``.

    The largest product is ``(-2**(w_bits-1)) * (-2**(a_bits-1))``; the most negative one,
    ``-2**(w_bits-1) * (2**(a_bits-1) - 1)``, is smaller in magnitude, so ``n`` of them stay above ``-2**15``
    too. w4a8 and w8a4: ``|p| <= 1024``, 31 steps; w4a4: ``|p| <= 64``, 511 steps; w8a8: 1 (no int16 stage).
    """
    for bits in (w_bits, a_bits):
        if not 2 <= bits <= 8:
            raise ValueError(f"widths must be in 2..8 bits, got w{w_bits}a{a_bits}")
    return (2**15 - 1) // (2 ** (w_bits - 1) * 2 ** (a_bits - 1))


MICROKERNELS: dict[str, Microkernel] = {
    "x86_avx2": Microkernel("x86_avx2", kg=2, vl=8, nb=16, mr=6, lane_dtype="int16", lane_bits=16, a_dtype="int32"),
    # int4 weights only (chosen by qlinear_kernel for w_bits=4 on AVX2): see Microkernel.step
    "x86_avx2_u8s8": Microkernel("x86_avx2_u8s8", kg=16, vl=8, nb=16, mr=6, lane_dtype="int8", lane_bits=8,
                                 a_dtype="int32", ksub=4, act_unsigned=True),
    "x86_avx512bw": Microkernel("x86_avx512bw", kg=2, vl=16, nb=32, mr=8, lane_dtype="int16", lane_bits=16,
                                a_dtype="int32"),
    "x86_vnni512": Microkernel("x86_vnni512", kg=4, vl=16, nb=64, mr=6, lane_dtype="int8", lane_bits=8,
                               a_dtype="int32", act_unsigned=True, attention_family="x86_avx512bw"),
    "x86_vnni256": Microkernel("x86_vnni256", kg=4, vl=8, nb=16, mr=6, lane_dtype="int8", lane_bits=8,
                               a_dtype="int32", act_unsigned=True, attention_family="x86_avx2"),
    "arm_neon": Microkernel("arm_neon", kg=2, vl=4, nb=16, mr=4, lane_dtype="int8", lane_bits=8, a_dtype="int16"),
    # int16_steps is set per call from the weight and activation widths (qlinear_kernel)
    "arm_neon_s16": Microkernel("arm_neon_s16", kg=2, vl=4, nb=16, mr=4, lane_dtype="int8", lane_bits=8,
                                a_dtype="int16", int16_steps=1),
    "arm_dotprod": Microkernel("arm_dotprod", kg=4, vl=4, nb=16, mr=4, lane_dtype="int8", lane_bits=8, a_dtype="int32"),
    # mr = 4 row pairs x nb = 8 channels: 16 accumulator registers, 4 activation and 4 weight loads per 16 smmla
    "arm_i8mm": Microkernel("arm_i8mm", kg=8, vl=2, nb=8, mr=4, lane_dtype="int8", lane_bits=8, a_dtype="int8",
                            rows=2, attention_family="arm_dotprod"),
    "generic": Microkernel("generic", kg=1, vl=8, nb=16, mr=4, lane_dtype="int8", lane_bits=8, a_dtype="int8"),
    "cuda": Microkernel("cuda", kg=4, vl=1, nb=16, mr=8, lane_dtype="int8", lane_bits=8, a_dtype="int32"),
}


def _has_feature(target: tvm.target.Target, feature: str) -> bool:
    try:
        return bool(tvm.target.codegen.target_has_features([feature], target))
    except Exception:  # pragma: no cover - LLVM without that target registered
        return False


def select_microkernel(target, family: str | None = None) -> Microkernel:
    """The micro-kernel for ``target`` (a dict, tag or Target); ``family`` overrides the choice."""
    if family is not None:
        if family not in MICROKERNELS:
            raise ValueError(f"unknown kernel family {family!r}; choose from {sorted(MICROKERNELS)}")
        return MICROKERNELS[family]
    tgt = as_target(target)
    kind = tgt.kind.name
    if kind == "cuda":
        return MICROKERNELS["cuda"]
    if kind != "llvm":
        return MICROKERNELS["generic"]
    triple = str(tgt.attrs.get("mtriple", "") or tvm.target.codegen.llvm_get_system_triple())
    if triple.startswith(("aarch64", "arm64")):
        for family, feature in (("arm_i8mm", "i8mm"), ("arm_dotprod", "dotprod")):
            if _has_feature(tgt, feature):
                return MICROKERNELS[family]
        return MICROKERNELS["arm_neon"]
    if triple.startswith(("x86_64", "i686", "i386")):
        for family, features in X86_FAMILY_FEATURES:
            if all(_has_feature(tgt, f) for f in features):
                return MICROKERNELS[family]
    return MICROKERNELS["generic"]


# x86 families from the widest exact integer dot product down; the first whose LLVM features the target has wins
X86_FAMILY_FEATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("x86_vnni512", ("avx512vnni", "avx512bw")),
    ("x86_vnni256", ("avxvnni",)),
    ("x86_avx512bw", ("avx512bw",)),
    ("x86_avx2", ("avx2",)),
)


def kernel_family(spec, tvm_target=None) -> dict:
    """``kernel_family``: the integer kernel family edgeq schedules for the board ``spec``
    (a :class:`edgeq.compile.targets.TargetSpec`, see :func:`select_microkernel`; ``tvm_target``: its Target when the
    caller has it already); ``kernel_family_note``: why, when it is the ``generic`` fallback, else None."""
    target = spec.target
    family = select_microkernel(tvm_target if tvm_target is not None else spec.tvm_target()).family
    note = None
    if family == GENERIC_KERNEL_FAMILY and spec.is_gpu:
        note = (f"edgeq has no integer kernels for {spec.kind} devices: integer plans are refused, "
                "build with --float")
    elif family == GENERIC_KERNEL_FAMILY:
        features = ", ".join(f"{key} {json.dumps(target[key])}" for key in ("kind", "mtriple", "mcpu", "mattr")
                             if key in target)
        note = (f"no kernel family covers this target ({features}): integer kernels fall back to "
                f"{GENERIC_KERNEL_FAMILY!r}, plain widening multiply-adds that LLVM vectorizes as it can "
                "(exact, but slow)")
    return {"kernel_family": family, "kernel_family_note": note}


def select_attention_microkernel(target, family: str | None = None) -> Microkernel:
    """The micro-kernel for q @ k^T and p @ v: the GEMM family's ``attention_family`` unless ``family`` is given.

    Both operands there are activations with zero points: the int16-lane families fold them into the packed
    values, the VNNI (uint8 x int8) ones need row and column sums as corrections, which at attention's short
    reductions (D = 64) cost more than vpdpbusd saves, so those targets run attention with int16 lanes.
    """
    micro = select_microkernel(target, family)
    if family is None and micro.attention_family:
        return MICROKERNELS[micro.attention_family]
    return micro


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pack_weight_panels(w8: np.ndarray, micro: Microkernel, w_bits: int) -> np.ndarray:
    """Build-time weight layout for ``micro`` from int8 weights [N, K] (int4 values in [-8, 7] for w_bits=4).

    int8: ``int8 [ceil(N/nb), ceil(K/kg), nb*kg]``, lane ``l`` of a panel row = ``w[nb_i*nb + n, g*kg + t]``
    with ``(n, t) = micro.lane_nk(l)``.
    int4: the same lanes two per byte, ``uint8 [ceil(N/nb), ceil(K/kg), nb*kg/2]``: byte ``i`` holds lane ``i``
    in its low and lane ``i + nb*kg/2`` in its high nibble (two's complement), so the kernel unpacks a panel
    row with two contiguous vector passes (low nibbles, then high ones) and no gather. Padding is zero.
    """
    w8 = np.asarray(w8, dtype=np.int8)
    if w_bits not in (4, 8):
        raise ValueError(f"w_bits must be 4 or 8, not {w_bits}")
    if w_bits == 4 and w8.size and (w8.min() < -8 or w8.max() > 7):
        raise ValueError("int4 weights must lie in [-8, 7]")
    n, k = w8.shape
    nb, kg = micro.nb, micro.kg
    nblk, kgr = ceil_div(n, nb), ceil_div(k, kg)
    pad = np.zeros((nblk * nb, kgr * kg), dtype=np.int8)
    pad[:n, :k] = w8
    blocks = pad.reshape(nblk, nb, kgr, kg).transpose(0, 2, 1, 3)  # [nblk, kgr, n_local, k_local]
    n_idx, k_idx = micro.lane_nk(np.arange(nb * kg))
    lanes = np.ascontiguousarray(blocks[:, :, n_idx, k_idx])
    if w_bits == 8:
        return lanes
    half = nb * kg // 2
    nibbles = lanes.view(np.uint8) & 0xF
    return np.ascontiguousarray(nibbles[..., :half] | (nibbles[..., half:] << 4))
