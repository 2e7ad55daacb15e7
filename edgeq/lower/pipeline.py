"""edgeq's Relax compile pipeline: fp32 GEMM kernels, schedules for every other PrimFunc, TVM's lowering.

``compile_relax(mod, target)`` is what :func:`edgeq.compile.library.build` runs. For a CPU (``llvm``) target:

1. :class:`~edgeq.lower.passes.float_kernels.FloatKernels` turns float matmuls and the patch conv into
   scheduled fp32 GEMM kernels (weights packed into panels at build time), and Softmax into a row kernel;
2. TVM's CPU legalization (``LegalizeOps``, ``FuseOps``, ``FuseTIR``) turns the remaining Relax ops
   (LayerNorm, Softmax, GELU, adds, reshapes, transposes) into PrimFuncs;
3. with ``tuning_db``, PrimFuncs that MetaSchedule tuned (:mod:`edgeq.compile.tune`) take their tuned schedule;
4. :func:`schedule_cpu_primfunc` schedules each PrimFunc that is still unscheduled: injective producers are
   inlined; a reduction block (LayerNorm's sums, Softmax's max and exp sum) reduces a few rows side by side,
   vectorized across rows, each row still in its serial order -- or, when the rows do not group (197 tokens),
   each row in 8 vectorized partial sums added in lane order; in every other block the outer (row) loops are
   fused into one parallel loop and the innermost spatial loop is vectorized;
5. TVM's dataflow lowering and finalization passes, then ``tvm.compile`` with the TIR pipeline
   ``edgeq_exact_fp`` (TVM's ``s_tir`` pipeline plus :func:`fence_float_products`).

Float results must not depend on the CPU: an integer build's board library has to reproduce the x86 host's
outputs bit for bit, and the float ops between the integer kernels (LayerNorm, Softmax, GELU, quantize) decide
integer codes by rounding. Every step is an IEEE operation in a fixed order (reductions stay serial, only
spatial loops are vectorized, a reduction is only ever vectorized across independent rows, no fast-math
flags) except one: TVM's LLVM backend allows FP contraction
(``AllowFPOpFusion = Fast``, no target attribute turns it off) and ``LowerIntrin`` turns ``a * b + c`` into
``llvm.fmuladd``, so whether a product was rounded before its add was up to each backend's instruction
selection and vectorizers (one LayerNorm: x86 fused the variance sum into scalar FMAs, aarch64 vectorized the
squares first and added them unfused; 930 of 12,480 outputs differed). :func:`fence_float_products` makes that
choice explicit and the same everywhere. libm calls are the other hazard (their last bit differs between
builds): FastMathTransform replaces exp/erf/tanh; ``log`` (and ``R.nn.gelu``, legalized after it to ``erff``)
would still call libm.

PrimFuncs already marked ``tirx.is_scheduled`` (edgeq's integer kernels, the GEMMs of step 1, tuned ones)
are never rescheduled. Other target kinds (CUDA, OpenCL) use :func:`gpu_pipeline`: TVM's default pipeline for
that target (dlight schedules the float ops) with the GEMM rewrite skipped, and with edgeq's kernels kept
opaque there too (:func:`keep_kernels_opaque`).
"""
from __future__ import annotations

import os
from typing import Any, Union

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule.schedule import ScheduleError

from edgeq.interrupt import raise_if_interrupted
from edgeq.lower.kernels.micro import as_target
from edgeq.lower.tuning_database import TuningApplied, TuningDatabase

#: a tuning database: its directory, or one already opened
TuningDb = Union[str, "os.PathLike[str]", TuningDatabase, None]

__all__ = ["compile_relax", "lower_relax", "cpu_pipeline", "gpu_pipeline", "schedule_relax", "schedule_cpu_primfunc", "ScheduleCPU", "is_scheduled",
           "fence_float_products", "EXACT_FP_TIR_PIPELINE"]

_SCHEDULED = "tirx.is_scheduled"
_OPAQUE = 8  # relax OpPatternKind.kOpaque
_VECTOR_LANES = 8
_MAX_VECTOR = 128
#: rows reduced side by side (the first that divides the row count): enough independent add chains to hide
#: the float adder's latency
_ROW_LANES = (8, 5, 6, 4, 7, 3)
_MIN_ROW_LENGTH = 16
_MIN_PARALLEL_ROWS = 8


def is_scheduled(func) -> bool:
    return isinstance(func, tirx.PrimFunc) and bool(func.attrs and func.attrs.get(_SCHEDULED, False))


def _is_spatial_block(sch: Schedule, block) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def _leading_spatial_loops(sch: Schedule, block) -> list:
    """The outer loops of ``block`` that bind only spatial block variables (loop i <-> iter var i of a
    legalized, unscheduled block; anything else is treated as not spatial)."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if len(loops) != len(stmt.iter_vars):
        return loops[:1] if _is_spatial_block(sch, block) else []
    out = []
    for loop, iv in zip(loops, stmt.iter_vars):
        if iv.iter_type != tirx.IterVar.DataPar:
            break
        out.append(loop)
    return out


def _inline_injective(sch: Schedule) -> None:
    """Inline every spatial block whose result is only consumed inside the function (GELU chains, the
    broadcasts and casts around LayerNorm/Softmax) so each fused PrimFunc has few loop nests."""
    changed = True
    while changed:
        changed = False
        blocks = sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []
        for block in blocks[:-1]:
            if not _is_spatial_block(sch, block):
                continue
            try:
                sch.compute_inline(block)
                changed = True
                break
            except ScheduleError:  # a block the primitive refuses (e.g. read by two consumers)
                raise_if_interrupted()
                continue


def _has_root(sch: Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except (ScheduleError, ValueError):  # no root block: nothing to schedule
        raise_if_interrupted()
        return False


def _parallel_vectorize(sch: Schedule, block, max_threads: int, lanes: int = _VECTOR_LANES) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    spatial = _leading_spatial_loops(sch, block)
    all_spatial = len(spatial) == len(loops) and _is_spatial_block(sch, block)
    inner = None
    if all_spatial and len(spatial) >= 1:
        extent = int(sch.get(spatial[-1]).extent)
        if extent % lanes == 0 and extent > lanes:
            outer, inner = sch.split(spatial[-1], [None, lanes])
            # rows in parallel, each row's vectors in a plain loop: fusing the row loop with the vector loop
            # leaves div/mod index arithmetic the vectorizer turns into gathers
            spatial = spatial[:-1] if _extent(sch, spatial[:-1]) >= _MIN_PARALLEL_ROWS else spatial[:-1] + [outer]
        elif 1 < extent <= _MAX_VECTOR and len(spatial) > 1:
            inner = spatial[-1]
            spatial = spatial[:-1]
    if spatial:
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        if int(sch.get(fused).extent) > 1 and max_threads > 1:
            sch.parallel(fused)
    if inner is not None:
        sch.vectorize(inner)


def _extent(sch: Schedule, loops) -> int:
    out = 1
    for loop in loops:
        out *= int(sch.get(loop).extent)
    return out


def _row_reduction_loops(sch: Schedule, block):
    """(row loops, reduction loops) of a block in the legalized shape -- spatial loops, then only reduction
    loops, one loop per block variable -- else None."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if len(loops) != len(stmt.iter_vars) or _is_spatial_block(sch, block):
        return None
    spatial = _leading_spatial_loops(sch, block)
    reduce = loops[len(spatial):]
    if not spatial or not reduce or any(iv.iter_type != tirx.IterVar.CommReduce for iv in stmt.iter_vars[len(spatial):]):
        return None
    return spatial, reduce


def _interleave_rows(sch: Schedule, block, max_threads: int) -> bool:
    """Reduce :data:`_ROW_LANES` independent rows side by side: ``for k: for row in lanes: acc[row] += f(x[row, k])``.

    A serial float reduction (LayerNorm's sums, Softmax's max and exp sum) is one dependent add chain per row, so
    it runs at the adder's latency. Interleaving rows keeps every row's own order (same bits: each lane does the
    scalar row's operations one after another) but gives the CPU independent chains, and lets the vectorizer
    compute the per-element work (Softmax's exp polynomial) across rows. False when the block does not have the
    legalized shape (spatial loops, then reduction loops) or its rows do not split evenly.
    """
    found = _row_reduction_loops(sch, block)
    if found is None:
        return False
    spatial, reduce = found
    if _extent(sch, reduce) < _MIN_ROW_LENGTH:  # short rows (a max over two values): spatial work dominates
        return False
    rows = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    lanes = next((n for n in _ROW_LANES if int(sch.get(rows).extent) % n == 0), None)
    if lanes is None:
        return False
    outer, inner = sch.split(rows, [None, lanes])
    sch.reorder(outer, *reduce, inner)
    # parallel and vectorize before the init block is split off: both want one complete reduction block
    if int(sch.get(outer).extent) > 1 and max_threads > 1:
        sch.parallel(outer)
    sch.vectorize(inner)
    sch.decompose_reduction(block, reduce[0])
    return True


def _reduce_in_lanes(sch: Schedule, block, max_threads: int) -> bool:
    """Reduce each row in :data:`_VECTOR_LANES` interleaved partial sums, then add the partials in lane order.

    For rows that :func:`_interleave_rows` cannot group (a prime row count, e.g. 197 tokens): the innermost
    reduction loop is split into ``(k_outer, lane)`` and ``rfactor`` gives a block of per-lane partials, each a
    serial chain over ``k_outer`` and vectorized across lanes; the row's result adds the partials lane 0 to 7.
    The order is fixed in the TIR (not left to a vectorizer), so every target computes the same bits, but it is
    a different order than a plain serial sum. False when the innermost reduction is not a whole number of
    lane groups or too short.
    """
    found = _row_reduction_loops(sch, block)
    if found is None or len(found[1]) != 1:
        return False
    spatial, reduce = found
    extent = int(sch.get(reduce[0]).extent)
    if extent % _VECTOR_LANES or extent < 2 * _VECTOR_LANES:
        return False
    _, lane = sch.split(reduce[0], [None, _VECTOR_LANES])
    partial = sch.rfactor(lane, factor_axis=len(spatial))
    rows = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    if int(sch.get(rows).extent) > 1 and max_threads > 1:
        sch.parallel(rows)
    # the partial block's loops: the row loops it shares with the block, then k_outer, then the lane loop
    p_loops = sch.get_loops(partial)
    p_rows = p_loops[:-2]
    p_fused = sch.fuse(*p_rows) if len(p_rows) > 1 else p_rows[0]
    if int(sch.get(p_fused).extent) > 1 and max_threads > 1:
        sch.parallel(p_fused)
    sch.vectorize(p_loops[-1])
    sch.decompose_reduction(partial, p_loops[-2])
    return True


def schedule_cpu_primfunc(func: tirx.PrimFunc, max_threads: int = 2, lanes: int = _VECTOR_LANES) -> tirx.PrimFunc:
    """A parallel, vectorized schedule of a legalized PrimFunc (returned unchanged when it does not apply).

    ``lanes``: the vector length of element-wise blocks (each element computed alone: any length gives the same
    bits); row reductions always use :data:`_VECTOR_LANES` partial sums, so their order is the same on every
    target."""
    try:
        sch = Schedule(func)
        if not _has_root(sch):
            return func
        _inline_injective(sch)
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            for reduction_schedule in (_interleave_rows, _reduce_in_lanes):
                trial = sch.copy()
                try:
                    scheduled = reduction_schedule(trial, block, max_threads)
                except (ScheduleError, ValueError):  # a primitive refused: try the next way
                    raise_if_interrupted()
                    scheduled = False
                if scheduled:
                    sch = trial
                    break
            else:
                _parallel_vectorize(sch, block, max_threads, lanes)
        return sch.mod["main"]
    except (ScheduleError, ValueError):  # the schedule primitive refused: keep the function as it is
        raise_if_interrupted()
        return func


def _elementwise_lanes(target: tvm.target.Target) -> int:
    """float32 lanes of one vector register: 16 with AVX-512, else :data:`_VECTOR_LANES`."""
    try:
        wide = bool(tvm.target.codegen.target_has_features(["avx512f"], target))
    except Exception:  # an LLVM without the x86 backend, or a target kind it does not describe
        wide = False
    return 16 if wide else _VECTOR_LANES


def _num_cores(target: tvm.target.Target) -> int:
    return int(target.attrs.get("num-cores", 0) or 0) or os.cpu_count() or 1


@tvm.transform.module_pass(opt_level=0, name="edgeq.ScheduleCPU")
class ScheduleCPU:
    """Schedule every PrimFunc of the module that is not ``tirx.is_scheduled`` yet, then mark it scheduled."""

    def __init__(self, target):
        self.target = as_target(target)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        threads = _num_cores(self.target)
        lanes = _elementwise_lanes(self.target)
        updates = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc) and not is_scheduled(func):
                updates[gv] = schedule_cpu_primfunc(func, threads, lanes).with_attr(_SCHEDULED, True)
        for gv, func in updates.items():
            mod[gv] = func
        return mod


@tvm.transform.module_pass(opt_level=0, name="edgeq.KeepKernelsOpaque")
def keep_kernels_opaque(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Mark every already scheduled PrimFunc (integer and fp32 GEMM kernels) ``op_pattern`` opaque.

    Otherwise ``AnnotateTIROpPattern`` calls an integer GEMM "out-elementwise fusable" and ``FuseOps`` /
    ``FuseTIR`` merge it with the ``astype`` after it into one new, unscheduled PrimFunc, or fail: the
    kernels' buffers have int32 extents and legalized ops' have int64 ones, so FuseTIR finds two unequal
    buffers for the var between them ("Inconsistent buffers O and ... mapped to the same relax var").
    """
    updates = {gv: func.with_attr("op_pattern", _OPAQUE) for gv, func in mod.functions.items() if is_scheduled(func)}
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def _apply_tuning_db(database: TuningDatabase, target: tvm.target.Target, applied: list[str]) -> tvm.transform.Pass:
    """MetaSchedule's database pass; the PrimFuncs it gives a tuned schedule are appended to ``applied`` (read
    back by :func:`lower_relax`, which made the list)."""

    @tvm.transform.module_pass(opt_level=0, name="edgeq.ApplyTuningDatabase")
    def _apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        already = {gv.name_hint for gv, func in mod.functions.items() if is_scheduled(func)}
        with target:  # MetaSchedule's pass reads the target when it is created
            mod = relax.transform.MetaScheduleApplyDatabase(work_dir=str(database.path), enable_warning=False)(mod)
        applied.extend(sorted(gv.name_hint for gv, func in mod.functions.items()
                              if is_scheduled(func) and gv.name_hint not in already))
        return mod

    return _apply


#: Elementwise ops ONNX's Gather import wraps constant indices in (negative indices are normalized with
#: ``where(i < 0, i + n, i)``), with their numpy equivalents, to evaluate such indices here.
_INDEX_OPS = {"relax.where": np.where, "relax.less": np.less, "relax.greater": np.greater,
              "relax.less_equal": np.less_equal, "relax.greater_equal": np.greater_equal, "relax.add": np.add,
              "relax.subtract": np.subtract}


@relax.expr_functor.mutator
class _CheckedTakes(relax.PyExprMutator):
    """``take(x, indices)`` from ONNX Gather (the class token) uses TVM's "fast" mode, for which TVM prints
    "Fast mode segfaults when there are out-of-bounds indices" on every build. Indices computed from constants
    alone and within bounds cannot be out of bounds: they get the "clip" mode, same result, no warning."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.bound: dict = {}

    def visit_var_binding_(self, binding) -> None:
        self.bound[binding.var] = binding.value
        super().visit_var_binding_(binding)

    def _constant(self, expr, depth: int = 0):
        """``expr`` as a numpy array when only constants and :data:`_INDEX_OPS` make it, else None."""
        expr = self.bound.get(expr, expr) if isinstance(expr, relax.Var) else expr
        if isinstance(expr, tvm.ir.expr.Constant):
            return expr.value.numpy()
        if depth > 8 or not isinstance(expr, relax.Call) or not isinstance(expr.op, tvm.ir.Op):
            return None
        if expr.op.name == "relax.where":  # a constant condition needs only the branch it picks
            condition = self._constant(expr.args[0], depth + 1)
            if condition is not None and (condition.all() or not condition.any()):
                return self._constant(expr.args[1 if condition.all() else 2], depth + 1)
        compute = _INDEX_OPS.get(expr.op.name)
        args = [self._constant(arg, depth + 1) for arg in expr.args] if compute else [None]
        return compute(*args) if all(a is not None for a in args) else None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take" and call.attrs.mode == "fast"):
            return call
        data, indices = call.args
        ty = data.ty
        shape = getattr(ty.shape, "values", None) if isinstance(ty, relax.TensorType) and ty.shape is not None \
            else None
        values = self._constant(indices)
        if values is None or shape is None or call.attrs.axis is None:
            return call
        axis = int(call.attrs.axis)
        extent = shape[axis if axis >= 0 else axis + len(shape)]
        if not isinstance(extent, tirx.IntImm):
            return call
        if values.size and not (0 <= values.min() and values.max() < int(extent)):
            return call
        return relax.op.take(data, indices, axis=axis, mode="clip")


@tvm.transform.module_pass(opt_level=0, name="edgeq.CheckedTakes")
def checked_takes(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    rewriter = _CheckedTakes(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()


def legalizing_passes(tgt: tvm.target.Target) -> list:
    """Steps 1-2 of the module doc: what turns Relax ops into PrimFuncs before any is scheduled. ``edgeq tune``
    extracts its tasks after exactly these, so its database matches the PrimFuncs a build schedules."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    from edgeq.lower.passes.float_kernels import FloatKernels

    # FastMathTransform: erf/exp/tanh as vectorizable polynomials (libm's are scalar calls; GELU's erf alone
    # cost as much as all the GEMMs of a block); agreement with PyTorch stays ~1e-6
    passes = [FloatKernels(tgt), relax.transform.FastMathTransform(), checked_takes, keep_kernels_opaque]
    return passes + cpu_generic.library_dispatch_passes(tgt) + cpu_generic.legalize_passes(tgt)


def _scheduling_passes(tgt: tvm.target.Target, database: TuningDatabase | None, applied: list[str]) -> list:
    """Steps 1-4 of the module doc: Relax ops to scheduled PrimFuncs, ``main`` still a dataflow of ``call_tir``."""
    passes = legalizing_passes(tgt)
    if database is not None:
        passes.append(_apply_tuning_db(database, tgt, applied))
    passes.append(ScheduleCPU(tgt))
    return passes


def schedule_relax(mod: tvm.IRModule, target, *, tuning_db: TuningDb = None) -> tvm.IRModule:
    """``mod`` as :func:`cpu_pipeline` has it just before dataflow lowering: every op a scheduled PrimFunc that
    ``main`` calls with ``R.call_tir`` (what ``edgeq profile --per-op`` times one PrimFunc at a time)."""
    return lower_relax(mod, target, tuning_db=tuning_db, schedule_only=True)[0]


def cpu_pipeline(target, *, database: TuningDatabase | None = None,
                 applied: list[str] | None = None) -> tvm.transform.Pass:
    """The Relax pipeline :func:`compile_relax` uses for a CPU target (a ``tvm.transform.Pass``); the PrimFuncs
    ``database`` schedules are appended to ``applied``."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    tgt = as_target(target)
    passes = _scheduling_passes(tgt, database, applied if applied is not None else [])
    passes += cpu_generic.dataflow_lower_passes(tgt) + cpu_generic.finalize_passes(tgt)

    @tvm.transform.module_pass(opt_level=0, name="edgeq.CPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with tgt:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def gpu_pipeline(target) -> tvm.transform.Pass:
    """The Relax pipeline :func:`compile_relax` uses for a GPU target: TVM's default one for its kind, after
    :func:`keep_kernels_opaque` (dlight leaves the kernels' own GPU schedules alone: they are scheduled)."""
    tgt = as_target(target)
    default = relax.pipeline.get_default_pipeline(tgt)

    @tvm.transform.module_pass(opt_level=0, name="edgeq.GPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return default(keep_kernels_opaque(mod))

    return _pipeline


_FLOAT_CODE = 2  # DLDataTypeCode kDLFloat
_FENCE = "llvm.arithmetic.fence"
_FMA = "llvm.fma"
#: The TIR pipeline :func:`compile_relax` builds CPU modules with (registered with TVM on import).
EXACT_FP_TIR_PIPELINE = "edgeq_exact_fp"


def _is_float(expr) -> bool:
    return expr.ty.dtype.type_code == _FLOAT_CODE


def _fuse_product_sum(add):
    """``a * b + c`` (either order) -> ``llvm.fma(a, b, c)``: one rounding, on every target."""
    for mul, other in ((add.a, add.b), (add.b, add.a)):
        if isinstance(mul, tirx.Mul) and _is_float(add):
            return tirx.call_llvm_pure_intrin(add.ty.dtype, _FMA, mul.a, mul.b, other)
    return add


def _fence_product(mul):
    return tirx.call_llvm_pure_intrin(mul.ty.dtype, _FENCE, mul) if _is_float(mul) else mul


@tirx.transform.prim_func_pass(opt_level=0, name="edgeq.FenceFloatProducts")
def fence_float_products(func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
    """Make each float product's rounding explicit, so no backend decides whether to contract it.

    ``a * b + c`` becomes ``llvm.fma`` (always fused: one rounding, FMA instructions on x86 with FMA3, aarch64
    and ARMv7 with VFPv4; a correctly rounded ``fmaf`` call on a CPU without them), and every other float
    product is wrapped in ``llvm.arithmetic.fence`` (always rounded: no backend fuses across a fence). Runs
    after vectorization and before ``LowerIntrin`` (which would turn ``a * b + c`` into ``llvm.fmuladd``,
    fused or not at the backend's choice); integer arithmetic is left alone.
    """
    body = tvm_ffi.structural_map(func.body, [(tirx.Add, _fuse_product_sum)])
    return func.with_body(tvm_ffi.structural_map(body, [(tirx.Mul, _fence_product)]))


def _exact_fp_tir_pipeline():
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    lower, finalize_host, finalize_device = default_s_tir_pipeline()

    def fenced_finalize_host():
        return tvm.transform.Sequential([fence_float_products, finalize_host()])

    return lower, fenced_finalize_host, finalize_device


tirx.compilation_pipeline.register_tir_pipeline(EXACT_FP_TIR_PIPELINE, _exact_fp_tir_pipeline)


def lower_relax(mod: tvm.IRModule, target, *, tuning_db: TuningDb = None,
                schedule_only: bool = False) -> tuple[Any, TuningApplied | None]:
    """Compile a Relax module for ``target`` (Target, JSON dict or tag): ``(tvm.relax.Executable, what the
    database gave)``; with ``schedule_only``, the scheduled module of :func:`schedule_relax` instead of the
    executable (a GPU module is returned as it is: TVM's pipeline schedules it while compiling).

    ``tuning_db``: a MetaSchedule database written by ``edgeq tune`` for this target (a directory, or a
    :class:`~edgeq.lower.tuning_database.TuningDatabase` already opened); its tuned PrimFuncs replace edgeq's
    generic schedules (the fp32/integer GEMM kernels stay hand-scheduled) and are named in the returned
    :class:`~edgeq.lower.tuning_database.TuningApplied` (a database tuned for another model matches nothing).
    CPU modules are built with the :data:`EXACT_FP_TIR_PIPELINE`: their float results are the same bits on
    x86_64 and ARM.
    """
    tgt = as_target(target)
    database = None if tuning_db is None else TuningDatabase.open(tuning_db, [tgt])
    if tgt.kind.name != "llvm":
        return (mod if schedule_only else tvm.compile(mod, target=tgt, relax_pipeline=gpu_pipeline(tgt))), None
    applied: list[str] = []
    if schedule_only:
        with tgt:
            built = tvm.transform.Sequential(_scheduling_passes(tgt, database, applied))(mod)
    else:
        os.environ.setdefault("TVM_BIND_THREADS", "0")
        built = tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt, database=database, applied=applied),
                            tir_pipeline=EXACT_FP_TIR_PIPELINE)
    return built, None if database is None else TuningApplied(database, tuple(sorted(set(applied))))


def compile_relax(mod: tvm.IRModule, target, *, tuning_db: TuningDb = None):
    """:func:`lower_relax`'s executable alone."""
    return lower_relax(mod, target, tuning_db=tuning_db)[0]
