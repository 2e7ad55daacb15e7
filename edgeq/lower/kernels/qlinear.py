"""Integer linear layers as scheduled TIR PrimFuncs (``int8 x int8/int4 -> int32 -> int8``).

:func:`qlinear_kernel` returns a :class:`QLinearKernel`: a scheduled ``tvm.tirx.PrimFunc`` plus what
is needed to prepare its constant inputs at build time (:meth:`QLinearKernel.pack`) and to call it
from Relax (``R.call_tir``, see :mod:`edgeq.lower.kernels.relax_glue`). The semantics are those of
:func:`edgeq.lower.kernels.reference.qlinear` / ``qlinear_acc`` bit for bit.

PrimFunc signature (all row-major, shapes fixed at build time)::

    out="int8"/"uint8":  f(x[M,K] int8|uint8, w[...] packed, bias[N] int32, requant[6,N] int32,
                          out[M,N] out_dtype)
    out="int32":         f(x[M,K] int8|uint8, w[...] packed, bias[N] int32, out[M,N] int32)
    float epilogue:      f(x[M,K] int8|uint8, w[...] packed, bias[N] int32, dequant[R,N] float32,
                          [residual[M,N] float32,] out[M,N] int8|uint8|float32)

``w`` is the panel layout of :func:`edgeq.lower.kernels.micro.pack_weight_panels` and ``bias`` is the
*effective* bias ``bias - x_zp' * sum_k w[n, k]`` (``x_zp' = x_zp + micro.act_offset(x_dtype)``): the
activation zero point is folded into it at build time, so the inner loop multiplies raw int8 values;
``requant`` holds the per-channel constants of :func:`edgeq.lower.kernels.requant.requant_params`, derived
from the reference's ``(multiplier, shift)`` by :meth:`QLinearKernel.pack`.

Kernel stages (one PrimFunc):

1. ``A``: pack activations into ``kg``-groups (uint8 -> int8 by ``- 128``, or int8 -> uint8 by ``+ 128`` for the
   u8s8 micro-kernel; zero padding in M and K);
2. ``P`` (only when the stored weights are not already the micro-kernel's lanes, i.e. int4, or int8 on
   x86 where lanes are int16): unpack one ``nb``-channel weight panel (``K x nb``, a few KiB, L1 resident)
   per parallel task, then reuse it for every activation row;
3. ``C``: register-tiled micro-kernel steps (``mr`` rows x ``nb`` channels of int32 accumulators);
4. ``O``: epilogue fused into the tile loop: add the bias, then requantize with 32-bit SIMD arithmetic that
   equals the reference's int64 formula (:mod:`.requant`), or keep int32, or (with ``epilogue``, a
   :class:`~.epilogue.FloatTail`) return to float (``acc * dequant[0] [+ dequant[1]]``: the per-channel scale
   and bias residual) and run the float ops that follow the layer up to the next quantize (fc1's GELU).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T
from tvm.s_tir import Schedule

from . import reference as ref
from .epilogue import FloatTail
from .requant import requant_params, requant_tir
from .micro import (MICROKERNELS, Microkernel, as_target, ceil_div, int16_accumulation_steps, pack_weight_panels,
                    select_microkernel)

__all__ = ["QLinearKernel", "qlinear_kernel"]

_OUT_DTYPES = ("int8", "uint8", "int32")


# --------------------------------------------------------------------------------------------------
# expression helpers shared by the GEMM-like kernels (called while TVMScript is parsed)


def signed_value(x_load, x_dtype: str, offset: int | None = None):
    """An int8/uint8 element as the int32 the kernels multiply: ``x + offset`` (default: uint8 ``x - 128``)."""
    v = tirx.Cast("int32", x_load)
    if offset is None:
        offset = -128 if x_dtype == "uint8" else 0
    return v + offset if offset else v


def pack_group(values, micro: Microkernel):
    """``kg`` signed int32 values -> one packed activation group of ``micro.a_dtype``."""
    if micro.kg == 1:
        return tirx.Cast(micro.a_dtype, values[0])
    mask = (1 << micro.lane_bits) - 1
    word = None
    for t, v in enumerate(values):
        lane = tirx.Cast("uint32", tirx.bitwise_and(v, mask))
        if t:
            lane = tirx.shift_left(lane, tirx.const(t * micro.lane_bits, "uint32"))
        word = lane if word is None else tirx.bitwise_or(word, lane)
    if micro.a_dtype == "int32":
        return tirx.reinterpret("int32", word)
    return tirx.Cast(micro.a_dtype, tirx.reinterpret("int32", word))


def nibble(byte_load, high):
    """Two's-complement nibble of a uint8 byte as int32: ``high`` is 0 (low nibble) or 1 (high nibble)."""
    v = tirx.Cast("int32", byte_load)
    return tirx.shift_right(tirx.shift_left(v, 28 - 4 * high), 28)


def lanes(base, n: int):
    """Index ``base`` (n == 1) or the contiguous vector ``base .. base+n-1``."""
    return base if n == 1 else tirx.Ramp(base, 1, n)


def step_expr(micro: Microkernel, acc, a, w):
    if micro.family == "cuda":
        return acc + tirx.call_pure_extern("int32", "__dp4a", tirx.reinterpret("int8x4", a), w, tirx.const(0, "int32"))
    return micro.step(acc, a, w)


# --------------------------------------------------------------------------------------------------


@dataclass
class QLinearKernel:
    """A scheduled integer linear kernel for fixed shapes and its build-time constant packing."""

    func: tirx.PrimFunc
    name: str
    m: int
    k: int
    n: int
    x_dtype: str
    w_bits: int
    out_dtype: str
    out_bits: int
    out_zp: int
    micro: Microkernel
    param_names: tuple[str, ...] = field(default=())
    a_bits: int = 8
    epilogue: Optional[FloatTail] = None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.func.buffer_map[self.func.params[1]].shape)

    @property
    def weight_dtype(self) -> str:
        return "int8" if self.w_bits == 8 else "uint8"

    @property
    def out_shape(self) -> tuple[int, int]:
        return (self.m, self.n)

    def pack(self, w, bias=None, x_zp: int = 0, multiplier=None, shift=None) -> dict[str, np.ndarray]:
        """Build-time constants for the kernel's inputs after ``x``, keyed by parameter name.

        ``w``: int8 [N, K] (values in [-8, 7] when ``w_bits == 4``) or packed int4 uint8 [N, ceil(K/2)]
        (:func:`reference.pack_int4`); ``bias``: int32 [N] or None; ``x_zp``: the activation zero point;
        ``multiplier``/``shift``: int32 [N] (or scalars) when the output is requantized.
        """
        w8 = ref.weights_as_int8(w, self.k)
        if w8.shape[0] != self.n:
            raise ValueError(f"weights have {w8.shape[0]} output channels, kernel expects {self.n}")
        info = np.iinfo(self.x_dtype)
        if not info.min <= int(x_zp) <= info.max:
            raise ValueError(f"x_zp {x_zp} outside {self.x_dtype}")
        zp_eff = int(x_zp) + self.micro.act_offset(self.x_dtype, self.a_bits)
        b = np.zeros(self.n, np.int64) if bias is None else np.asarray(bias, np.int64).reshape(self.n)
        bias_eff = (b - zp_eff * w8.astype(np.int64).sum(axis=1)).astype(np.int32)  # modulo 2**32
        out = {"w": pack_weight_panels(w8, self.micro, self.w_bits), "bias": bias_eff}
        if self.out_dtype != "int32" and self.epilogue is None:
            if multiplier is None or shift is None:
                raise ValueError("a requantizing kernel needs multiplier and shift")
            out["requant"] = requant_params(multiplier, shift, self.n, self.out_zp, self.out_bits, self.out_dtype)
        return out


def qlinear_kernel(m: int, k: int, n: int, target, *, x_dtype: str = "int8", w_bits: int = 8,
                   out_dtype: str = "int8", out_bits: int = 8, out_zp: int = 0,
                   family: str | None = None, name: str | None = None,
                   num_tasks: int | None = None, mr: int | None = None, nb: int | None = None,
                   k_unroll: int = 1, a_bits: int = 8, epilogue: Optional[FloatTail] = None,
                   dequant_rows: int = 1) -> QLinearKernel:
    """A scheduled qlinear PrimFunc for ``x[m,k] @ w[n,k]^T`` on ``target`` (dict, tag or Target).

    ``out_dtype`` "int32" returns the accumulator plus bias (for float islands); "int8"/"uint8" requantize
    to ``out_bits`` bits around ``out_zp``. ``family`` forces a micro-kernel (see :mod:`.micro`).
    ``a_bits``: the activations' width: ``x`` must hold ``a_bits``-bit values (``[0, 2**a_bits)`` as uint8,
    ``[-2**(a_bits-1), 2**(a_bits-1))`` as int8), which lets narrow kernels (``arm_neon_s16``) accumulate in
    int16 lanes; wider values would break their exactness.
    ``epilogue``: a float tail (then ``out_dtype`` must be "int32", the accumulator it starts from); the kernel
    takes a ``dequant[dequant_rows, N]`` float32 input (scale, and with 2 rows the bias residual) and writes the
    tail's codes. The call's arguments are recorded in the PrimFunc attribute ``edgeq.qlinear`` (JSON), so a
    later pass can rebuild the same kernel with an epilogue (:mod:`edgeq.lower.passes.epilogue`).
    """
    build_args = dict(m=m, k=k, n=n, x_dtype=x_dtype, w_bits=w_bits, out_dtype=out_dtype, out_bits=out_bits,
                      out_zp=out_zp, family=family, num_tasks=num_tasks, mr=mr, nb=nb, k_unroll=k_unroll,
                      a_bits=a_bits)
    if x_dtype not in ("int8", "uint8"):
        raise ValueError(f"x_dtype must be int8 or uint8, not {x_dtype!r}")
    if w_bits not in (4, 8):
        raise ValueError(f"w_bits must be 4 or 8, not {w_bits}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, not {out_dtype!r}")
    if out_dtype != "int32":
        qmin, qmax = ref.activation_range(out_bits, out_dtype)
        if not qmin <= out_zp <= qmax:
            raise ValueError(f"out_zp {out_zp} outside [{qmin}, {qmax}]")
    if min(m, k, n) < 1:
        raise ValueError(f"shapes must be positive, got m={m} k={k} n={n}")
    if not 2 <= a_bits <= 8:
        raise ValueError(f"a_bits must be in 2..8, not {a_bits}")
    if epilogue is not None and out_dtype != "int32":
        raise ValueError("a float epilogue starts from the int32 accumulator: out_dtype must be int32")
    if dequant_rows not in (1, 2):
        raise ValueError(f"dequant_rows must be 1 (scale) or 2 (scale, bias residual), not {dequant_rows}")
    tgt = as_target(target)
    micro = select_microkernel(tgt, family)
    if micro.family == "x86_avx2" and w_bits == 4 and family is None:
        micro = MICROKERNELS["x86_avx2_u8s8"]
    if micro.family == "x86_avx2_u8s8" and w_bits != 4:
        raise ValueError("the x86_avx2_u8s8 micro-kernel is exact for int4 weights only")
    steps16 = int16_accumulation_steps(w_bits, a_bits)
    if micro.family == "arm_neon" and family is None and steps16 > 1:
        micro = MICROKERNELS["arm_neon_s16"]
    if micro.family == "arm_neon_s16":
        if steps16 < 2:
            raise ValueError(f"the arm_neon_s16 micro-kernel needs int4 weights or activations of 4 bits or "
                             f"fewer (w{w_bits}a{a_bits} products fill an int16 lane in one step)")
        micro = dataclasses.replace(micro, int16_steps=steps16)
    panel = nb or _panel_width(n, micro)
    if mr or panel != micro.nb:
        micro = dataclasses.replace(micro, mr=mr or micro.mr, nb=panel)
    if micro.nb % micro.vl:
        raise ValueError(f"nb={micro.nb} must be a multiple of the vector length {micro.vl}")
    func = _qlinear_func(m, k, n, micro, x_dtype, w_bits, out_dtype, out_bits, out_zp, a_bits,
                         epilogue, dequant_rows)
    if micro.family == "cuda":
        func = _schedule_gpu(func, micro)
    else:
        func = _schedule_cpu(func, micro, num_tasks or _default_tasks(tgt), k_unroll, w_bits)
    # every build parameter is in the name: the Relax glue adds one PrimFunc per distinct name
    out_tag = "int32" if out_dtype == "int32" else f"{out_dtype}b{out_bits}z{out_zp}".replace("-", "m")
    if epilogue is not None:
        out_tag = f"{epilogue.out_dtype}_f{dequant_rows}x{epilogue.key}"
        out_dtype = epilogue.out_dtype
    tile = f"_t{micro.mr}x{micro.nb}" if (mr or nb or k_unroll != 1) else ""
    a_tag = "" if a_bits == 8 else f"a{a_bits}"
    name = name or f"edgeq_qlinear_{micro.family}_m{m}k{k}n{n}_w{w_bits}{a_tag}_{x_dtype}_{out_tag}{tile}"
    func = func.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
    func = func.with_attr("edgeq.qlinear", json.dumps(build_args, sort_keys=True))
    if epilogue is not None:
        params = ("x", "w", "bias", "dequant") + (("residual",) if epilogue.inputs else ()) + ("out",)
    else:
        params = ("x", "w", "bias") + (() if out_dtype == "int32" else ("requant",)) + ("out",)
    return QLinearKernel(func, name, m, k, n, x_dtype, w_bits, out_dtype, out_bits, out_zp, micro, params, a_bits,
                         epilogue)


def _panel_width(n: int, micro: Microkernel) -> int:
    """The widest panel (a multiple of the vector length, at most ``micro.nb``) that pads ``n`` channels least.

    Wide panels (64 channels for AVX-512) would store a third of padding for a 48-channel layer; the zero
    channels cost memory and multiply-adds, while one vector less per panel costs little."""
    widths = range(micro.nb, 0, -micro.vl)
    return min(widths, key=lambda nb: (ceil_div(n, nb) * nb - n, -nb))


def _default_tasks(tgt: tvm.target.Target) -> int:
    cores = int(tgt.attrs.get("num-cores", 0) or 0)
    return max(8, 4 * cores)


def _qlinear_func(M, K, N, micro: Microkernel, x_dtype, w_bits, out_dtype, out_bits, out_zp,
                  a_bits: int = 8, tail: Optional[FloatTail] = None, dequant_rows: int = 1) -> tirx.PrimFunc:
    kg, nb, vl, mr = micro.kg, micro.nb, micro.vl, micro.mr
    rows = micro.rows  # with 2 (smmla) the row loops of A and C walk row pairs
    Mp = ceil_div(ceil_div(M, rows), mr) * mr
    KG = ceil_div(K, kg)
    NBLK = ceil_div(N, nb)
    LW = nb * kg  # lanes of one panel row (one k-group, nb channels)
    J = nb // vl
    LV = vl * kg  # weight lanes read by one step
    a_dtype, lane_dtype = micro.a_dtype, micro.lane_dtype
    w_shape = (NBLK, KG, LW) if w_bits == 8 else (NBLK, KG, LW // 2)
    w_dtype = "int8" if w_bits == 8 else "uint8"
    # int16 accumulation: the k-groups are walked in GO chunks of CH steps (CH within the int16 bound, chunks
    # balanced), zero padded to GO * CH groups so no chunk needs a bounds check
    wide16 = micro.int16_steps > 0
    GO = ceil_div(KG, micro.int16_steps) if wide16 else 1
    CH = ceil_div(KG, GO) if wide16 else KG
    KGA = GO * CH if wide16 else KG
    needs_panel = w_bits == 4 or lane_dtype != "int8" or KGA != KG
    requant = out_dtype != "int32"
    p_shape = (NBLK, KGA, LW) if needs_panel else (1, 1, 1)

    ksub, skg = micro.ksub, micro.sub_kg
    offset = micro.act_offset(x_dtype, a_bits)

    def a_value(X, vm, vs):
        vals = []
        for t in range(skg):
            kk = vs * skg + t
            load = X[tirx.min(vm, M - 1), tirx.min(kk, K - 1)]
            vals.append(tirx.if_then_else(tirx.all(vm < M, kk < K), signed_value(load, x_dtype, offset), 0))
        return pack_group(vals, micro)

    def panel_value(Wp, vb, vg, vl_):
        g = tirx.min(vg, KG - 1) if KGA != KG else vg
        if w_bits == 8:
            value = tirx.Cast(lane_dtype, Wp[vb, g, vl_])
        else:
            half = LW // 2  # byte i holds lane i (low nibble) and lane i + half (high nibble)
            value = tirx.Cast(lane_dtype, nibble(Wp[vb, g, tirx.floormod(vl_, half)], tirx.floordiv(vl_, half)))
        return tirx.if_then_else(vg < KG, value, tirx.const(0, lane_dtype)) if KGA != KG else value

    # uint8 activations the micro-kernel takes as they are, whole groups of them: the packed groups are the
    # activation rows themselves read as int32, so there is no packing stage (rows past M repeat the last)
    direct = (micro.act_unsigned and x_dtype == "uint8" and ksub == 1 and micro.lane_bits == 8 and kg == 4
              and K % kg == 0)
    a_shape = (1, 1) if direct else (Mp, KGA * ksub) if rows == 1 else (Mp, KGA, rows * kg)
    a_rows = M if direct else Mp
    CL = vl * rows  # accumulator lanes of one step

    def step(acc, A, vm, vg, w):
        if direct:
            return step_expr(micro, acc, A[tirx.min(vm, M - 1), vg], w)
        if rows > 1:
            return step_expr(micro, acc, A[vm, vg, lanes(0, rows * kg)], w)
        a = [A[vm, vg * ksub + i] for i in range(ksub)] if ksub > 1 else A[vm, vg]
        return step_expr(micro, acc, a, w)

    def epilogue(C, Bias, RQ, vm, vn, R=None):
        acc = C[vm, tirx.floordiv(vn, nb), tirx.floormod(vn, nb)] + Bias[vn]
        if tail is not None:  # RQ is the dequant buffer: as the unfused astype -> multiply [-> add]
            value = tirx.Cast("float32", acc) * RQ[0, vn]
            return tail.expr(value + RQ[1, vn] if dequant_rows == 2 else value, [R[vm, vn]] if R is not None else [])
        if not requant:
            return acc
        return requant_tir(acc, RQ, vn, out_zp, out_bits, out_dtype)

    def pair_value(X, vm, vg, vt):
        """Lane ``vt`` of row pair ``vm``'s group ``vg``: row ``vm * rows + vt // kg``, k ``vg * kg + vt % kg``."""
        row, kk = vm * rows + tirx.floordiv(vt, kg), vg * kg + tirx.floormod(vt, kg)
        load = X[tirx.min(row, M - 1), tirx.min(kk, K - 1)]
        return tirx.Cast("int8", tirx.if_then_else(tirx.all(row < M, kk < K), signed_value(load, x_dtype, offset), 0))

    @T.macro
    def stage_a_pairs(X, A):
        for m, g, t in T.grid(Mp, KGA, rows * kg):
            with T.sblock("A"):
                vm, vg, vt = T.axis.remap("SSS", [m, g, t])
                T.reads(X[0:M, 0:K])
                T.writes(A[vm, vg, vt])
                A[vm, vg, vt] = pair_value(X, vm, vg, vt)

    @T.macro
    def stage_a(X, A):
        for m, g in T.grid(Mp, KGA * ksub):
            with T.sblock("A"):
                vm, vg = T.axis.remap("SS", [m, g])
                T.reads(X[0:M, 0:K])
                T.writes(A[vm, vg])
                A[vm, vg] = a_value(X, vm, vg)

    @T.macro
    def stage_p(Wp, P):
        if needs_panel:
            for b, g, l in T.grid(NBLK, KGA, LW):
                with T.sblock("P"):
                    vb, vg, vl_ = T.axis.remap("SSS", [b, g, l])
                    T.reads(Wp[vb, 0:w_shape[1], 0:w_shape[2]])
                    T.writes(P[vb, vg, vl_])
                    P[vb, vg, vl_] = panel_value(Wp, vb, vg, vl_)

    @T.macro
    def stage_c(A, P, C):
        for m, b, j, g in T.grid(Mp, NBLK, J, KG):
            with T.sblock("C"):
                vm, vb, vj, vg = T.axis.remap("SSSR", [m, b, j, g])
                T.reads(A[0:a_rows, vg * ksub: vg * ksub + ksub], P[vb, vg, vj * LV: vj * LV + LV])
                T.writes(C[vm, vb, vj * vl: vj * vl + vl])
                with T.init():
                    C[vm, vb, lanes(vj * vl, vl)] = T.broadcast(T.int32(0), vl) if vl > 1 else T.int32(0)
                C[vm, vb, lanes(vj * vl, vl)] = step(C[vm, vb, lanes(vj * vl, vl)], A, vm, vg,
                                                     P[vb, vg, lanes(vj * LV, LV)])

    @T.macro
    def stage_c_pairs(A, P, C):
        for m, b, j, g in T.grid(Mp, NBLK, J, KG):
            with T.sblock("C"):
                vm, vb, vj, vg = T.axis.remap("SSSR", [m, b, j, g])
                T.reads(A[vm, vg, 0:rows * kg], P[vb, vg, vj * LV: vj * LV + LV])
                T.writes(C[vm, vb, vj * CL: vj * CL + CL])
                with T.init():
                    C[vm, vb, lanes(vj * CL, CL)] = T.broadcast(T.int32(0), CL)
                C[vm, vb, lanes(vj * CL, CL)] = step(C[vm, vb, lanes(vj * CL, CL)], A, vm, vg,
                                                     P[vb, vg, lanes(vj * LV, LV)])

    @T.macro
    def stage_c16(A, P, C16, C):
        # products added in int16 lanes for CH steps (smlal), each chunk then widened into int32 (sadalp)
        # iteration order (chunk step, row, vector): compute_at recreates the chunk's loops in this order
        for b, go, gi, m, j in T.grid(NBLK, GO, CH, Mp, J):
            with T.sblock("C16"):
                vb, vo, vi, vm, vj = T.axis.remap("SSRSS", [b, go, gi, m, j])
                T.reads(A[vm, vo * CH + vi], P[vb, vo * CH + vi, vj * LV: vj * LV + LV])
                T.writes(C16[vm, vb, vo, vj * LV: vj * LV + LV])
                with T.init():
                    C16[vm, vb, vo, lanes(vj * LV, LV)] = T.broadcast(T.int16(0), LV)
                C16[vm, vb, vo, lanes(vj * LV, LV)] = micro.step(C16[vm, vb, vo, lanes(vj * LV, LV)],
                                                               A[vm, vo * CH + vi],
                                                               P[vb, vo * CH + vi, lanes(vj * LV, LV)])
        for m, b, j, go in T.grid(Mp, NBLK, J, GO):
            with T.sblock("C"):
                vm, vb, vj, vo = T.axis.remap("SSSR", [m, b, j, go])
                T.reads(C16[vm, vb, vo, vj * LV: vj * LV + LV])
                T.writes(C[vm, vb, vj * vl: vj * vl + vl])
                with T.init():
                    C[vm, vb, lanes(vj * vl, vl)] = T.broadcast(T.int32(0), vl)
                C[vm, vb, lanes(vj * vl, vl)] = micro.widen(C[vm, vb, lanes(vj * vl, vl)],
                                                            C16[vm, vb, vo, lanes(vj * LV, LV)])

    c16_shape = (Mp, NBLK, GO, J * LV)

    @T.macro
    def body(X, Wp, Bias, RQ, O, R):
        C = T.sblock_alloc_buffer((Mp, NBLK, nb * rows), "int32")
        P = T.sblock_alloc_buffer(p_shape, lane_dtype)
        if direct:
            A = T.decl_buffer((M, KG), "int32", data=X.data)
        elif rows > 1:
            A = T.sblock_alloc_buffer(a_shape, a_dtype)
            stage_a_pairs(X, A)
        else:
            A = T.sblock_alloc_buffer(a_shape, a_dtype)
            stage_a(X, A)
        if rows > 1:
            if needs_panel:
                stage_p(Wp, P)
                stage_c_pairs(A, P, C)
            else:
                stage_c_pairs(A, Wp, C)
            # the 2x2 tiles back to one row per index, so the epilogue reads C as the one-row kernels do
            D = T.sblock_alloc_buffer((Mp * rows, NBLK, nb), "int32")
            for mm, b, t in T.grid(Mp, NBLK, nb * rows):
                with T.sblock("D"):
                    vp, vb, vt = T.axis.remap("SSS", [mm, b, t])
                    D[vp * rows + tirx.floormod(tirx.floordiv(vt, vl), rows), vb,
                      tirx.floordiv(vt, CL) * vl + tirx.floormod(vt, vl)] = C[vp, vb, vt]
            for mm, nn in T.grid(M, N):
                with T.sblock("O"):
                    vm, vn = T.axis.remap("SS", [mm, nn])
                    O[vm, vn] = epilogue(D, Bias, RQ, vm, vn, R)
        elif wide16:
            C16 = T.sblock_alloc_buffer(c16_shape, "int16")
            if needs_panel:
                stage_p(Wp, P)
                stage_c16(A, P, C16, C)
            else:
                stage_c16(A, Wp, C16, C)
        elif needs_panel:
            stage_p(Wp, P)
            stage_c(A, P, C)
        else:
            stage_c(A, Wp, C)
        if rows == 1:
            for mm, nn in T.grid(M, N):
                with T.sblock("O"):
                    vm, vn = T.axis.remap("SS", [mm, nn])
                    O[vm, vn] = epilogue(C, Bias, RQ, vm, vn, R)

    if tail is not None and tail.inputs:
        @T.prim_func(s_tir=True)
        def func(X: T.Buffer((M, K), x_dtype), Wp: T.Buffer(w_shape, w_dtype), Bias: T.Buffer((N,), "int32"),
                 DQ: T.Buffer((dequant_rows, N), "float32"), R: T.Buffer((M, N), "float32"),
                 O: T.Buffer((M, N), tail.out_dtype)):
            T.func_attr({"tirx.noalias": True})
            body(X, Wp, Bias, DQ, O, R)
    elif tail is not None:
        @T.prim_func(s_tir=True)
        def func(X: T.Buffer((M, K), x_dtype), Wp: T.Buffer(w_shape, w_dtype), Bias: T.Buffer((N,), "int32"),
                 DQ: T.Buffer((dequant_rows, N), "float32"), O: T.Buffer((M, N), tail.out_dtype)):
            T.func_attr({"tirx.noalias": True})
            body(X, Wp, Bias, DQ, O, None)
    elif requant:
        @T.prim_func(s_tir=True)
        def func(X: T.Buffer((M, K), x_dtype), Wp: T.Buffer(w_shape, w_dtype), Bias: T.Buffer((N,), "int32"),
                 RQ: T.Buffer((6, N), "int32"), O: T.Buffer((M, N), out_dtype)):
            T.func_attr({"tirx.noalias": True})
            body(X, Wp, Bias, RQ, O, None)
    else:
        @T.prim_func(s_tir=True)
        def func(X: T.Buffer((M, K), x_dtype), Wp: T.Buffer(w_shape, w_dtype), Bias: T.Buffer((N,), "int32"),
                 O: T.Buffer((M, N), "int32")):
            T.func_attr({"tirx.noalias": True})
            body(X, Wp, Bias, None, O, None)
    return func


# --------------------------------------------------------------------------------------------------
# schedules


def root_blocks(sch: Schedule) -> dict[str, object]:
    """Top-level blocks by their name with any ``_<n>`` suffix the macro expansion added removed."""
    out = {}
    for rv in sch.get_child_blocks(sch.get_sblock("root")):
        name = sch.get(rv).name_hint
        base = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
        out[base] = rv
    return out


def vectorize(sch: Schedule, loop) -> None:
    """``sch.vectorize`` unless the loop has a single iteration (TIR refuses those)."""
    if int(sch.get(loop).extent) > 1:
        sch.vectorize(loop)


def parallel(sch: Schedule, loop) -> None:
    """``sch.parallel`` unless the loop has a single iteration."""
    if int(sch.get(loop).extent) > 1:
        sch.parallel(loop)


def _schedule_cpu(func: tirx.PrimFunc, micro: Microkernel, num_tasks: int, k_unroll: int = 1,
                  w_bits: int = 8) -> tirx.PrimFunc:
    sch = Schedule(func)
    blocks = root_blocks(sch)
    b_a, b_c, b_o, b_p = blocks.get("A"), blocks["C"], blocks["O"], blocks.get("P")
    b_c16 = blocks.get("C16")
    m, nblk, j, g = sch.get_loops(b_c)  # with an int16 stage, g walks the chunks
    n_blocks = int(sch.get(nblk).extent)
    mo, mi = sch.split(m, [None, micro.mr])
    m_tiles = int(sch.get(mo).extent)
    chunks = min(m_tiles, ceil_div(num_tasks, n_blocks))
    if chunks > 1:
        mo_o, mo_i = sch.split(mo, [chunks, None])
        sch.reorder(nblk, mo_o, mo_i, g, mi, j)
        task = sch.fuse(nblk, mo_o)
    else:
        sch.reorder(nblk, mo, g, mi, j)
        task, mo_i = nblk, mo
    parallel(sch, task)
    sch.set_scope(b_c, 0, "local")
    b_d = blocks.get("D")
    if b_d is not None:  # row pairs: the tile's untangling, then its epilogue
        sch.reverse_compute_at(b_d, mo_i)
        sch.set_scope(b_d, 0, "local")
        vectorize(sch, sch.get_loops(b_d)[-1])
    sch.reverse_compute_at(b_o, mo_i)
    if b_c16 is not None:
        # one chunk: CH steps of the (mr rows x nb channels) int16 tile, held in registers, then widened
        sch.compute_at(b_c16, g)
        sch.set_scope(b_c16, 0, "local")
        steps = int(sch.get(b_c16).iter_vars[2].dom.extent)
        inner = _loops_below(sch, b_c16, g)  # (step if steps > 1, then row and vector loops of extent > 1)
        if steps > 1:
            sch.decompose_reduction(b_c16, inner[0])
            for loop in _loops_below(sch, sch.get_sblock("C16_init"), g):
                sch.unroll(loop)
            inner = inner[1:]
        for loop in inner:
            sch.unroll(loop)
    if b_p is not None:
        sch.compute_at(b_p, task)
        lane_loop = sch.get_loops(b_p)[-1]
        if w_bits == 4:  # low nibbles of a panel row, then high ones: two contiguous passes
            _, lane_loop = sch.split(lane_loop, [2, None])
        vectorize(sch, lane_loop)
    sch.decompose_reduction(b_c, g)
    if k_unroll > 1 and b_c16 is None and int(sch.get(g).extent) % k_unroll == 0:
        _, g_in = sch.split(g, [None, k_unroll])
        sch.unroll(g_in)
    sch.unroll(mi)
    sch.unroll(j)
    o_loops = sch.get_loops(b_o)
    vectorize(sch, o_loops[-1])
    if b_a is not None:
        parallel(sch, sch.get_loops(b_a)[0])
    return sch.mod["main"]


def _loops_below(sch: Schedule, block, loop) -> list:
    """The loops around ``block`` nested inside ``loop``."""
    loops = sch.get_loops(block)
    outer = sch.get(loop)
    position = next(i for i, rv in enumerate(loops) if sch.get(rv).same_as(outer))
    return loops[position + 1:]


def _schedule_gpu(func: tirx.PrimFunc, micro: Microkernel) -> tirx.PrimFunc:
    sch = Schedule(func)
    blocks = root_blocks(sch)
    b_a, b_c, b_o, b_p = blocks["A"], blocks["C"], blocks["O"], blocks.get("P")
    for blk in [b for b in (b_a, b_p) if b is not None]:
        fused = sch.fuse(*sch.get_loops(blk))
        bx, tx = sch.split(fused, [None, 128])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    m, nblk, j, g = sch.get_loops(b_c)
    mo, mi = sch.split(m, [None, micro.mr])
    sch.reorder(mo, nblk, mi, j, g)
    sch.bind(mo, "blockIdx.y")
    sch.bind(nblk, "blockIdx.x")
    sch.bind(mi, "threadIdx.y")
    sch.bind(j, "threadIdx.x")
    sch.set_scope(b_c, 0, "local")
    sch.reverse_compute_at(b_o, j)
    sch.decompose_reduction(b_c, g)
    return sch.mod["main"]
