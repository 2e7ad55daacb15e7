"""Relax pass: float matmuls and the patch-embedding conv -> ``R.call_tir`` of scheduled fp32 GEMM kernels.

TVM 0.27 legalizes ``R.matmul`` into an unscheduled loop nest that the CPU pipeline never schedules (an
untuned deit_tiny is ~50x slower than onnxruntime). Before legalization this pass replaces, in every Relax
function, for float32 operands with static shapes:

* ``R.matmul(x[..., K], W[K, N] const)`` (a Linear), and the ``R.add`` of a constant bias ``[N]`` /
  ``[1, .., N]`` that is its only use, by one packed-weight kernel with the bias fused
  (:func:`edgeq.lower.kernels.fgemm.float_gemm_kernel`, mode ``packed``; the weight panels are computed
  here, once, as a new constant);
* ``R.matmul(a[..., M, K], b[..., K, N])`` of two runtime tensors with equal batch dimensions (attention),
  by a batched kernel (mode ``kn``, or ``nk`` reading ``c`` directly when ``b = permute_dims(c)`` swaps the
  last two axes);
* ``R.nn.conv2d`` whose stride equals its kernel size (no padding, dilation or groups: a ViT/Swin patch
  embedding) by an im2col reshape/transpose and a packed-weight kernel;
* ``R.nn.softmax`` over the last axis by :func:`edgeq.lower.kernels.softmax.softmax_kernel` (16 lane partials per
  row: the generic schedule interleaves rows instead, which at 197 tokens means strided loads).

Anything else (integer ``R.call_tir`` kernels included, dynamic shapes, other dtypes) is left as it is. The
emitted PrimFuncs carry ``tirx.is_scheduled`` and ``op_pattern`` opaque, so neither FuseOps nor later
scheduling touches them.
"""
from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from edgeq.lower.kernels.fgemm import FloatGemmKernel, float_gemm_kernel
from edgeq.lower.kernels.softmax import softmax_kernel
from edgeq.compile.targets import as_tvm_target

__all__ = ["FloatKernels", "rewrite_float_kernels"]

_Constant = tvm.ir.expr.Constant  # relax.const(...) in TVM 0.27 (a GenericConst)
_OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps leaves an opaque PrimFunc alone


def _static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    shape = getattr(ty.shape, "values", None)
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
        return None
    return tuple(int(d) for d in shape)


def _is_f32(expr: relax.Expr) -> bool:
    ty = expr.ty
    return isinstance(ty, relax.TensorType) and ty.dtype == "float32"


def _bias_vector(expr: relax.Expr, n: int) -> np.ndarray | None:
    """The constant ``expr`` as a float32 ``[n]`` vector when it broadcasts along the last axis only."""
    if not isinstance(expr, _Constant) or not _is_f32(expr):
        return None
    value = expr.value.numpy()
    if value.size != n or (value.ndim and value.shape[-1] != n):
        return None
    return value.reshape(n).astype(np.float32)


def _fusable_bias_adds(func: relax.Function) -> dict[relax.Var, tuple[relax.Var, np.ndarray]]:
    """For each ``y = add(mm, bias const)`` (either order) with ``mm = matmul(x, W const)`` used only there:
    ``{mm: (y, bias), y: (mm, bias)}`` (binding vars). The matmul is then emitted with the bias fused and
    the add becomes a plain alias of its result."""
    bound: dict[relax.Var, relax.Expr] = {}
    uses: dict[relax.Var, int] = {}

    def count(expr):
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1

    bindings = []
    for block in getattr(func.body, "blocks", []):
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                continue
            bindings.append(binding)
            bound[binding.var] = binding.value
            relax.analysis.post_order_visit(binding.value, count)
    relax.analysis.post_order_visit(func.body.body, count)
    add, matmul = tvm.ir.Op.get("relax.add"), tvm.ir.Op.get("relax.matmul")
    found: dict[relax.Var, tuple[relax.Var, np.ndarray]] = {}
    for binding in bindings:
        call = binding.value
        if not (isinstance(call, relax.Call) and call.op.same_as(add)):
            continue
        for mm_var, other in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
            if not isinstance(mm_var, relax.Var) or uses.get(mm_var) != 1:
                continue
            mm = bound.get(mm_var)
            if not (isinstance(mm, relax.Call) and mm.op.same_as(matmul) and isinstance(mm.args[1], _Constant)):
                continue
            out_shape = _static_shape(binding.var)
            if out_shape is None or out_shape != _static_shape(mm_var):
                continue
            bias = _bias_vector(other, out_shape[-1])
            if bias is not None:
                found[mm_var] = (binding.var, bias)
                found[binding.var] = (mm_var, bias)
                break
    return found


@relax.expr_functor.mutator
class _FloatKernelRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        super().__init__(mod)
        self.target = target
        self.kernels: dict[str, relax.GlobalVar] = {}
        self.fused: dict[relax.Var, tuple[relax.Var, np.ndarray]] = {}
        self.binding_var: relax.Var | None = None
        self.bias_done: set[relax.Var] = set()
        self.count = 0

    # -- helpers ---------------------------------------------------------------------------------------
    def _call(self, kernel: FloatGemmKernel, args) -> relax.Expr:
        gv = self.kernels.get(kernel.name)
        if gv is None:
            func = kernel.func.with_attr("op_pattern", _OPAQUE)
            gv = self.builder_.add_func(func, kernel.name)
            self.kernels[kernel.name] = gv
        self.count += 1
        return relax.call_tir(gv, args, relax.TensorType(kernel.out_shape, "float32"))

    def _reshape(self, x: relax.Expr, shape) -> relax.Expr:
        if _static_shape(x) == tuple(shape):
            return x
        return self.builder_.emit(relax.op.reshape(x, tuple(int(d) for d in shape)))

    def _linear(self, x: relax.Expr, w: np.ndarray, bias: np.ndarray | None) -> relax.Expr:
        shape = _static_shape(x)
        k, n = w.shape
        m = math.prod(shape[:-1])
        kernel = float_gemm_kernel(1, m, k, n, self.target, mode="packed", bias=bias is not None)
        args = [self._reshape(x, (1, m, k)), relax.const(kernel.pack(w))]
        if bias is not None:
            args.append(relax.const(bias))
        out = self.builder_.emit(self._call(kernel, args))
        return self._reshape(out, shape[:-1] + (n,))

    # -- rewrites --------------------------------------------------------------------------------------
    def visit_function_(self, func):
        self.fused = _fusable_bias_adds(func)
        return super().visit_function_(func)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        self.binding_var = binding.var  # which binding visit_call_ rewrites (the fusion table's key)
        super().visit_var_binding_(binding)
        self.binding_var = None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        op = call.op
        if not isinstance(op, tvm.ir.Op):
            return call
        fused = self.fused.get(self.binding_var) if self.binding_var is not None else None
        if op.name == "relax.matmul":
            out = self._matmul(call, fused[1] if fused else None)
            if fused is not None and out is not call:
                self.bias_done.add(self.binding_var)
            return out
        if op.name == "relax.add" and fused is not None and fused[0] in self.bias_done:
            return self.visit_expr(fused[0])  # the matmul's result, which already holds the bias
        if op.name == "relax.nn.conv2d":
            return self._conv2d(call)
        if op.name == "relax.nn.softmax":
            return self._softmax(call)
        return call

    def _softmax(self, call: relax.Call) -> relax.Expr:
        (x,) = call.args
        shape = _static_shape(x)
        if shape is None or not _is_f32(x) or int(call.attrs.axis) not in (-1, len(shape) - 1):
            return call
        rows = math.prod(shape[:-1])
        kernel = softmax_kernel(rows, shape[-1], self.target)
        out = self.builder_.emit(self._call(kernel, [self._reshape(x, (rows, shape[-1]))]))
        return self._reshape(out, shape)

    def _matmul(self, call: relax.Call, bias: np.ndarray | None) -> relax.Expr:
        x, y = call.args
        if not (_is_f32(x) and _is_f32(y)) or call.attrs.out_dtype not in ("", "float32", None):
            return call
        xs, ys = _static_shape(x), _static_shape(y)
        if xs is None or ys is None or len(xs) < 2 or len(ys) < 2:
            return call
        if isinstance(y, _Constant) and len(ys) == 2:
            return self._linear(x, y.value.numpy(), bias)
        if len(xs) != len(ys) or xs[:-2] != ys[:-2] or xs[-1] != ys[-2]:
            return call
        batch, (m, k), n = math.prod(xs[:-2]), xs[-2:], ys[-1]
        mode, rhs = "kn", y
        producer = self.lookup_binding(y) if isinstance(y, relax.Var) else None
        if isinstance(producer, relax.Call) and producer.op == tvm.ir.Op.get("relax.permute_dims"):
            axes = [int(a) for a in producer.attrs.axes] if producer.attrs.axes is not None else None
            rank = len(ys)
            if axes == list(range(rank - 2)) + [rank - 1, rank - 2]:
                mode, rhs = "nk", producer.args[0]
        kernel = float_gemm_kernel(batch, m, k, n, self.target, mode=mode)
        rhs_shape = (batch, k, n) if mode == "kn" else (batch, n, k)
        out = self.builder_.emit(self._call(kernel, [self._reshape(x, (batch, m, k)), self._reshape(rhs, rhs_shape)]))
        return self._reshape(out, xs[:-1] + (n,))

    def _conv2d(self, call: relax.Call) -> relax.Expr:
        x, w = call.args
        attrs = call.attrs
        xs, ws = _static_shape(x), _static_shape(w)
        if not (isinstance(w, _Constant) and _is_f32(x) and _is_f32(w)) or xs is None or len(xs) != 4:
            return call
        if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or attrs.out_layout not in ("NCHW", ""):
            return call
        if attrs.out_dtype not in ("", "float32", None):
            return call
        o, c, kh, kw = ws
        strides = [int(s) for s in attrs.strides]
        if int(attrs.groups) != 1 or any(int(p) for p in attrs.padding) or any(int(d) != 1 for d in attrs.dilation):
            return call
        if strides != [kh, kw] or xs[2] % kh or xs[3] % kw or xs[1] != c:
            return call
        b, _, h, wd = xs
        hp, wp = h // kh, wd // kw
        patches = self._reshape(x, (b, c, hp, kh, wp, kw))
        patches = self.builder_.emit(relax.op.permute_dims(patches, [0, 2, 4, 1, 3, 5]))
        patches = self._reshape(patches, (b * hp * wp, c * kh * kw))
        weight = w.value.numpy().reshape(o, c * kh * kw).T
        out = self._linear(patches, np.ascontiguousarray(weight), None)
        out = self._reshape(out, (b, hp, wp, o))
        return relax.op.permute_dims(out, [0, 3, 1, 2])


def rewrite_float_kernels(mod: tvm.IRModule, target) -> tuple[tvm.IRModule, int]:
    """``mod`` with float matmuls / patch convs as fp32 GEMM kernels, and how many calls were rewritten."""
    tgt = as_tvm_target(target)
    rewriter = _FloatKernelRewriter(mod, tgt)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    out = rewriter.builder_.get()
    out = relax.transform.DeadCodeElimination()(out)
    return out, rewriter.count


@tvm.transform.module_pass(opt_level=0, name="edgeq.FloatKernels")
class FloatKernels:
    """Module pass wrapper of :func:`rewrite_float_kernels` for a target."""

    def __init__(self, target):
        self.target = as_tvm_target(target)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_float_kernels(mod, self.target)[0]
