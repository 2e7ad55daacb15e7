"""Integer attention kernels: ``q @ k^T`` (int32 scores) and ``p @ v`` with log2-quantized probabilities.

Semantics: :func:`edgeq.lower.kernels.reference.qmatmul_qk` and :func:`~.reference.log2_av`, bit for bit.

``qk_kernel`` PrimFunc: ``f(q[H,T,D], k[H,S,D], out[H,T,S] int32)``. It reuses the GEMM micro-kernels of
:mod:`.micro`: ``k`` is packed into weight-like panels at run time (one ``nb x D`` panel per task; with
``S >= nb`` the last panel is shifted to end at ``S`` so every panel is full). With int16 lanes (x86_avx2)
the packed values are ``q - q_zp`` and ``k - k_zp`` themselves (|v| <= 255, exact in vpmaddwd); with int8
lanes (NEON, CUDA) zero points enter as row/column-sum corrections, so the inner loop multiplies raw int8
values::

    sum_d (q - qz)(k - kz) = sum_d q'k' - kz' * sum_d q' - qz' * sum_d k' + D qz' kz'

(``q' = q - 128`` and ``qz' = qz - 128`` for uint8 inputs, else unchanged; all modulo 2**32). The uint8 x int8
VNNI families read ``q' + 128`` (and use ``qz' + 128``), the same sum; they are not chosen by default (at
deit_tiny's D = 64 the row/column sums cost more than vpdpbusd saves: 0.095 against 0.084 ms for AVX-512BW).

``log2_av_kernel`` PrimFunc: ``f(p_code[H,T,S] uint8, v[H,S,D], out[H,T,D] int32)``: ``v`` is turned into
``(v - v_zp) << base_shift`` once (for log-sqrt(2) codes also ``(v - v_zp) * (2**F + M) << (base_shift - F)``,
picked by the code's parity), then every probability is an arithmetic right shift of a whole ``D``-vector
(``vpsravd``/``sshl`` with one shift amount per (t, s), floored) read from
per-code tables. Zero codes read a row of zeros: no mask, no multiply and no branch
in the loop over ``S``, which walks ``S`` in chunks whose rows of ``v`` stay in L1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script import tirx as T
from tvm.s_tir import Schedule

from . import reference as ref
from .micro import Microkernel, as_target, ceil_div, select_attention_microkernel
from .qlinear import lanes, pack_group, parallel, root_blocks, signed_value, step_expr, vectorize

__all__ = ["AttentionKernel", "qk_kernel", "log2_av_kernel"]


@dataclass
class AttentionKernel:
    func: tirx.PrimFunc
    name: str
    in_shapes: tuple[tuple[int, ...], ...]
    in_dtypes: tuple[str, ...]
    out_shape: tuple[int, ...]
    out_dtype: str
    micro: Microkernel


def _zp_eff(zp: int, dtype: str) -> int:
    return int(zp) - (128 if dtype == "uint8" else 0)


def qk_kernel(h: int, t: int, s: int, d: int, target, *, q_dtype: str = "int8", k_dtype: str = "int8",
              q_zp: int = 0, k_zp: int = 0, family: str | None = None, name: str | None = None,
              num_tasks: int | None = None) -> AttentionKernel:
    """Scheduled PrimFunc for integer scores ``[H,T,D] x [H,S,D] -> int32 [H,T,S]``."""
    for dt, zp, what in ((q_dtype, q_zp, "q"), (k_dtype, k_zp, "k")):
        if dt not in ("int8", "uint8"):
            raise ValueError(f"{what} dtype must be int8 or uint8, not {dt!r}")
        info = np.iinfo(dt)
        if not info.min <= zp <= info.max:
            raise ValueError(f"{what}_zp {zp} outside {dt}")
    tgt = as_target(target)
    micro = select_attention_microkernel(tgt, family)
    if micro.ksub > 1:
        raise ValueError(f"family {micro.family} is for int4 weights; q @ k^T needs int8 x int8 steps")
    func = _qk_func(h, t, s, d, micro, q_dtype, k_dtype, _zp_eff(q_zp, q_dtype), _zp_eff(k_zp, k_dtype))
    if micro.family == "cuda":
        func = _schedule_qk_gpu(func, micro)
    else:
        cores = int(tgt.attrs.get("num-cores", 0) or 0)
        func = _schedule_qk_cpu(func, micro, num_tasks or max(8, 4 * cores))
    name = name or f"edgeq_qk_{micro.family}_h{h}t{t}s{s}d{d}_{q_dtype}z{q_zp}_{k_dtype}z{k_zp}".replace("-", "m")
    func = func.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
    return AttentionKernel(func, name, ((h, t, d), (h, s, d)), (q_dtype, k_dtype), (h, t, s), "int32", micro)


def _qk_func(H, TQ, S, D, micro: Microkernel, q_dtype, k_dtype, qz, kz, *, q_elem=None, k_elem=None,
             k_shape=None, out_shift: int = 0) -> tirx.PrimFunc:
    """``O[h, t, s] = sum_d q'[h, t, d] * k'[h, s, d]`` (``<< out_shift``), ``q' = q - qz``, ``k' = k - kz``.

    ``q_elem(Q, h, t, d)`` / ``k_elem(K, h, s, d)`` replace the zero-point-centred reads (int32 values the
    int16 lanes hold exactly; only with the folded int16-lane families) and ``k_shape`` the ``K`` buffer's
    shape: :func:`log2_av_kernel`'s multiply form reads codes as int16 weights and ``v`` transposed.
    """
    kg, nb, vl, mr = micro.kg, micro.nb, micro.vl, micro.mr
    Tp = ceil_div(TQ, mr) * mr
    KG = ceil_div(D, kg)
    NBLK = ceil_div(S, nb)
    LW = nb * kg
    J = nb // vl
    LV = vl * kg
    a_dtype, lane_dtype = micro.a_dtype, micro.lane_dtype
    # int16 lanes (x86_avx2) hold q - q_zp and k - k_zp exactly (|v| <= 255; vpmaddwd pair sums stay far
    # below 2**31): the zero points go into the packed values, no row/column-sum corrections needed
    fold = lane_dtype == "int16" and micro.lane_bits == 16
    if (q_elem or k_elem) and not fold:
        raise ValueError(f"element readers need a family with int16 lanes, not {micro.family}")
    q_sub, k_sub = (qz, kz) if fold else (0, 0)
    # uint8 x int8 micro-kernels (VNNI) take q as q' + 128: the same sum with qz' + 128 as q's zero point
    q_offset = 128 if micro.act_unsigned else 0
    qz = qz + q_offset
    q_sub -= q_offset
    corrected = (qz != 0 or kz != 0) and not fold
    const_term = D * qz * kz
    # With S >= nb the last panel is shifted left to end at column S (it recomputes a few columns of the
    # panel before it): every panel is full, so the copy-out is unpredicated vector stores. A partial
    # last panel made it element by element (~25% of the kernel's time at deit_tiny's S=197).
    overlap = S % nb != 0 and S >= nb

    def col0(vb):
        """First key column of panel ``vb``."""
        return tirx.min(vb * nb, S - nb) if overlap else vb * nb

    # x86_avx2 packs k like q: one int32 (k[d], k[d+1]) pair per key row ("KP", contiguous, cheap), then
    # builds each panel from whole pairs (16 dword loads per group instead of 32 byte gathers); the
    # micro-kernel reads a panel row of pairs as its int16 lanes
    pairs = fold and kg == 2 and micro.a_dtype == "int32"
    p_shape = (H, NBLK, KG, nb) if pairs else (H, NBLK, KG, LW)
    p_dtype = "int32" if pairs else lane_dtype
    PV = vl if pairs else LV  # panel elements read by one step

    def centred(dtype, sub):
        return lambda X, vh, vr, vk: signed_value(X[vh, vr, vk], dtype) - sub

    q_read = q_elem or centred(q_dtype, q_sub)
    k_read = k_elem or centred(k_dtype, k_sub)

    def group_value(X, rows, read, vh, vm, vg):
        vals = []
        for tt in range(kg):
            kk = vg * kg + tt
            value = read(X, vh, tirx.min(vm, rows - 1), tirx.min(kk, D - 1))
            vals.append(tirx.if_then_else(tirx.all(vm < rows, kk < D), value, 0))
        return pack_group(vals, micro)

    def a_value(Q, vh, vm, vg):
        return group_value(Q, TQ, q_read, vh, vm, vg)

    def pair_panel_value(KP, vh, vb, vg, vn):
        row = col0(vb) + vn
        if overlap:
            return KP[vh, row, vg]
        return tirx.if_then_else(row < S, KP[vh, tirx.min(row, S - 1), vg], 0)

    def panel_value(K, vh, vb, vg, vl_):
        row = col0(vb) + tirx.floordiv(vl_, kg)
        col = vg * kg + tirx.floormod(vl_, kg)
        if overlap and D % kg == 0:  # every lane is inside k: no padding, no clamped indices
            return tirx.Cast(lane_dtype, signed_value(K[vh, row, col], k_dtype) - k_sub)
        load = K[vh, tirx.min(row, S - 1), tirx.min(col, D - 1)]
        return tirx.Cast(lane_dtype, tirx.if_then_else(tirx.all(row < S, col < D),
                                                       signed_value(load, k_dtype) - k_sub, 0))

    def step(acc, a, w):
        if pairs:
            w = tirx.reinterpret(f"{lane_dtype}x{LV}", w)
        return step_expr(micro, acc, a, w)

    def init_value(RQ, RK, vh, vm, vb, vj):
        """Accumulator start: 0, or the zero-point corrections (so the epilogue is a plain copy)."""
        if not corrected:
            return tirx.Broadcast(tirx.const(0, "int32"), vl) if vl > 1 else tirx.const(0, "int32")
        rk = RK[vh, lanes(col0(vb) + vj * vl, vl)]
        rq = tirx.Broadcast(RQ[vh, vm], vl) if vl > 1 else RQ[vh, vm]
        c = tirx.Broadcast(tirx.const(const_term, "int32"), vl) if vl > 1 else tirx.const(const_term, "int32")
        return c - rq * kz - rk * qz

    def row_value(X, dtype, rows, vh, vr, vd, offset=0):
        value = signed_value(X[vh, tirx.min(vr, rows - 1), vd], dtype)
        return tirx.if_then_else(vr < rows, value + offset if offset else value, 0)

    @T.prim_func(s_tir=True)
    def func(Q: T.Buffer((H, TQ, D), q_dtype), K: T.Buffer(k_shape or (H, S, D), k_dtype),
             O: T.Buffer((H, TQ, S), "int32")):
        T.func_attr({"tirx.noalias": True})
        k_rows, k_cols = (k_shape or (H, S, D))[1:]
        A = T.sblock_alloc_buffer((H, Tp, KG), a_dtype)
        P = T.sblock_alloc_buffer(p_shape, p_dtype)
        KP = T.sblock_alloc_buffer((H, S, KG) if pairs else (1, 1, 1), "int32")
        C = T.sblock_alloc_buffer((H, Tp, NBLK, nb), "int32")
        RQ = T.sblock_alloc_buffer((H, Tp), "int32")
        RK = T.sblock_alloc_buffer((H, NBLK * nb), "int32")
        for hh, m, g in T.grid(H, Tp, KG):
            with T.sblock("A"):
                vh, vm, vg = T.axis.remap("SSS", [hh, m, g])
                T.reads(Q[vh, 0:TQ, 0:D])
                T.writes(A[vh, vm, vg])
                A[vh, vm, vg] = a_value(Q, vh, vm, vg)
        if corrected:
            for hh, i, dd in T.grid(H, Tp, D):
                with T.sblock("RQ"):
                    vh, vi, vd = T.axis.remap("SSR", [hh, i, dd])
                    T.reads(Q[vh, 0:TQ, vd])
                    T.writes(RQ[vh, vi])
                    with T.init():
                        RQ[vh, vi] = 0
                    RQ[vh, vi] = RQ[vh, vi] + row_value(Q, q_dtype, TQ, vh, vi, vd, q_offset)
            for hh, j, dd in T.grid(H, NBLK * nb, D):
                with T.sblock("RK"):
                    vh, vj, vd = T.axis.remap("SSR", [hh, j, dd])
                    T.reads(K[vh, 0:S, vd])
                    T.writes(RK[vh, vj])
                    with T.init():
                        RK[vh, vj] = 0
                    RK[vh, vj] = RK[vh, vj] + row_value(K, k_dtype, S, vh, vj, vd)
        if pairs:
            for hh, r, g in T.grid(H, S, KG):
                with T.sblock("KP"):
                    vh, vr, vg = T.axis.remap("SSS", [hh, r, g])
                    T.reads(K[vh, 0:k_rows, 0:k_cols])
                    T.writes(KP[vh, vr, vg])
                    KP[vh, vr, vg] = group_value(K, S, k_read, vh, vr, vg)
            for hh, b, g, n in T.grid(H, NBLK, KG, nb):
                with T.sblock("P"):
                    vh, vb, vg, vn = T.axis.remap("SSSS", [hh, b, g, n])
                    T.reads(KP[vh, 0:S, vg])
                    T.writes(P[vh, vb, vg, vn])
                    P[vh, vb, vg, vn] = pair_panel_value(KP, vh, vb, vg, vn)
        else:
            for hh, b, g, l in T.grid(H, NBLK, KG, LW):
                with T.sblock("P"):
                    vh, vb, vg, vl_ = T.axis.remap("SSSS", [hh, b, g, l])
                    T.reads(K[vh, 0:S, 0:D])
                    T.writes(P[vh, vb, vg, vl_])
                    P[vh, vb, vg, vl_] = panel_value(K, vh, vb, vg, vl_)
        for hh, m, b, j, g in T.grid(H, Tp, NBLK, J, KG):
            with T.sblock("C"):
                vh, vm, vb, vj, vg = T.axis.remap("SSSSR", [hh, m, b, j, g])
                T.reads(A[vh, vm, vg], P[vh, vb, vg, vj * PV: vj * PV + PV], RQ[vh, vm],
                        RK[vh, 0:NBLK * nb])
                T.writes(C[vh, vm, vb, vj * vl: vj * vl + vl])
                with T.init():
                    C[vh, vm, vb, lanes(vj * vl, vl)] = init_value(RQ, RK, vh, vm, vb, vj)
                C[vh, vm, vb, lanes(vj * vl, vl)] = step(C[vh, vm, vb, lanes(vj * vl, vl)], A[vh, vm, vg],
                                                         P[vh, vb, vg, lanes(vj * PV, PV)])
        for hh, i, b, c in T.grid(H, TQ, NBLK, nb):
            with T.sblock("O"):
                vh, vi, vb, vc = T.axis.remap("SSSS", [hh, i, b, c])
                if overlap:
                    O[vh, vi, col0(vb) + vc] = tirx.shift_left(C[vh, vi, vb, vc], out_shift)
                else:
                    if vb * nb + vc < S:
                        O[vh, vi, vb * nb + vc] = tirx.shift_left(C[vh, vi, vb, vc], out_shift)

    return func


def _schedule_qk_cpu(func: tirx.PrimFunc, micro: Microkernel, num_tasks: int) -> tirx.PrimFunc:
    sch = Schedule(func)
    blocks = root_blocks(sch)
    b_p, b_c, b_o = blocks["P"], blocks["C"], blocks["O"]
    hh, m, b, j, g = sch.get_loops(b_c)
    mo, mi = sch.split(m, [None, micro.mr])
    sch.reorder(hh, b, mo, g, mi, j)
    task = sch.fuse(hh, b)
    parallel(sch, task)
    sch.set_scope(b_c, 0, "local")
    sch.compute_at(b_p, task)
    vectorize(sch, sch.get_loops(b_p)[-1])
    sch.reverse_compute_at(b_o, mo)
    sch.decompose_reduction(b_c, g)
    sch.unroll(mi)
    sch.unroll(j)
    o_loops = sch.get_loops(b_o)
    vectorize(sch, o_loops[-1])
    # constant accumulator indices after unrolling: LLVM keeps the tile in registers and stores it straight
    # to the output instead of spilling it to the stack first
    sch.unroll(o_loops[-2])
    for name in ("A", "KP"):
        if name in blocks:
            # heads x rows as the parallel loop: H=3 heads alone split 2:1 over 2 threads
            h_loop, r_loop, _ = sch.get_loops(blocks[name])
            parallel(sch, sch.fuse(h_loop, r_loop))
    for name in ("RQ", "RK"):
        if name in blocks:
            parallel(sch, sch.get_loops(blocks[name])[0])
    return sch.mod["main"]


def _schedule_qk_gpu(func: tirx.PrimFunc, micro: Microkernel) -> tirx.PrimFunc:
    sch = Schedule(func)
    blocks = root_blocks(sch)
    for name in ("A", "P", "RQ", "RK", "KP"):
        if name not in blocks:
            continue
        blk = blocks[name]
        loops = sch.get_loops(blk)
        spatial = loops[:-1] if name in ("RQ", "RK") else loops
        fused = sch.fuse(*spatial)
        bx, tx = sch.split(fused, [None, 128])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    b_c, b_o = blocks["C"], blocks["O"]
    hh, m, b, j, g = sch.get_loops(b_c)
    mo, mi = sch.split(m, [None, micro.mr])
    sch.reorder(hh, mo, b, mi, j, g)
    sch.bind(sch.fuse(hh, mo), "blockIdx.y")
    sch.bind(b, "blockIdx.x")
    sch.bind(mi, "threadIdx.y")
    sch.bind(j, "threadIdx.x")
    sch.set_scope(b_c, 0, "local")
    sch.reverse_compute_at(b_o, j)
    sch.decompose_reduction(b_c, g)
    return sch.mod["main"]


# --------------------------------------------------------------------------------------------------


def log2_av_kernel(h: int, t: int, s: int, d: int, target, *, v_dtype: str = "int8", v_zp: int = 0,
                   base_shift: int = 15, zero_code: int = 255, family: str | None = None,
                   name: str | None = None, rows: int | None = None, d_vectors: int | None = None,
                   odd_multiplier: int | None = None, frac_bits: int = 0,
                   s_chunk: int | None = None, multiply: bool = True) -> AttentionKernel:
    """Scheduled PrimFunc for ``p_code[H,T,S] uint8, v[H,S,D] -> int32 [H,T,D]`` (shifts, no multiplies).

    With ``multiply`` (default), codes whose every term is an exact product (:func:`multiply_form`: 4-bit codes)
    run as an int16 GEMM on the x86 int16-lane families instead (name suffix ``_mul``), the same bits.

    CPU schedule: tasks of ``rows`` output rows (default 16); ``d_vectors`` int32 vectors of accumulators
    (default: all of ``D`` in equal chunks of at most 8 AVX2 / 16 NEON registers) stay in registers while
    the loop over a chunk of ``s_chunk`` codes (default near 32, short tail) adds one shifted row of
    prepared ``v`` per code; that chunk's rows stay in L1 for all the task's rows (see
    :func:`_log2_av_vector_func`).
    ``odd_multiplier``/``frac_bits``: read the codes as log-sqrt(2) codes (``2**-ceil(c/2)``, odd codes times
    ``(2**F + M) / 2**F``, needs ``base_shift >= frac_bits``), as :func:`reference.log2_av` does with them.
    """
    if v_dtype not in ("int8", "uint8"):
        raise ValueError(f"v dtype must be int8 or uint8, not {v_dtype!r}")
    info = np.iinfo(v_dtype)
    if not info.min <= v_zp <= info.max:
        raise ValueError(f"v_zp {v_zp} outside {v_dtype}")
    if not 0 <= base_shift <= ref.MAX_BASE_SHIFT:
        raise ValueError(f"base_shift must be in 0..{ref.MAX_BASE_SHIFT}")
    if not 0 <= zero_code <= 256:
        raise ValueError("zero_code must be in 0..256")
    sqrt2 = None
    if odd_multiplier is not None:
        ref.check_log2_sqrt2(base_shift, odd_multiplier, frac_bits)
        sqrt2 = (int(odd_multiplier), int(frac_bits))
    tgt = as_target(target)
    micro = select_attention_microkernel(tgt, family)
    weights = multiply_form(zero_code, base_shift, sqrt2, s) if multiply and micro.family in _MULTIPLY_FAMILIES \
        else None
    if weights is not None:  # narrow codes: every term is an exact product, p @ v is an int16 GEMM
        func = _log2_av_multiply_func(h, t, s, d, micro, v_dtype, int(v_zp), weights)
        cores = int(tgt.attrs.get("num-cores", 0) or 0)
        func = _schedule_qk_cpu(func, micro, max(8, 4 * cores))
    elif micro.family == "cuda":
        func = _schedule_av_gpu(_log2_av_func(h, t, s, d, v_dtype, int(v_zp), base_shift, zero_code, sqrt2))
    else:
        vl = {"x86_avx512bw": 16, "x86_avx2": 8, "arm_neon": 4, "arm_dotprod": 4}.get(micro.family, 8)
        # accumulator vectors in registers: 8 of AVX2's 16 ymm, 16 of AVX-512's 32 zmm or NEON's 32 q (the
        # rest: temporaries)
        budget = 16 if micro.family in ("arm_neon", "arm_dotprod", "x86_avx512bw") else 8
        dv = ceil_div(d, vl)
        d_vectors = d_vectors or ceil_div(dv, ceil_div(dv, budget))   # equal chunks of D, none over budget
        rows = min(rows or 16, t)
        s_chunk = min(s_chunk or _default_s_chunk(s), s)
        func = _log2_av_vector_func(h, t, s, d, v_dtype, int(v_zp), base_shift, zero_code, vl, sqrt2,
                                    d_vectors, s_chunk, neon=micro.family in ("arm_neon", "arm_dotprod"))
        func = _schedule_av_vector(func, rows, d_vectors, s_chunk)
    mode = ("" if sqrt2 is None else f"_M{sqrt2[0]}F{sqrt2[1]}") + ("_mul" if weights is not None else "")
    name = name or (f"edgeq_log2av_{micro.family}_h{h}t{t}s{s}d{d}_{v_dtype}z{v_zp}_S{base_shift}_zc{zero_code}{mode}"
                    .replace("-", "m"))
    func = func.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
    return AttentionKernel(func, name, ((h, t, s), (h, s, d)), ("uint8", v_dtype), (h, t, d), "int32", micro)


#: attention families whose int16 lanes take the multiply form (vpmaddwd on code weights and v - v_zp)
_MULTIPLY_FAMILIES = ("x86_avx2", "x86_avx512bw")


@dataclass(frozen=True)
class CodeWeights:
    """Every live term of :func:`reference.log2_av` as an exact product: ``(v - v_zp) * weight(c) << shift``.

    ``weight(c)`` is ``2**(top - c)`` for log2 codes; for log-sqrt(2) codes ``2**(top - c/2)`` (even ``c``) or
    ``mantissa * 2**(odd_top - (c+1)/2)`` (odd), all below ``2**15`` (int16 lanes); ``shift`` is what was
    factored out of every weight.
    """

    zero_code: int
    top: int
    shift: int
    mantissa: int = 0
    odd_top: int = 0
    sqrt2: bool = False

    def weight(self, code):
        """The int32 weight of a code (TIR expression); 0 for zero codes."""
        if not self.sqrt2:
            live = tirx.shift_left(tirx.const(1, "int32"), self.top - code)
        else:
            odd = tirx.shift_left(tirx.const(self.mantissa, "int32"), self.odd_top - tirx.shift_right(code + 1, 1))
            even = tirx.shift_left(tirx.const(1, "int32"), self.top - tirx.shift_right(code, 1))
            live = tirx.if_then_else(tirx.bitwise_and(code, 1) == 1, odd, even)
        return tirx.if_then_else(code < self.zero_code, live, 0)


def multiply_form(zero_code: int, base_shift: int, sqrt2, keys: int) -> CodeWeights | None:
    """The :class:`CodeWeights` of codes below ``zero_code`` when every such term is exact (its shift does not
    drop bits: amount <= ``base_shift``, or <= ``base_shift - F`` for the odd log-sqrt(2) form), each weight fits
    int16 and ``keys`` products of ``|v - v_zp| <= 255`` cannot overflow int32; else None. That holds for 4-bit
    log2 codes (``zero_code`` 15) at the shifts the lowering picks, not for 8-bit ones, whose small probabilities
    are floored shifts."""
    live = range(min(zero_code, 256))
    if not live:
        return None
    if sqrt2 is None:
        exponents = {c: (base_shift - c, 1) for c in live}
    else:
        mult, frac = sqrt2
        exponents = {c: ((base_shift - c // 2, 1) if c % 2 == 0 else (base_shift - frac - (c + 1) // 2, 2**frac + mult))
                     for c in live}
    if min(e for e, _ in exponents.values()) < 0:
        return None  # a floored term
    shift = min(e for e, _ in exponents.values())
    largest = max(m << (e - shift) for e, m in exponents.values())
    if largest >= 2**15 or keys * largest * 255 >= 2**31:
        return None
    if sqrt2 is None:
        return CodeWeights(zero_code, base_shift - shift, shift)
    return CodeWeights(zero_code, base_shift - shift, shift, 2**sqrt2[1] + sqrt2[0], base_shift - sqrt2[1] - shift, True)


def _log2_av_multiply_func(H, TQ, S, D, micro: Microkernel, v_dtype, v_zp, weights: CodeWeights) -> tirx.PrimFunc:
    """``p @ v`` as the q @ k^T GEMM: rows of code weights times ``v - v_zp`` read transposed, ``<< shift``."""

    def code_weight(Pc, vh, vt, vs):
        return weights.weight(tirx.Cast("int32", Pc[vh, vt, vs]))

    def centred_v(V, vh, vd, vs):
        return tirx.Cast("int32", V[vh, vs, vd]) - v_zp

    return _qk_func(H, TQ, D, S, micro, "uint8", v_dtype, 0, 0, q_elem=code_weight, k_elem=centred_v,
                    k_shape=(H, S, D), out_shift=weights.shift)


def _default_s_chunk(s: int) -> int:
    """A chunk of ``S`` near 32 (its prepared rows of ``v`` fit L1 twice over) leaving the shortest tail."""
    if s <= 40:
        return s
    return min(range(40, 23, -1), key=lambda c: s % c)


def _code_form_and_shift(code, sqrt2):
    """(which prepared form of ``v``, shift amount) of a code (int32 expr), both floor shifts.

    Log2 codes: form 0, shift by ``min(c, 31)``. Log-sqrt(2) codes: form ``c & 1`` (``v * 2**S`` or
    ``v * 2**S * mant``), shift ``min(ceil(c/2), 31)``, as :func:`reference.log2_av`.
    """
    if sqrt2 is None:
        return tirx.const(0, "int32"), tirx.min(code, 31)
    return tirx.bitwise_and(code, 1), tirx.min(tirx.shift_right(code + 1, 1), 31)


def _prepared_v(V, D, v_dtype, v_zp, base_shift, sqrt2, vh, vf, vs, vd):
    """Form ``vf`` of ``v[vh, vs, vd]``: ``(v - zp) << S`` or ``(v - zp) * (2**F + M) << (S - F)`` (0 past D)."""
    centered = tirx.Cast("int32", V[vh, vs, tirx.min(vd, D - 1)]) - v_zp
    form0 = tirx.shift_left(centered, base_shift)
    if sqrt2 is None:
        val = form0
    else:
        mult, frac = sqrt2
        form1 = tirx.shift_left(centered * (2**frac + mult), base_shift - frac)
        val = tirx.if_then_else(vf == 1, form1, form0)
    return tirx.if_then_else(vd < D, val, 0)


def _log2_av_vector_func(H, TQ, S, D, v_dtype, v_zp, base_shift, zero_code, vl, sqrt2=None,
                         d_vectors=1, s_chunk=1, neon=False) -> tirx.PrimFunc:
    """Vector-granular log2 ``p @ v``: one block step adds ``vl`` lanes of one (t, s) term.

    ``VS[h]`` holds the prepared forms of ``v`` flat, row ``form * S + s`` at element ``(form * S + s) * Dp``
    (``Dp``: ``D`` padded to whole ``d_vectors`` chunks), plus a row of zeros after them. Per (t, s) the loop
    does only integer work on the code (its row offset) and loads a 256-entry table ``LA``: the code's shift
    amount as a whole vector (``vpsravd`` reads it as is); per vector it shifts the loaded row and
    accumulates. No mask: a zero code's row is the zero row (a ``cmov``, not a branch: LLVM turned a select
    with a table load in one arm into a mispredicted branch per term).

    ``neon``: ``LA`` holds minus the amount for NEON's ``sshl`` (a negative amount shifts right, floored).
    ``S`` is walked in whole ``s_chunk`` steps
    and the accumulator starts at the sum of the terms past them, so the loop carries no predicate (one
    would keep the accumulators out of registers).
    """
    Dp = ceil_div(ceil_div(D, vl), d_vectors) * d_vectors * vl
    DV = Dp // vl
    NF = 1 if sqrt2 is None else 2
    NROWS = NF * S + 1
    NR = NROWS * Dp
    ZOFF = NF * S * Dp                  # the zero row
    S_main = S // s_chunk * s_chunk

    def prepared(V, vh, vr, vd):
        form, vs = tirx.floordiv(vr, S), tirx.floormod(vr, S)
        return tirx.if_then_else(vr < NF * S, _prepared_v(V, D, v_dtype, v_zp, base_shift, sqrt2, vh, form, vs, vd), 0)

    def step(acc, Pc, VS, LA, vh, vt, vs, vj):
        code = tirx.Cast("int32", Pc[vh, vt, vs])
        if sqrt2 is None:
            row = vs * Dp
        else:  # form (code & 1) without a table load: the loop is bound by its loads
            row = tirx.bitwise_and(-tirx.bitwise_and(code, 1), S * Dp) + vs * Dp
        offset = tirx.Select(code < zero_code, row, ZOFF)
        vec = VS[vh, tirx.Ramp(offset + vj * vl, 1, vl)]
        amount = LA[code, tirx.Ramp(0, 1, vl)]
        if neon:
            return acc + tirx.call_llvm_pure_intrin(f"int32x{vl}", "llvm.aarch64.neon.sshl.v4i32", vec, amount)
        return acc + tirx.shift_right(vec, amount)

    def tail_sum(Pc, VS, LA, vh, vt, vj):
        """The terms past the last whole chunk of ``S``: the accumulator's start."""
        acc = tirx.Broadcast(tirx.const(0, "int32"), vl)
        for k in range(S_main, S):
            acc = step(acc, Pc, VS, LA, vh, vt, tirx.const(k, "int32"), vj)
        return acc

    @T.prim_func(s_tir=True)
    def func(Pc: T.Buffer((H, TQ, S), "uint8"), V: T.Buffer((H, S, D), v_dtype), O: T.Buffer((H, TQ, D), "int32")):
        T.func_attr({"tirx.noalias": True})
        VS = T.sblock_alloc_buffer((H, NR), "int32")
        LA = T.sblock_alloc_buffer((256, vl), "int32")
        C = T.sblock_alloc_buffer((H, TQ, Dp), "int32")
        for hh, rr, dd in T.grid(H, NROWS, Dp):
            with T.sblock("VS"):
                vh, vr, vd = T.axis.remap("SSS", [hh, rr, dd])
                T.reads(V[vh, 0:S, 0:D])
                T.writes(VS[vh, vr * Dp + vd])
                VS[vh, vr * Dp + vd] = prepared(V, vh, vr, vd)
        for cc, ll in T.grid(256, vl):
            with T.sblock("LA"):
                vc, vll = T.axis.remap("SS", [cc, ll])
                LA[vc, vll] = -_code_form_and_shift(vc, sqrt2)[1] if neon else _code_form_and_shift(vc, sqrt2)[1]
        for hh, tt, j, ss in T.grid(H, TQ, DV, S_main):
            with T.sblock("C"):
                vh, vt, vj, vs = T.axis.remap("SSSR", [hh, tt, j, ss])
                T.reads(Pc[vh, vt, 0:S], LA[0:256, 0:vl], VS[vh, 0:NR])
                T.writes(C[vh, vt, vj * vl: vj * vl + vl])
                with T.init():
                    C[vh, vt, T.ramp(vj * vl, 1, vl)] = tail_sum(Pc, VS, LA, vh, vt, vj)
                C[vh, vt, T.ramp(vj * vl, 1, vl)] = step(C[vh, vt, T.ramp(vj * vl, 1, vl)], Pc, VS, LA,
                                                         vh, vt, vs, vj)
        for hh, tt, dd in T.grid(H, TQ, D):
            with T.sblock("O"):
                vh, vt, vd = T.axis.remap("SSS", [hh, tt, dd])
                O[vh, vt, vd] = C[vh, vt, vd]

    return func


def _schedule_av_vector(func: tirx.PrimFunc, rows: int, d_vectors: int, s_chunk: int) -> tirx.PrimFunc:
    """Tasks of ``rows`` output rows; each walks ``S`` in chunks of ``s_chunk`` so that chunk's prepared rows
    of ``v`` stay in L1 across the task's rows (a whole row of ``VS`` per term streams from L2 otherwise),
    with ``d_vectors`` accumulator vectors in registers over the chunk."""
    sch = Schedule(func)
    blocks = root_blocks(sch)
    b_vs, b_c, b_o = blocks["VS"], blocks["C"], blocks["O"]
    hh, tt, j, ss = sch.get_loops(b_c)
    t_o, t_i = sch.split(tt, [None, rows])
    j_o, j_i = sch.split(j, [None, d_vectors])
    s_o, s_i = sch.split(ss, [None, s_chunk])
    sch.reorder(hh, t_o, j_o, s_o, t_i, s_i, j_i)
    task = sch.fuse(hh, t_o)
    parallel(sch, task)
    sch.set_scope(b_c, 0, "local")
    sch.reverse_compute_at(b_o, j_o)
    sch.decompose_reduction(b_c, s_o)
    sch.unroll(j_i)
    vectorize(sch, sch.get_loops(b_o)[-1])
    vs_loops = sch.get_loops(b_vs)
    parallel(sch, vs_loops[0])
    vectorize(sch, vs_loops[-1])
    return sch.mod["main"]


def _log2_av_func(H, TQ, S, D, v_dtype, v_zp, base_shift, zero_code, sqrt2=None) -> tirx.PrimFunc:
    NF = 1 if sqrt2 is None else 2

    def term(Pc, VS, vh, vt, vs, vd):
        code = tirx.Cast("int32", Pc[vh, vt, vs])
        form, shift = _code_form_and_shift(code, sqrt2)
        return tirx.if_then_else(code < zero_code, tirx.shift_right(VS[vh, form, vs, vd], shift), 0)

    @T.prim_func(s_tir=True)
    def func(Pc: T.Buffer((H, TQ, S), "uint8"), V: T.Buffer((H, S, D), v_dtype), O: T.Buffer((H, TQ, D), "int32")):
        T.func_attr({"tirx.noalias": True})
        VS = T.sblock_alloc_buffer((H, NF, S, D), "int32")
        for hh, ff, ss, dd in T.grid(H, NF, S, D):
            with T.sblock("VS"):
                vh, vf, vs, vd = T.axis.remap("SSSS", [hh, ff, ss, dd])
                VS[vh, vf, vs, vd] = _prepared_v(V, D, v_dtype, v_zp, base_shift, sqrt2, vh, vf, vs, vd)
        for hh, tt, dd, ss in T.grid(H, TQ, D, S):
            with T.sblock("AV"):
                vh, vt, vd, vs = T.axis.remap("SSSR", [hh, tt, dd, ss])
                with T.init():
                    O[vh, vt, vd] = 0
                O[vh, vt, vd] = O[vh, vt, vd] + term(Pc, VS, vh, vt, vs, vd)

    return func


def _schedule_av_gpu(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = Schedule(func)
    blocks = root_blocks(sch)
    b_vs, b_av = blocks["VS"], blocks["AV"]
    fused = sch.fuse(*sch.get_loops(b_vs))
    bx, tx = sch.split(fused, [None, 128])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    hh, tt, dd, ss = sch.get_loops(b_av)
    sch.bind(sch.fuse(hh, tt), "blockIdx.x")
    sch.bind(dd, "threadIdx.x")
    acc = sch.cache_write(b_av, 0, "local")
    sch.reverse_compute_at(acc, dd)
    sch.decompose_reduction(b_av, ss)
    return sch.mod["main"]
