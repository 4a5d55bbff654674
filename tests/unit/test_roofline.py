"""Per-precision peaks computed from CPU flags, core count and clock (no timing: arithmetic on
faked flag sets, so each ISA's assumption is pinned)."""

import pytest

from clipserve import cpu
from clipserve.loadtest import roofline

SPR = ["fma", "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
       "amx_bf16", "amx_int8"]
CPL = ["fma", "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"]  # no AMX
ICL = ["fma", "avx2", "avx512f", "avx512bw", "avx512_vnni"]                 # no BF16
ADL = ["fma", "avx2", "avx_vnni"]                                           # AVX2 + VNNI
ZEN2 = ["fma", "avx2"]                                                      # the EPYC's


@pytest.mark.parametrize("flags, fp32, bf16, int8", [
    # 2 cores x 2.0 GHz x fp32 FLOP/cycle (16 lanes x 2 x 2 ports = 64 with AVX-512) x factor.
    (SPR, 256, 256 * 16, 256 * 32),   # AMX: 1024 bf16 FLOP, 2048 int8 op per cycle per core
    (CPL, 256, 256 * 2, 256 * 4),     # VDPBF16PS 2x, VPDPBUSD 4x
    (ICL, 256, 256, 256 * 4),         # bf16 emulated: fp32's peak
    (ADL, 128, 128, 128 * 4),         # 8 lanes; VNNI on ymm still 4x its fp32
    (ZEN2, 128, 128, 128 * 2),        # no VNNI: VPMADDUBSW/VPMADDWD about 2x
    ([], 32, 32, 64),                 # no AVX/FMA flags read: SSE mul + add
])
def test_analytic_peaks_follow_flags_cores_and_clock(flags, fp32, bf16, int8):
    peaks = roofline.analytic_peaks(cpu.from_flags(flags, cores=2), 2.0)
    assert peaks["fp32"]["gflops"] == pytest.approx(fp32)
    assert peaks["bf16"]["gflops"] == pytest.approx(bf16)
    assert peaks["int8"]["gflops"] == pytest.approx(int8)
    assert peaks["int4"]["gflops"] == peaks["int8"]["gflops"]  # int8 activations
    assert peaks["fp16"]["gflops"] == peaks["fp32"]["gflops"]  # computed in fp32 on CPUs
    assert "2 cores x 2.00 GHz" in peaks["fp32"]["assumes"]


def test_analytic_peaks_scale_with_cores_and_ports():
    one = roofline.analytic_peaks(cpu.from_flags(CPL, cores=1), 3.0)
    four = roofline.analytic_peaks(cpu.from_flags(CPL, cores=4), 3.0)
    assert four["int8"]["gflops"] == pytest.approx(4 * one["int8"]["gflops"])
    one_port = roofline.analytic_peaks(cpu.from_flags(CPL, cores=1), 3.0, fma_ports=1)
    assert one_port["bf16"]["gflops"] == pytest.approx(one["bf16"]["gflops"] / 2)
    assert one["bf16"]["assumes"].startswith("AVX512_BF16")


def test_no_clock_gives_no_analytic_peaks():
    assert roofline.analytic_peaks(cpu.from_flags(SPR, cores=2), None) == {}
    assert roofline.analytic_peaks(cpu.from_flags(SPR, cores=2), 0.0) == {}


def test_clock_is_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Fake\ncpu MHz\t\t: 2300.000\nflags\t: fma\n"
                    "processor\t: 1\ncpu MHz\t\t: 1200.000\n")
    assert roofline.clock_ghz(info) == pytest.approx(2.3)
    info.write_text("processor\t: 0\nFeatures\t: neon\n")
    assert roofline.clock_ghz(info) is None
    assert roofline.clock_ghz(tmp_path / "missing") is None
