"""Run aarch64 builds of the kernels on an x86 host under ``qemu-aarch64`` to check them bit for bit.

No aarch64 Python or TVM runtime is needed: the kernel is exported as an aarch64 shared library with the
cross compiler, and a small C harness (below, compiled with the same cross compiler) ``dlopen``s it,
supplies the few TVM backend hooks a CPU kernel calls (workspace allocation, a *sequential* parallel
launch, error reporting), builds ``DLTensor`` arguments from files and calls the ``__tvm_ffi_<name>``
entry point with the tvm-ffi C calling convention. Needs the Debian packages ``gcc-aarch64-linux-gnu``
(with its ``/usr/aarch64-linux-gnu`` sysroot) and ``qemu-user``. Emulated timings mean nothing.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import tvm

__all__ = ["aarch64_tools", "aarch64_available", "run_aarch64"]

SYSROOT = "/usr/aarch64-linux-gnu"

_HARNESS_C = r"""
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct { int32_t device_type, device_id; } Device;
typedef struct { uint8_t code, bits; uint16_t lanes; } DType;
typedef struct {
  void* data; Device device; int32_t ndim; DType dtype;
  int64_t* shape; int64_t* strides; uint64_t byte_offset;
} Tensor;                                       /* DLTensor */
typedef struct { int32_t type_index; uint32_t pad; union { int64_t i; void* p; } v; } Any;  /* TVMFFIAny */
typedef struct { void* sync_handle; int32_t num_task; } GroupEnv;   /* TVMParallelGroupEnv */
typedef int (*Lambda)(int task_id, GroupEnv* penv, void* cdata);
typedef int (*SafeCall)(void* handle, const Any* args, int32_t num_args, Any* result);

static void* alloc_ws(int dt, int di, uint64_t n, int c, int b) { (void)dt; (void)di; (void)c; (void)b;
  void* p = NULL; if (posix_memalign(&p, 64, n ? n : 1)) return NULL; return p; }
static int free_ws(int dt, int di, void* p) { (void)dt; (void)di; free(p); return 0; }
static int launch(Lambda f, void* cdata, int num_task) {
  GroupEnv env; env.sync_handle = NULL; env.num_task = num_task > 0 ? num_task : 3;
  for (int i = 0; i < env.num_task; ++i) { int rc = f(i, &env, cdata); if (rc) return rc; }
  return 0;
}
static int barrier(int task_id, GroupEnv* penv) { (void)task_id; (void)penv; return 0; }
void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  fprintf(stderr, "kernel error %s:", kind); for (int i = 0; i < n; ++i) fprintf(stderr, " %s", parts[i]);
  fprintf(stderr, "\n");
}
void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* msg) { fprintf(stderr, "kernel error %s: %s\n", kind, msg); }

static void set_hook(void* lib, const char* name, void* fn) { void** slot = (void**)dlsym(lib, name); if (slot) *slot = fn; }

int main(int argc, char** argv) {
  if (argc != 4) { fprintf(stderr, "usage: harness LIB FUNC SPEC\n"); return 2; }
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
  if (!lib) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 3; }
  set_hook(lib, "__TVMBackendAllocWorkspace", (void*)alloc_ws);
  set_hook(lib, "__TVMBackendFreeWorkspace", (void*)free_ws);
  set_hook(lib, "__TVMBackendParallelLaunch", (void*)launch);
  set_hook(lib, "__TVMBackendParallelBarrier", (void*)barrier);
  char sym[512]; snprintf(sym, sizeof sym, "__tvm_ffi_%s", argv[2]);
  SafeCall fn = (SafeCall)dlsym(lib, sym);
  if (!fn) { fprintf(stderr, "no symbol %s\n", sym); return 4; }
  FILE* spec = fopen(argv[3], "r"); if (!spec) return 5;
  int nargs; if (fscanf(spec, "%d", &nargs) != 1) return 5;
  Tensor* ts = calloc(nargs, sizeof(Tensor)); Any* args = calloc(nargs, sizeof(Any));
  char (*paths)[1024] = calloc(nargs, 1024); int* is_out = calloc(nargs, sizeof(int)); size_t* sizes = calloc(nargs, sizeof(size_t));
  for (int a = 0; a < nargs; ++a) {
    int code, bits, ndim; if (fscanf(spec, "%d %d %d %d", &is_out[a], &code, &bits, &ndim) != 4) return 6;
    ts[a].ndim = ndim; ts[a].shape = calloc(ndim > 0 ? ndim : 1, sizeof(int64_t));
    size_t count = 1;
    for (int d = 0; d < ndim; ++d) { long long s; if (fscanf(spec, "%lld", &s) != 1) return 6; ts[a].shape[d] = s; count *= (size_t)s; }
    if (fscanf(spec, "%1023s", paths[a]) != 1) return 6;
    ts[a].dtype.code = (uint8_t)code; ts[a].dtype.bits = (uint8_t)bits; ts[a].dtype.lanes = 1;
    ts[a].device.device_type = 1;  /* kDLCPU */
    sizes[a] = count * (size_t)bits / 8;
    void* p = NULL; if (posix_memalign(&p, 64, sizes[a] ? sizes[a] : 1)) return 7; memset(p, 0, sizes[a]);
    ts[a].data = p;
    if (!is_out[a]) { FILE* f = fopen(paths[a], "rb"); if (!f || fread(p, 1, sizes[a], f) != sizes[a]) return 8; fclose(f); }
    args[a].type_index = 7;  /* kTVMFFIDLTensorPtr */
    args[a].v.p = &ts[a];
  }
  Any result; memset(&result, 0, sizeof result);
  int rc = fn(NULL, args, nargs, &result);
  if (rc) { fprintf(stderr, "kernel returned %d\n", rc); return 9; }
  for (int a = 0; a < nargs; ++a) if (is_out[a]) {
    FILE* f = fopen(paths[a], "wb"); if (!f || fwrite(ts[a].data, 1, sizes[a], f) != sizes[a]) return 10; fclose(f);
  }
  return 0;
}
"""

_DLPACK_CODES = {"i": 0, "u": 1, "f": 2}


def aarch64_tools() -> dict[str, str | None]:
    return {"gcc": shutil.which("aarch64-linux-gnu-gcc"), "qemu": shutil.which("qemu-aarch64"),
            "sysroot": SYSROOT if os.path.isdir(SYSROOT) else None}


def aarch64_available() -> bool:
    return all(aarch64_tools().values())


def _harness(workdir: Path) -> Path:
    digest = hashlib.sha256(_HARNESS_C.encode()).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / f"edgeq-aarch64-harness-{digest}"
    if not cache.exists():
        src = workdir / "harness.c"
        src.write_text(_HARNESS_C)
        tmp = workdir / "harness"
        subprocess.run([aarch64_tools()["gcc"], "-O1", "-rdynamic", "-o", str(tmp), str(src), "-ldl"],
                       check=True, capture_output=True, text=True)
        shutil.copy(tmp, cache)
    return cache


def run_aarch64(func: tvm.tirx.PrimFunc, name: str, target, inputs: list[np.ndarray], out_shape,
                out_dtype: str, qemu_cpu: str = "max", timeout: float = 300,
                tir_pipeline: str = "default") -> np.ndarray:
    """Compile ``func`` for an aarch64 ``target`` (with ``tir_pipeline``), run it under qemu on ``inputs``, return
    the output."""
    from tvm.support import cc

    tools = aarch64_tools()
    if not all(tools.values()):
        raise RuntimeError(f"aarch64 cross compiler, qemu-aarch64 or sysroot missing: {tools}")
    with tempfile.TemporaryDirectory(prefix="edgeq-a64-") as tmp:
        work = Path(tmp)
        lib = tvm.compile(tvm.IRModule({name: func}), target=target, tir_pipeline=tir_pipeline)
        so = work / "kernel.so"
        lib.export_library(str(so), fcompile=cc.cross_compiler(tools["gcc"]))
        lines = [str(len(inputs) + 1)]
        arrays = [np.ascontiguousarray(a) for a in inputs]
        for i, arr in enumerate(arrays):
            path = work / f"in{i}.bin"
            arr.tofile(path)
            dt = arr.dtype
            lines.append(f"0 {_DLPACK_CODES[dt.kind]} {dt.itemsize * 8} {arr.ndim} "
                         + " ".join(str(s) for s in arr.shape) + f" {path}")
        odt = np.dtype(out_dtype)
        out_path = work / "out.bin"
        lines.append(f"1 {_DLPACK_CODES[odt.kind]} {odt.itemsize * 8} {len(out_shape)} "
                     + " ".join(str(s) for s in out_shape) + f" {out_path}")
        spec = work / "spec.txt"
        spec.write_text("\n".join(lines) + "\n")
        cmd = [tools["qemu"], "-cpu", qemu_cpu, "-L", tools["sysroot"], str(_harness(work)), str(so), name, str(spec)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"aarch64 run failed ({proc.returncode}): {proc.stderr.strip()}")
        return np.fromfile(out_path, dtype=odt).reshape(out_shape)
