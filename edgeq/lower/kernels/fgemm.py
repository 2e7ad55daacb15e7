"""Hand-scheduled fp32 GEMM kernels (``out[b] = x[b] @ w[b] (+ bias)``) for the float parts of a model.

TVM 0.27's default CPU pipeline compiles a legalized ``R.matmul`` as a naive triple loop; these kernels are
what :mod:`edgeq.lower.passes.float_kernels` calls instead. One PrimFunc per shape, three weight modes:

``"packed"``  constant weights, packed at build time by :meth:`FloatGemmKernel.pack` into panels
              ``w[NB, K, nb]`` (``nb`` output channels side by side, zero padded), shared by every batch;
``"kn"``      a runtime right operand ``w[B, K, N]`` (attention ``p @ v``);
``"nk"``      a runtime right operand stored transposed, ``w[B, N, K]`` (attention ``q @ k^T``).

Stages: ``P`` (runtime modes only) copies one ``K x nb`` panel per parallel task; ``C`` is the register-tiled
micro-kernel (``mr`` rows x ``nb`` channels of accumulators, one broadcast of ``x[m, k]`` times one panel
row per step, which LLVM turns into FMA vectors: AVX2/FMA ``vfmadd231ps`` on x86, NEON ``fmla`` on aarch64);
``O`` adds the bias and stores the tile. The tile sizes come from the target (:func:`gemm_tiles`): with 16
vector registers (AVX2) 6 x 16 floats = 12 accumulators, with 32 (NEON) 8 x 16 = 32 ... less the operands,
so 6 x 16 as well. Rows beyond ``M`` read the last row (clamped) and are never stored.

PrimFunc signature (row-major, fixed shapes)::

    f(x[B, M, K] f32, w[...] f32, [bias[N] f32,] out[B, M, N] f32)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from .micro import as_target, ceil_div
from .qlinear import parallel, vectorize

__all__ = ["FloatGemmKernel", "GemmTiles", "float_gemm_kernel", "gemm_tiles"]

_MODES = ("packed", "kn", "nk")


@dataclass(frozen=True)
class GemmTiles:
    """Register tile of the micro-kernel: ``mr`` rows x ``nb`` channels (``nb`` a multiple of ``vl``)."""

    family: str
    mr: int
    nb: int
    vl: int


def _has_feature(target: tvm.target.Target, feature: str) -> bool:
    try:
        return bool(tvm.target.codegen.target_has_features([feature], target))
    except Exception:  # pragma: no cover - LLVM without that backend
        return False


def gemm_tiles(target) -> GemmTiles:
    """The register tile for ``target``: AVX-512 16 x 32... kept at 16 lanes, AVX2 6 x 16, NEON 6 x 16."""
    tgt = as_target(target)
    triple = str(tgt.attrs.get("mtriple", "") or tvm.target.codegen.llvm_get_system_triple())
    if triple.startswith(("aarch64", "arm64")):
        return GemmTiles("arm_neon", mr=6, nb=16, vl=4)
    if triple.startswith(("x86_64", "i686", "i386")):
        if _has_feature(tgt, "avx512f"):
            return GemmTiles("x86_avx512", mr=12, nb=32, vl=16)
        if _has_feature(tgt, "avx2"):
            return GemmTiles("x86_avx2", mr=6, nb=16, vl=8)
        return GemmTiles("x86_sse", mr=4, nb=8, vl=4)
    return GemmTiles("generic", mr=4, nb=8, vl=4)


def _num_cores(tgt: tvm.target.Target) -> int:
    cores = int(tgt.attrs.get("num-cores", 0) or 0)
    if cores:
        return cores
    import os

    return os.cpu_count() or 1


@dataclass
class FloatGemmKernel:
    """A scheduled fp32 GEMM for fixed shapes and the build-time packing of its constant weights."""

    func: tirx.PrimFunc
    name: str
    batch: int
    m: int
    k: int
    n: int
    mode: str
    bias: bool
    tiles: GemmTiles

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.mode == "packed":
            return (ceil_div(self.n, self.tiles.nb), self.k, self.tiles.nb)
        if self.mode == "kn":
            return (self.batch, self.k, self.n)
        return (self.batch, self.n, self.k)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return (self.batch, self.m, self.n)

    def pack(self, w: np.ndarray) -> np.ndarray:
        """Panels ``[NB, K, nb]`` of a constant ``w[K, N]`` (``packed`` mode), zero padded in N."""
        if self.mode != "packed":
            raise ValueError(f"only packed-mode kernels take build-time weights, this one is {self.mode!r}")
        w = np.asarray(w, dtype=np.float32)
        if w.shape != (self.k, self.n):
            raise ValueError(f"weights of shape {w.shape}, kernel expects {(self.k, self.n)}")
        nb = self.tiles.nb
        nblk = ceil_div(self.n, nb)
        padded = np.zeros((self.k, nblk * nb), np.float32)
        padded[:, :self.n] = w
        return np.ascontiguousarray(padded.reshape(self.k, nblk, nb).transpose(1, 0, 2))


def float_gemm_kernel(batch: int, m: int, k: int, n: int, target, *, mode: str = "packed", bias: bool = False,
                      mr: int | None = None, nb: int | None = None, num_tasks: int | None = None,
                      name: str | None = None) -> FloatGemmKernel:
    """A scheduled fp32 ``x[batch, m, k] @ w -> [batch, m, n]`` for ``target`` (dict, tag or Target)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, not {mode!r}")
    if min(batch, m, k, n) < 1:
        raise ValueError(f"shapes must be positive, got batch={batch} m={m} k={k} n={n}")
    tgt = as_target(target)
    tiles = gemm_tiles(tgt)
    if mr or nb:
        tiles = GemmTiles(tiles.family, mr or tiles.mr, nb or tiles.nb, tiles.vl)
    func = _gemm_func(batch, m, k, n, tiles, mode, bias)
    tasks = num_tasks or max(8, 4 * _num_cores(tgt))
    func = _schedule(func, tiles, mode, tasks)
    tag = f"_t{tiles.mr}x{tiles.nb}" if (mr or nb) else ""
    name = name or f"edgeq_fgemm_{tiles.family}_b{batch}m{m}k{k}n{n}_{mode}{'_bias' if bias else ''}{tag}"
    func = func.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
    return FloatGemmKernel(func, name, batch, m, k, n, mode, bias, tiles)


def _gemm_func(B: int, M: int, K: int, N: int, tiles: GemmTiles, mode: str, bias: bool) -> tirx.PrimFunc:
    mr, nb = tiles.mr, tiles.nb
    Mp, NB = ceil_div(M, mr) * mr, ceil_div(N, nb)
    x = te.placeholder((B, M, K), "float32", name="x")
    if mode == "packed":
        w = te.placeholder((NB, K, nb), "float32", name="w")
        panel = w
        read = lambda b, j, kk, l: w[j, kk, l]  # noqa: E731
    else:
        w = te.placeholder((B, K, N) if mode == "kn" else (B, N, K), "float32", name="w")

        def load(b, j, kk, l):
            col = j * nb + l
            safe = tirx.min(col, N - 1)
            value = w[b, kk, safe] if mode == "kn" else w[b, safe, kk]
            return tirx.if_then_else(col < N, value, tirx.const(0.0, "float32"))

        panel = te.compute((B, NB, K, nb), load, name="P")
        read = lambda b, j, kk, l: panel[b, j, kk, l]  # noqa: E731
    r = te.reduce_axis((0, K), name="k")
    acc = te.compute(
        (B, Mp, NB, nb),
        lambda b, i, j, l: te.sum(x[b, tirx.min(i, M - 1), r] * read(b, j, r, l), axis=r),
        name="C",
    )
    inputs = [x, w]
    if bias:
        bvec = te.placeholder((N,), "float32", name="bias")
        out = te.compute((B, M, N), lambda b, i, c: acc[b, i, c // nb, c % nb] + bvec[c], name="O")
        inputs.append(bvec)
    else:
        out = te.compute((B, M, N), lambda b, i, c: acc[b, i, c // nb, c % nb], name="O")
    func = te.create_prim_func(inputs + [out])
    return func.with_attr("tirx.noalias", True)


def _schedule(func: tirx.PrimFunc, tiles: GemmTiles, mode: str, num_tasks: int) -> tirx.PrimFunc:
    sch = Schedule(func)
    b_c, b_o = sch.get_sblock("C"), sch.get_sblock("O")
    b_p = sch.get_sblock("P") if mode != "packed" else None
    b, i, j, l, kk = sch.get_loops(b_c)
    io, ii = sch.split(i, [None, tiles.mr])
    m_tiles = int(sch.get(io).extent)
    outer = int(sch.get(b).extent) * int(sch.get(j).extent)
    chunks = min(m_tiles, ceil_div(num_tasks, outer))
    if chunks > 1:
        io_o, io_i = sch.split(io, [chunks, None])
        sch.reorder(b, j, io_o, io_i, kk, ii, l)
        task = sch.fuse(b, j, io_o)
    else:
        sch.reorder(b, j, io, kk, ii, l)
        task, io_i = sch.fuse(b, j), io
    parallel(sch, task)
    sch.set_scope(b_c, 0, "local")
    sch.reverse_compute_at(b_o, io_i)
    if b_p is not None:
        sch.compute_at(b_p, task)
        vectorize(sch, sch.get_loops(b_p)[-1])
    sch.unroll(ii)
    vectorize(sch, l)  # before decompose_reduction: the update block alone is not 'compact' for vectorize
    sch.decompose_reduction(b_c, kk)
    init = sch.get_sblock("C_init")
    vectorize(sch, sch.get_loops(init)[-1])
    vectorize(sch, sch.get_loops(b_o)[-1])
    return sch.mod["main"]
