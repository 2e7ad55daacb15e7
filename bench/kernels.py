"""Micro-benchmark of edgeq's integer kernels against peers, measured in the same run.

    python bench/kernels.py [--threads 2] [--rounds 30] [--repeat 10]

The headline is the deit_tiny MLP/QKV-sized linear layer ``x[197,192] @ w[768,192]^T``:

* edgeq qlinear (int8 x int8 -> int32 -> requantized int8, the scheduled TIR kernel for this host),
  its int32-output variant and its int4-weight variant;
* numpy int32 matmul (the naive exact integer reference);
* torch float32 matmul;
* onnxruntime ``MatMulInteger`` (uint8 x int8 -> int32, MLAS).

and, for attention at deit_tiny size (H=3, T=197, D=64), edgeq ``q @ k^T`` and log2 ``p @ v`` (4-bit log2 codes
as shifts and as the int16 GEMM the x86 kernels run them as, and the 8-bit log-sqrt(2) codes of a deit_tiny
W8A8 model) against numpy/torch float32. Each round times
every contender back to back (``--repeat`` calls each), the table shows the median and the minimum over
rounds and the ratio to edgeq's median. Numbers on a shared or loaded machine are noisy: compare ratios
from one run, not numbers across runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--no-glue", action="store_true", help="skip the float ops between the kernels")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: CPU time of the calling thread (needs --threads 1; robust on a loaded machine)")
    args = ap.parse_args(argv)
    from machine import print_machine  # bench/machine.py: python puts this script's folder on sys.path

    print_machine()
    if args.clock == "thread" and args.threads != 1:
        ap.error("--clock thread measures the calling thread only: use it with --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter

    # thread counts must be fixed before the runtimes start their pools
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    # idle worker threads of one runtime must not spin on the cores the next contender needs
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # TVM pins its workers to cores by default; on a shared/loaded machine that serialized the two tasks
    os.environ.setdefault("TVM_BIND_THREADS", "0")

    import numpy as np
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from edgeq.lower.kernels import reference as ref
    from edgeq.lower.kernels.attention import log2_av_kernel, qk_kernel
    from edgeq.lower.kernels.qlinear import qlinear_kernel
    from edgeq.lower.kernels.runner import HostKernel, host_target

    torch.set_num_threads(args.threads)
    target = host_target(args.threads)
    rng = np.random.default_rng(0)
    m, k, n = 197, 192, 768
    x_u8 = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    w4 = rng.integers(-8, 8, (n, k)).astype(np.int8)
    bias = rng.integers(-5000, 5000, n).astype(np.int32)
    mult, shift = ref.quantize_multipliers(rng.uniform(2e-4, 2e-3, n))
    x_zp = 128

    contenders: dict[str, object] = {}
    checks = []

    def add_edgeq(label, kern, w_in):
        packed = kern.pack(w_in, bias, x_zp, mult, shift)
        hk = HostKernel(kern.func, kern.name, target)
        targs = hk.prepare([x_u8] + [packed[p] for p in kern.param_names[1:-1]], kern.out_shape, kern.out_dtype)
        hk.call(targs)
        if kern.out_dtype == "int32":
            expect = ref.qlinear_acc(x_u8, x_zp, w_in, bias)
        else:
            expect = ref.qlinear(x_u8, x_zp, w_in, bias, mult, shift, kern.out_zp)
        checks.append((label, bool(np.array_equal(targs[-1].numpy(), expect))))
        contenders[label] = lambda hk=hk, targs=targs: hk.call(targs)

    fam = qlinear_kernel(m, k, n, target, x_dtype="uint8").micro.family
    add_edgeq(f"edgeq qlinear int8->int8 ({fam})", qlinear_kernel(m, k, n, target, x_dtype="uint8"), w)
    add_edgeq("edgeq qlinear int8->int32", qlinear_kernel(m, k, n, target, x_dtype="uint8", out_dtype="int32"), w)
    add_edgeq("edgeq qlinear w4a8->int8", qlinear_kernel(m, k, n, target, x_dtype="uint8", w_bits=4),
              ref.pack_int4(w4))
    headline = next(iter(contenders))

    xi = x_u8.astype(np.int32) - x_zp
    wi = np.ascontiguousarray(w.astype(np.int32).T)
    contenders["numpy int32 matmul"] = lambda: xi @ wi
    xf = torch.from_numpy(xi.astype(np.float32))
    wf = torch.from_numpy(wi.astype(np.float32))
    contenders["torch float32 matmul"] = lambda: xf @ wf
    ort = _ort_matmul_integer(x_u8, x_zp, w, args.threads)
    if ort is not None:
        run, out = ort
        # MLAS's AVX2 u8s8 path (vpmaddubsw) saturates int16 pair sums: not exact for full-range weights
        checks.append(("onnxruntime MatMulInteger", bool(np.array_equal(out(), ref.qlinear_acc(x_u8, x_zp, w)))))
        contenders["onnxruntime MatMulInteger u8s8"] = run

    tables = [("linear 197x192 @ 192x768", contenders, headline)]

    if not args.no_attention:
        h, t, d = 3, 197, 64
        q = rng.integers(-128, 128, (h, t, d)).astype(np.int8)
        kk = rng.integers(-128, 128, (h, t, d)).astype(np.int8)
        codes = rng.integers(0, 16, (h, t, t)).astype(np.uint8)
        # the call a deit_tiny W8A8 model makes: log-sqrt(2) codes (geometric, like softmax tails), uint8 v
        sqrt2_av = dict(v_dtype="uint8", v_zp=137, base_shift=15, zero_code=255, odd_multiplier=53, frac_bits=7)
        sqrt2_codes = np.minimum(rng.geometric(0.05, (h, t, t)) - 1, 255).astype(np.uint8)
        v_u8 = rng.integers(0, 256, (h, t, d)).astype(np.uint8)
        att: dict[str, object] = {}
        for label, kern, inputs, expect in (
            ("edgeq q@k^T int8->int32", qk_kernel(h, t, t, d, target), [q, kk], ref.qmatmul_qk(q, kk)),
            ("edgeq log2 p@v 4-bit codes (shifts)", log2_av_kernel(h, t, t, d, target, zero_code=15, multiply=False),
             [codes, kk], ref.log2_av(codes, kk, 0, 15, 15)),
            ("edgeq log2 p@v 4-bit codes (int16 GEMM)", log2_av_kernel(h, t, t, d, target, zero_code=15),
             [codes, kk], ref.log2_av(codes, kk, 0, 15, 15)),
            ("edgeq log-sqrt2 p@v (deit W8A8)", log2_av_kernel(h, t, t, d, target, **sqrt2_av), [sqrt2_codes, v_u8],
             ref.log2_av(sqrt2_codes, v_u8, sqrt2_av["v_zp"], sqrt2_av["base_shift"], sqrt2_av["zero_code"],
                         sqrt2_av["odd_multiplier"], sqrt2_av["frac_bits"])),
        ):
            hk = HostKernel(kern.func, kern.name, target)
            targs = hk.prepare(inputs, kern.out_shape, kern.out_dtype)
            hk.call(targs)
            checks.append((label, bool(np.array_equal(targs[-1].numpy(), expect))))
            att[label] = lambda hk=hk, targs=targs: hk.call(targs)
        qf = torch.from_numpy(q.astype(np.float32))
        kf = torch.from_numpy(kk.astype(np.float32))
        pf = torch.softmax(torch.randn(h, t, t), dim=-1)
        att["torch float32 q@k^T"] = lambda: qf @ kf.transpose(1, 2)
        att["torch float32 p@v"] = lambda: pf @ kf
        tables.append(("attention H=3 T=197 D=64", att, "edgeq q@k^T int8->int32"))

    if not args.no_glue:
        tables.append(("float ops between kernels (deit_tiny sizes)", _glue_contenders(target, rng), None))

    print(f"host target {target}, threads {args.threads}, {args.clock} clock, "
          f"rounds {args.rounds} x {args.repeat} calls")
    print("bit-exact vs numpy reference: " + ", ".join(f"{lbl}: {'yes' if ok else 'NO'}" for lbl, ok in checks))
    for title, fns, base in tables:
        times = {label: [] for label in fns}
        for fn in fns.values():
            fn()
        for _ in range(args.rounds):
            for label, fn in fns.items():
                t0 = clock()
                for _ in range(args.repeat):
                    fn()
                times[label].append((clock() - t0) / args.repeat * 1e3)
        base_med = float(np.median(times[base])) if base else None  # glue: different ops, no common base
        print(f"\n{title}")
        print(f"{'':40s} {'median ms':>10s} {'min ms':>8s} {'x edgeq':>8s}")
        for label, ts in times.items():
            med = float(np.median(ts))
            ratio = f"{med / base_med:8.2f}" if base_med else ""
            print(f"{label:40s} {med:10.3f} {min(ts):8.3f} {ratio}")
    return 0 if all(ok for label, ok in checks if label.startswith("edgeq")) else 1


def _glue_contenders(target, rng) -> dict:
    """Each float op alone, compiled by edgeq's pipeline and run on the Relax VM, next to its torch equivalent."""
    import numpy as np
    import torch
    import tvm
    from tvm import relax

    from edgeq.lower.kernels.runner import HostKernel
    from edgeq.lower.kernels.softmax import softmax_log2_codes_kernel
    from edgeq.lower.pipeline import compile_relax

    def relax_call(shape, build):
        x = relax.Var("x", relax.TensorType(shape, "float32"))
        bb = relax.BlockBuilder()
        with bb.function("main", [x]):
            with bb.dataflow():
                out = bb.emit_output(bb.emit(build(x)))
            bb.emit_func_output(out)
        vm = relax.VirtualMachine(compile_relax(bb.get(), target), tvm.cpu())
        arg = tvm.runtime.tensor((rng.standard_normal(shape) * 3).astype(np.float32))
        return lambda: vm["main"](arg)

    gamma, beta = (relax.const(rng.standard_normal(192).astype(np.float32)) for _ in range(2))
    fns = {
        "edgeq LayerNorm + quantize 197x192": relax_call((1, 197, 192), lambda x: relax.op.quantize(
            relax.op.nn.layer_norm(x, gamma, beta, axes=[-1]), relax.const(np.float32(0.02)),
            relax.const(np.uint8(128)), axis=-1, out_dtype="uint8")),
        "edgeq Softmax 3x197x197": relax_call((1, 3, 197, 197), lambda x: relax.op.nn.softmax(x, axis=-1)),
    }
    codes = softmax_log2_codes_kernel(591, 197, target, alpha=2, log2_scale=-0.4, zero_code=255, in_dtype="int32",
                                      in_scale=1e-4)
    hk = HostKernel(codes.func, codes.name, target)
    scores = hk.prepare([rng.integers(-40000, 40000, (591, 197)).astype(np.int32)], codes.out_shape, "uint8")
    fns["edgeq Softmax -> log2 codes 3x197x197"] = lambda: hk.call(scores)
    x_ln, x_sm = torch.randn(1, 197, 192), torch.randn(1, 3, 197, 197)
    ln = torch.nn.LayerNorm(192).requires_grad_(False)
    fns["torch LayerNorm 197x192"] = lambda: ln(x_ln)
    fns["torch softmax 3x197x197"] = lambda: torch.softmax(x_sm, dim=-1)
    return fns


def _ort_matmul_integer(x_u8, x_zp, w, threads):
    """An onnxruntime session computing MatMulInteger(x, w^T) with the zero point; None if unavailable."""
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    m, k = x_u8.shape
    n = w.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w", "x_zp"], ["y"])],
        "mmi",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(w.T), "w"),
                     numpy_helper.from_array(np.array(x_zp, np.uint8), "x_zp")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"x": x_u8}
    return (lambda: sess.run(None, feed)), (lambda: sess.run(None, feed)[0])


if __name__ == "__main__":
    raise SystemExit(main())
