"""bench/arm_mca.py: MAC counting and hot-loop extraction on hand-written aarch64 assembly, and an llvm-mca
prediction for the Cortex-A72 W8A8 GEMM kernel (skipped when llvm-mca is not installed)."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from edgeq.lower.kernels.micro import MICROKERNELS

BENCH = Path(__file__).resolve().parents[1] / "bench" / "arm_mca.py"
_spec = importlib.util.spec_from_file_location("edgeq_bench_arm_mca", BENCH)
arm_mca = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = arm_mca  # dataclasses look their module up while the file is executed
_spec.loader.exec_module(arm_mca)

LLVM_MCA = shutil.which("llvm-mca")

# an outer tile loop around an inner k loop: the inner one is the hot loop; the epilogue's 32-bit smull and
# the scalar madd sit outside it
NESTED_LOOPS = """\
func:
\tmov\tx9, #0
.LBB0_1:
\tmovi\tv0.2d, #0000000000000000
\tmov\tw14, #96
\t.p2align\t4, , 8
.LBB0_2:                               // %for_body
\tld1r\t{ v28.4h }, [x15], #2
\tldp\td27, d24, [x13], #16
\tsmull\tv30.8h, v28.8b, v27.8b
\tsadalp\tv0.4s, v30.8h
\tsmull2\tv31.8h, v28.16b, v24.16b
\tsadalp\tv1.4s, v31.8h
\tsdot\tv2.4s, v28.16b, v24.16b
\tmla\tv3.8h, v28.8h, v24.8h
\tsmlal\tv4.4s, v28.4h, v24.h[1]
\tmadd\tx1, x2, x3, x4
\tsubs\tx14, x14, #1
\tb.ne\t.LBB0_2
\tsmull2\tv22.2d, v24.4s, v5.4s
\tadd\tx9, x9, #1
\tcmp\tx9, #4
\tb.ne\t.LBB0_1
\tret
"""


def test_macs_per_instruction():
    macs = {i.text: arm_mca.macs_of(i) for i in arm_mca.parse_asm(NESTED_LOOPS) if isinstance(i, arm_mca.Instruction)}
    assert macs["smull\tv30.8h, v28.8b, v27.8b"] == 8
    assert macs["smull2\tv31.8h, v28.16b, v24.16b"] == 8
    assert macs["sadalp\tv0.4s, v30.8h"] == 0  # accumulates products, multiplies nothing
    assert macs["sdot\tv2.4s, v28.16b, v24.16b"] == 16
    assert macs["mla\tv3.8h, v28.8h, v24.8h"] == 8
    assert macs["smlal\tv4.4s, v28.4h, v24.h[1]"] == 4
    assert macs["smull2\tv22.2d, v24.4s, v5.4s"] == 2
    assert macs["madd\tx1, x2, x3, x4"] == 0  # scalar: address arithmetic
    assert macs["ld1r\t{ v28.4h }, [x15], #2"] == 0


def test_hot_loop_is_the_innermost_mac_loop():
    loop = arm_mca.hot_loop(NESTED_LOOPS)
    assert loop.label == ".LBB0_2"
    assert loop.macs == 8 + 8 + 16 + 8 + 4
    assert loop.mac_instructions == 5
    assert loop.instructions[-1].text == "b.ne\t.LBB0_2"
    # llvm-mca's input: the label, then the body without directives or comments
    assert loop.source().startswith(".LBB0_2:\n\tld1r")
    vector_only = loop.source(lambda i: i.is_vector_arithmetic)
    assert "ld1r" not in vector_only and "madd" not in vector_only and "b.ne" not in vector_only
    assert "sadalp" in vector_only


def test_no_mac_loop_is_an_error():
    with pytest.raises(ValueError, match="no single-block loop"):
        arm_mca.hot_loop(".L1:\n\tadd\tx0, x0, #1\n\tb.ne\t.L1\n")


@pytest.mark.skipif(LLVM_MCA is None, reason="llvm-mca missing: run deploy/install-host-tools.sh (Debian package llvm)")
def test_a72_w8a8_prediction_is_plausible():
    family, asm = arm_mca.kernel_asm("w8a8", "cortex-a72", None)
    assert family == "arm_neon"
    prediction = arm_mca.predict_loop(asm, "cortex-a72", LLVM_MCA)
    micro = MICROKERNELS[family]
    # one k-group step of the register tile: mr rows x nb channels x kg products
    assert prediction.macs_per_iteration == micro.mr * micro.nb * micro.kg
    assert prediction.cycles_per_iteration > 0
    assert 0 < prediction.macs_per_cycle <= prediction.peak_macs_per_cycle <= prediction.mac_only_peak
    assert 0.1 < prediction.fraction_of_peak <= 1.0


@pytest.mark.skipif(LLVM_MCA is None, reason="llvm-mca missing: run deploy/install-host-tools.sh (Debian package llvm)")
def test_narrow_loops_are_predicted(capsys):
    """Each hand-written narrow-width loop assembles and gets a MAC/cycle within the A72 model's NEON limits."""
    arm_mca.print_narrow_loops(LLVM_MCA, ["cortex-a72"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cortex-a72")]
    assert len(rows) == len(arm_mca.NARROW_LOOPS)
    for row in rows:
        macs_per_cycle = float(row.rstrip(" |").rsplit("|", 1)[1])
        assert 2.0 < macs_per_cycle <= 16.0
