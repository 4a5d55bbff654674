"""CPU detection: this machine's /proc/cpuinfo, faked flag sets, and sources that are missing."""

from pathlib import Path

import pytest

from clipserve import cpu

AVX2_EPYC = "fpu vme sse sse2 fma avx avx2 bmi2"  # the earlier benchmark machine: no VNNI
AVX512_NO_AMX = AVX2_EPYC + " avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx512ifma"
SAPPHIRE = AVX512_NO_AMX + " avx512_fp16 amx_tile amx_bf16 amx_int8 avx_vnni"


def cpuinfo_text(flags: str, model: str = "Test CPU") -> str:
    block = f"processor\t: {{}}\nvendor_id\t: X\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"
    return block.format(0) + block.format(1)


def test_this_machine_is_read_and_consistent():
    info = cpu.detect()
    assert info.cores >= 1 and info.model
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    reported = set(line.partition(":")[2].split())
    assert info.flags == frozenset(reported) & frozenset(cpu.KNOWN_FLAGS)
    assert info.needs_reduce_range == (not {"avx512_vnni", "avx_vnni", "amx_int8"} & reported)
    assert info.bf16_native == bool({"avx512_bf16", "amx_bf16"} & reported)
    assert info.model in info.describe() and f"{info.cores} cores" in info.describe()
    assert info.as_dict()["flags"] == sorted(info.flags)


@pytest.mark.parametrize("flags, isa, vnni, bf16, amx", [
    (AVX2_EPYC, "avx2", False, False, False),
    (AVX512_NO_AMX, "avx512", True, True, False),
    (SAPPHIRE, "amx", True, True, True),
    ("fpu sse sse2", "baseline", False, False, False),
    ("avx2 fma avx_vnni", "avx2", True, False, False),  # Alder Lake: VNNI without AVX-512
])
def test_faked_flag_sets(tmp_path, flags, isa, vnni, bf16, amx):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo_text(flags))
    info = cpu.detect(path, cgroup_root=tmp_path)
    assert (info.model, info.isa(), info.vnni, info.bf16_native, info.amx) == (
        "Test CPU", isa, vnni, bf16, amx)
    assert info.needs_reduce_range is (not vnni)
    assert ("bf16: native" if bf16 else "bf16: emulated") in info.describe()
    assert ("AMX-BF16 tiles" in info.describe()) is amx
    assert ("int8: AMX-INT8 tiles" in info.describe()) is amx
    assert info == cpu.detect(path, cgroup_root=tmp_path)
    assert cpu.from_flags(flags.split(), model="Test CPU", cores=info.cores) == info


def test_missing_sources_never_raise(tmp_path):
    info = cpu.detect(tmp_path / "absent", cgroup_root=tmp_path / "absent")
    assert info.flags == frozenset() and info.model and info.cores >= 1
    assert info.needs_reduce_range and not info.bf16_native
    assert "no flags read" in info.describe()
    assert cpu.parse_cpuinfo("garbage\n\0\xff: :\n") == (None, frozenset())


def test_arm_features_line_is_read(tmp_path):
    # aarch64 kernels say "Features" and have no model name: flags empty of x86 ones, model
    # falls back to platform's answer.
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    info = cpu.detect(path, cgroup_root=tmp_path)
    assert info.flags == frozenset() and info.model


@pytest.mark.parametrize("files, want", [
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs of quota round up to 2
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"}, 1),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
])
def test_cgroup_quota_caps_cores(tmp_path, files, want):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    unlimited = cpu.available_cores(tmp_path / "none")
    got = cpu.available_cores(tmp_path)
    assert got == (unlimited if want is None else min(unlimited, want))
