"""Static throughput of edgeq's ARM GEMM micro-kernels, predicted by llvm-mca (no board needed).

    python bench/arm_mca.py [--cores cortex-a72 cortex-a76] [--cases w8a8 w4a8 w4a4] [--family F] [--json OUT]

For every case (the deit_tiny-sized linear ``x[197,192] @ w[768,192]^T``, int8 activations, int8 or int4
weights; ``w4a4`` only when :func:`qlinear_kernel` takes an activation-bits parameter, else "n/a") and every core
(Cortex-A72 = Raspberry Pi 4, NEON without dot product; Cortex-A76 = Raspberry Pi 5, ``+dotprod``), the kernel's
PrimFunc is cross-compiled for that core, the innermost hot loop of the GEMM micro-kernel is cut out of the
assembly and ``llvm-mca -mtriple=aarch64-linux-gnu -mcpu=<core> -iterations=200`` predicts its cycles.

Hot loop: among the blocks that run from a label to a backward branch to that same label, with no other label
in between (one basic block, so llvm-mca's straight-line model applies), the one that performs the most
multiply-accumulates (ties: the most MAC instructions).

MACs per instruction (integer SIMD only; one MAC = one product added into a sum, whatever instruction adds it):

  =================================================  ================================  ===========================
  instructions                                        MACs                              example
  =================================================  ================================  ===========================
  smull/umull(2), smlal/umlal(2), smlsl/umlsl(2),     one per destination lane          smull v0.8h, v1.8b, v2.8b
  sqdmull(2), sqdmlal(2), sqdmlsl(2)                                                    = 8
  mul, mla, mls                                       one per destination lane          mla v0.8h, ... = 8
  sdot, udot, usdot, sudot                            4 per destination lane            sdot v0.4s, v1.16b, v2.16b
                                                                                        = 16
  smmla, ummla, usmmla (i8mm)                         32 (2x8 by 8x2 into 2x2)          smmla v0.4s, ... = 32
  sadalp, uadalp, saddlp, addp, add, saddw, ...       0: they only accumulate products
  scalar (madd, mul x..), float, loads, stores         0: address arithmetic, not the GEMM
  =================================================  ================================  ===========================

Columns:

* ``cyc/iter``: llvm-mca's Total Cycles / Iterations for the hot loop (steady state over 200 iterations);
* ``loop: dispatch, busiest cyc``: cycles per iteration the model's dispatch width needs for the loop's micro-ops,
  and the simulated pressure on its busiest resources (whichever is larger bounds the loop);
* ``MAC/cyc``: MACs per loop iteration / cyc/iter, the predicted rate of one core;
* ``peak``: the instruction-bound peak for the loop's instruction mix, derived from llvm-mca's own scheduling model,
  not hard-coded: the loop's vector arithmetic alone (its loads, stores, address arithmetic and branch removed) is
  given to llvm-mca, whose Block RThroughput is the fewest cycles its model needs to issue those instructions (the
  busiest pipe, or the dispatch width); peak = MACs per iteration / that. ``peak: dispatch, busiest cyc`` says
  which binds there (e.g. A72: ``smull`` issues only on pipe F0 = A57UnitW, one per cycle -> 8 MAC/cycle, while
  ``sadalp`` goes to F1 = A57UnitX; ``sdot`` issues on both F0 and F1 -> 32 MAC/cycle);
* ``MAC-only``: the same with the MAC instructions alone (the ceiling of that MAC instruction on this core);
* ``pred/peak``: MAC/cyc over peak, what the loads, address arithmetic and dispatch cost;

and, per core, the MAC/cycle ratio of each case to w8a8.

LLVM's scheduling model is not the board: Debian's llvm-mca 14 models both cortex-a72 and cortex-a76 with the
Cortex-A57 model (3-wide dispatch, two ASIMD pipes), which the ``model`` column shows (the resource names'
prefix). These are predictions, not board measurements.
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_lines  # noqa: E402  (bench/machine.py, beside this script)

CORE_ATTRS = {"cortex-a72": ["+neon"], "cortex-a76": ["+neon", "+dotprod"]}
# weight bits, activation bits (activations are int8 values; a4 needs a kernel parameter for it)
CASES = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}
ACTIVATION_BITS_PARAMETERS = ("x_bits", "a_bits", "act_bits")
GEMM_SHAPE = (197, 192, 768)  # deit_tiny qkv/fc1-sized: m tokens, k in-features, n out-features
ITERATIONS = 200

DOT_PRODUCT = {"sdot", "udot", "usdot", "sudot"}
MATRIX_MULTIPLY = {"smmla", "ummla", "usmmla"}
LANEWISE_PRODUCT = {"mul", "mla", "mls", "smull", "smull2", "umull", "umull2", "smlal", "smlal2", "umlal",
                    "umlal2", "smlsl", "smlsl2", "umlsl", "umlsl2", "sqdmull", "sqdmull2", "sqdmlal", "sqdmlal2",
                    "sqdmlsl", "sqdmlsl2"}
BRANCHES = {"b", "cbz", "cbnz", "tbz", "tbnz"}
LABEL = re.compile(r"^([.\w$]+):")
VECTOR_ARRANGEMENT = re.compile(r"\bv\d+\.(\d+)[bhsd]\b")
VECTOR_REGISTER = re.compile(r"\bv\d+\b")


# --------------------------------------------------------------------------------------------------
# assembly


@dataclass(frozen=True)
class Instruction:
    mnemonic: str
    operands: str

    @property
    def text(self) -> str:
        return f"{self.mnemonic}\t{self.operands}" if self.operands else self.mnemonic

    @property
    def is_branch(self) -> bool:
        return self.mnemonic in BRANCHES or self.mnemonic.startswith("b.")

    @property
    def branch_target(self) -> str | None:
        return self.operands.split(",")[-1].strip() if self.is_branch else None

    @property
    def touches_memory(self) -> bool:
        return self.mnemonic.startswith(("ld", "st", "prfm"))

    @property
    def is_vector_arithmetic(self) -> bool:
        return not self.touches_memory and not self.is_branch and bool(VECTOR_REGISTER.search(self.operands))


def parse_asm(asm: str) -> list[str | Instruction]:
    """Labels (as ``str``) and instructions in order; directives and comments dropped."""
    items: list[str | Instruction] = []
    for raw in asm.splitlines():
        line = raw.split("//", 1)[0].rstrip()
        label = LABEL.match(line)
        if label:
            items.append(label.group(1))
            line = line[label.end():]
        line = line.strip()
        if not line or line.startswith("."):
            continue
        mnemonic, *operands = line.split(None, 1)
        items.append(Instruction(mnemonic.lower(), operands[0].strip() if operands else ""))
    return items


def macs_of(instruction: Instruction) -> int:
    """Multiply-accumulates one integer SIMD instruction performs (the table in the module docstring)."""
    name = instruction.mnemonic
    if name in MATRIX_MULTIPLY:
        return 32
    if name not in DOT_PRODUCT and name not in LANEWISE_PRODUCT:
        return 0
    destination = VECTOR_ARRANGEMENT.match(instruction.operands.split(",")[0].strip())
    if destination is None:  # scalar multiply (address arithmetic)
        return 0
    lanes = int(destination.group(1))
    return 4 * lanes if name in DOT_PRODUCT else lanes


@dataclass
class HotLoop:
    label: str
    instructions: list[Instruction]

    @property
    def macs(self) -> int:
        return sum(macs_of(i) for i in self.instructions)

    @property
    def mac_instructions(self) -> int:
        return sum(1 for i in self.instructions if macs_of(i))

    def source(self, keep=lambda instruction: True) -> str:
        """Assembly text for llvm-mca: the label, then the kept instructions."""
        return f"{self.label}:\n" + "".join(f"\t{i.text}\n" for i in self.instructions if keep(i))


def hot_loop(asm: str) -> HotLoop:
    """The single-block loop (label ... backward branch to it) performing the most MACs."""
    items = parse_asm(asm)
    label_at: dict[str, int] = {}
    best: HotLoop | None = None
    for index, item in enumerate(items):
        if isinstance(item, str):
            label_at[item] = index
            continue
        start = label_at.get(item.branch_target or "")
        if start is None:  # not a branch, or a forward one
            continue
        body = items[start + 1:index + 1]
        if any(isinstance(other, str) for other in body):  # more than one block: not an innermost loop
            continue
        loop = HotLoop(items[start], body)
        if best is None or (loop.macs, loop.mac_instructions) > (best.macs, best.mac_instructions):
            best = loop
    if best is None or best.macs == 0:
        raise ValueError("no single-block loop with integer SIMD multiply-accumulates in the assembly")
    return best


# --------------------------------------------------------------------------------------------------
# llvm-mca


@dataclass
class McaReport:
    iterations: int
    total_cycles: int
    total_uops: int
    block_rthroughput: float
    dispatch_width: int
    resource_pressure: dict[str, float] = field(default_factory=dict)  # resource name -> cycles per iteration

    @property
    def cycles_per_iteration(self) -> float:
        return self.total_cycles / self.iterations

    @property
    def bound_by(self) -> str:
        """Cycles per iteration the dispatch width needs, and the busiest resources' simulated pressure."""
        dispatch = self.total_uops / self.iterations / self.dispatch_width
        top = max(self.resource_pressure.values(), default=0.0)
        busiest = "+".join(n for n, p in self.resource_pressure.items() if p >= top - 0.05) or "?"
        return f"dispatch {dispatch:.1f}, {busiest} {top:.1f}"

    @property
    def model(self) -> str:
        """The scheduling model's name as its resource names spell it (``A57UnitW`` -> ``A57``)."""
        prefix = os.path.commonprefix([n for n in self.resource_pressure])
        return prefix.split("Unit")[0] or "?"


def parse_mca(text: str) -> McaReport:
    def number(key: str) -> str:
        found = re.search(rf"^{key}:\s+([\d.]+)", text, flags=re.M)
        if not found:
            raise ValueError(f"llvm-mca output has no {key!r}")
        return found.group(1)

    names = dict(re.findall(r"^(\[[\d.]+\])\s+-\s+(\S+)", text, flags=re.M))
    pressure: dict[str, float] = {}
    table = re.search(r"Resource pressure per iteration:\n(.*)\n(.*)\n", text)
    if table:
        for column, value in zip(table.group(1).split(), table.group(2).split()):
            resource = names.get(column, column)
            pressure[resource] = pressure.get(resource, 0.0) + (0.0 if value == "-" else float(value))
    return McaReport(int(number("Iterations")), int(number("Total Cycles")), int(number("Total uOps")),
                     float(number("Block RThroughput")), int(number("Dispatch Width")), pressure)


def run_mca(tool: str, core: str, source: str, iterations: int = ITERATIONS) -> McaReport:
    result = subprocess.run([tool, "-mtriple=aarch64-linux-gnu", f"-mcpu={core}", f"-iterations={iterations}"],
                            input=source, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"llvm-mca failed for {core}: {result.stderr.strip()[:500]}")
    return parse_mca(result.stdout)


@dataclass
class LoopPrediction:
    label: str
    instructions: int
    mac_instructions: int
    macs_per_iteration: int
    cycles_per_iteration: float
    loop_bound_by: str  # what bounds the whole loop's Block RThroughput
    macs_per_cycle: float
    peak_macs_per_cycle: float  # the loop's vector arithmetic alone
    peak_bound_by: str
    mac_only_peak: float  # its MAC instructions alone
    fraction_of_peak: float
    model: str


def predict_loop(asm: str, core: str, tool: str) -> LoopPrediction:
    loop = hot_loop(asm)
    whole = run_mca(tool, core, loop.source())
    vector_mix = run_mca(tool, core, loop.source(lambda i: i.is_vector_arithmetic))
    mac_only = run_mca(tool, core, loop.source(lambda i: macs_of(i) > 0))
    macs = loop.macs
    rate, peak = macs / whole.cycles_per_iteration, macs / vector_mix.block_rthroughput
    return LoopPrediction(
        label=loop.label, instructions=len(loop.instructions), mac_instructions=loop.mac_instructions,
        macs_per_iteration=macs, cycles_per_iteration=whole.cycles_per_iteration,
        loop_bound_by=whole.bound_by, macs_per_cycle=rate, peak_macs_per_cycle=peak, peak_bound_by=vector_mix.bound_by,
        mac_only_peak=macs / mac_only.block_rthroughput, fraction_of_peak=rate / peak, model=whole.model)


# --------------------------------------------------------------------------------------------------
# kernels


def arm_target(core: str) -> dict:
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": core, "mattr": CORE_ATTRS[core]}


def activation_bits_parameter() -> str | None:
    """The name of qlinear_kernel's activation-width parameter, when the kernel API has one."""
    from edgeq.lower.kernels.qlinear import qlinear_kernel

    params = inspect.signature(qlinear_kernel).parameters
    return next((name for name in ACTIVATION_BITS_PARAMETERS if name in params), None)


def kernel_asm(case: str, core: str, family: str | None) -> tuple[str, str]:
    """(micro-kernel family, aarch64 assembly) of the case's qlinear kernel compiled for ``core``."""
    import tvm

    from edgeq.lower.kernels.qlinear import qlinear_kernel

    w_bits, a_bits = CASES[case]
    options = {"x_dtype": "int8", "w_bits": w_bits, "family": family}
    if a_bits != 8:
        options[activation_bits_parameter()] = a_bits
    target = tvm.target.Target(arm_target(core))
    kern = qlinear_kernel(*GEMM_SHAPE, target, **options)
    executable = tvm.compile(tvm.IRModule({kern.name: kern.func}), target=target)
    return kern.micro.family, executable.mod.inspect_source("asm")


# --------------------------------------------------------------------------------------------------
# report


def machine_and_tool_lines(tool: str) -> list[str]:
    """This machine's CPU model and SIMD flags, and the llvm-mca version: where and with what a prediction ran."""
    version = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False).stdout
    version_line = next((line.strip() for line in version.splitlines() if "version" in line.lower()), "unknown")
    return machine_lines() + [f"llvm-mca: {tool} ({version_line})"]


def measure(cases: list[str], cores: list[str], family: str | None, tool: str, log) -> list[dict]:
    a_parameter = activation_bits_parameter()
    rows = []
    for core in cores:
        for case in cases:
            row = {"case": case, "core": core}
            if CASES[case][1] != 8 and a_parameter is None:
                row["status"] = "n/a: qlinear_kernel has no activation-bits parameter " \
                                f"({'/'.join(ACTIVATION_BITS_PARAMETERS)})"
                rows.append(row)
                continue
            log(f"{core} {case}: compiling and running llvm-mca")
            try:
                row["family"], asm = kernel_asm(case, core, family)
                row.update(asdict(predict_loop(asm, core, tool)))
                row["status"] = "ok"
            except Exception as error:  # one failing row (e.g. a forced x86 family) must not hide the others
                row["status"] = f"error: {type(error).__name__}: {error}"
            rows.append(row)
    return rows


def ratios_to_w8a8(rows: list[dict]) -> list[dict]:
    base = {r["core"]: r for r in rows if r["case"] == "w8a8" and r["status"] == "ok"}
    return [{"core": r["core"], "case": r["case"], "over": "w8a8",
             "ratio": r["macs_per_cycle"] / base[r["core"]]["macs_per_cycle"]}
            for r in rows if r["case"] != "w8a8" and r["status"] == "ok" and r["core"] in base]


def print_table(rows: list[dict], ratios: list[dict]) -> None:
    header = ["core", "case", "family", "model", "MACs/iter", "MAC instrs/instrs", "cyc/iter",
              "loop: dispatch, busiest cyc", "MAC/cyc", "peak", "peak: dispatch, busiest cyc", "MAC-only", "pred/peak"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        if r["status"] != "ok":
            cells = [r["core"], r["case"], r["status"]] + [""] * (len(header) - 3)
        else:
            cells = [r["core"], r["case"], r["family"], r["model"], str(r["macs_per_iteration"]),
                     f"{r['mac_instructions']}/{r['instructions']}", f"{r['cycles_per_iteration']:.2f}",
                     r["loop_bound_by"], f"{r['macs_per_cycle']:.2f}", f"{r['peak_macs_per_cycle']:.2f}",
                     r["peak_bound_by"], f"{r['mac_only_peak']:.2f}", f"{r['fraction_of_peak']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    for q in ratios:
        print(f"{q['core']}: {q['case']} / {q['over']} MAC/cycle = {q['ratio']:.2f}")


# Candidate inner loops for narrow widths, written by hand: each step multiplies 8 or 16 int8 lanes and adds them
# into int16/int32 lanes, four independent accumulator chains. (label, instruction, MACs per instruction)
NARROW_LOOPS = (
    ("w8a8 today: smull + sadalp (int16 products, int32 pair sums)", (
        "smull v16.8h, v0.8b, v8.8b", "sadalp v20.4s, v16.8h", "smull v17.8h, v1.8b, v9.8b", "sadalp v21.4s, v17.8h",
        "smull v18.8h, v2.8b, v10.8b", "sadalp v22.4s, v18.8h", "smull v19.8h, v3.8b, v11.8b",
        "sadalp v23.4s, v19.8h"), 32),
    ("w4a8: smlal/smlal2 into int16 lanes (|w*x| <= 1024: 31 steps before widening)", (
        "smlal v16.8h, v0.8b, v8.8b", "smlal2 v17.8h, v0.16b, v8.16b", "smlal v18.8h, v1.8b, v9.8b",
        "smlal2 v19.8h, v1.16b, v9.16b", "smlal v20.8h, v2.8b, v10.8b", "smlal2 v21.8h, v2.16b, v10.16b",
        "smlal v22.8h, v3.8b, v11.8b", "smlal2 v23.8h, v3.16b, v11.16b"), 64),
    ("w4a4: tbl product tables (|w*x| <= 120 fits int8) + sadalp into int16", (
        "tbl v16.16b, {v0.16b}, v8.16b", "sadalp v20.8h, v16.16b", "tbl v17.16b, {v2.16b}, v9.16b",
        "sadalp v21.8h, v17.16b", "tbl v18.16b, {v4.16b}, v10.16b", "sadalp v22.8h, v18.16b",
        "tbl v19.16b, {v6.16b}, v11.16b", "sadalp v23.8h, v19.16b"), 64),
)


def print_narrow_loops(tool: str, cores: list[str]) -> None:
    """MAC/cycle llvm-mca predicts for NARROW_LOOPS: whether a narrow width can buy time on these cores."""
    print("| core | loop | model | cycles/iter | MAC/cycle |")
    print("|---|---|---|---|---|")
    for core in cores:
        for label, body, macs in NARROW_LOOPS:
            report = run_mca(tool, core, "\n".join(body) + "\n")
            print(f"| {core} | {label} | {report.model} | {report.cycles_per_iteration:.2f} | "
                  f"{macs / report.cycles_per_iteration:.2f} |")


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT))
    from edgeq.lower.kernels.micro import MICROKERNELS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cores", nargs="+", choices=sorted(CORE_ATTRS), default=list(CORE_ATTRS))
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    # other ISAs' families (x86_*, cuda) make LLVM abort on an aarch64 target: not offered
    aarch64_families = sorted(f for f in MICROKERNELS if not f.startswith(("x86", "cuda")))
    ap.add_argument("--family", choices=aarch64_families, help="force this micro-kernel family on every core")
    ap.add_argument("--llvm-mca", default=os.environ.get("LLVM_MCA", "llvm-mca"), help="llvm-mca executable")
    ap.add_argument("--json", type=Path, metavar="OUT", help="also write the machine, rows and ratios here")
    ap.add_argument("--narrow-loops", action="store_true",
                    help="instead: llvm-mca on hand-written int16-accumulation and table-lookup loops")
    args = ap.parse_args(argv)
    tool = shutil.which(args.llvm_mca)
    if tool is None:
        ap.error(f"{args.llvm_mca} not found (Debian package llvm: deploy/install-host-tools.sh installs it)")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    machine = machine_and_tool_lines(tool)
    print("\n".join(machine))
    if args.narrow_loops:
        print_narrow_loops(tool, args.cores)
        return 0
    print(f"qlinear {GEMM_SHAPE[0]}x{GEMM_SHAPE[1]}x{GEMM_SHAPE[2]}, int8 activations; llvm-mca -iterations="
          f"{ITERATIONS} on the GEMM micro-kernel's hot loop (a prediction, not a board measurement)")
    rows = measure(args.cases, args.cores, args.family, tool, log)
    ratios = ratios_to_w8a8(rows)
    print_table(rows, ratios)
    if args.json:
        from edgeq.fileio import atomic_write_json

        atomic_write_json(args.json, {"machine": machine, "shape": list(GEMM_SHAPE), "iterations": ITERATIONS,
                                      "family": args.family, "rows": rows, "ratios": ratios})
    return 1 if any(r["status"].startswith("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
