"""The CPU this process runs on: model name, usable cores and the instruction-set flags that
decide which numeric recipes pay off (VNNI for int8, AVX-512 BF16 / AMX for bf16).

Read from Linux's ``/proc/cpuinfo`` and the process's CPU affinity and cgroup quota. Where those
are missing (another OS, a sandbox) the flags are an empty set and the model name comes from
:mod:`platform`: nothing here raises, and nothing downstream may assume one CPU.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

# The flags clipserve's choices look at, as Linux spells them in /proc/cpuinfo.
KNOWN_FLAGS = ("fma", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
               "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    """What :func:`detect` found.

    Attributes:
        model: the CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8480+"), or
            platform.processor() / "unknown" where /proc/cpuinfo is not readable.
        cores: CPUs this process may use (affinity mask, capped by a cgroup CPU quota).
        flags: the subset of :data:`KNOWN_FLAGS` the CPU reports.
    """

    model: str
    cores: int
    flags: frozenset[str]

    @property
    def vnni(self) -> bool:
        """int8 dot products with 32-bit accumulation (AVX512_VNNI, AVX_VNNI, or AMX-INT8)."""
        return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})

    @property
    def needs_reduce_range(self) -> bool:
        """Whether int8 weights should use 7 bits (ORT ``reduce_range``): without VNNI, u8 x s8
        products go through VPMADDUBSW, whose int16 pair sums saturate with full-range
        weights. With VNNI (or AMX) they accumulate in int32 and the 8th bit is free accuracy."""
        return not self.vnni

    @property
    def bf16_native(self) -> bool:
        """Whether bfloat16 matmuls run in hardware (AVX512_BF16 or AMX-BF16); elsewhere a
        runtime emulates them through float32 conversions, slower than plain fp32."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    @property
    def amx(self) -> bool:
        """Intel AMX tile matmuls (bf16 and int8 tiles)."""
        return {"amx_tile", "amx_bf16", "amx_int8"} <= self.flags

    def isa(self) -> str:
        """The widest SIMD level: "amx", "avx512", "avx2" or "baseline"."""
        if self.amx:
            return "amx"
        if "avx512f" in self.flags:
            return "avx512"
        return "avx2" if "avx2" in self.flags else "baseline"

    def describe(self) -> str:
        """One line for logs and report headers, e.g. ``AMD EPYC, 2 cores, avx512 (avx2
        avx512_bf16 avx512_vnni ...); int8: VNNI, bf16: native``."""
        flags = " ".join(sorted(self.flags)) or "no flags read"
        int8 = "VNNI" if self.vnni else "no VNNI (reduce_range)"
        if "amx_int8" in self.flags:
            int8 = "AMX-INT8 tiles + VNNI"
        bf16 = "native" if self.bf16_native else "emulated"
        if "amx_bf16" in self.flags:
            bf16 = "native (AMX-BF16 tiles)"
        return (f"{self.model}, {self.cores} cores, {self.isa()} ({flags}); int8: {int8}, "
                f"bf16: {bf16}")

    def as_dict(self) -> dict:
        """JSON-ready form for sidecars and benchmark files."""
        return {"model": self.model, "cores": self.cores, "flags": sorted(self.flags),
                "isa": self.isa(), "vnni": self.vnni, "bf16_native": self.bf16_native,
                "amx": self.amx, "needs_reduce_range": self.needs_reduce_range}


def parse_cpuinfo(text: str) -> tuple[str | None, frozenset[str]]:
    """Model name and known flags from /proc/cpuinfo text (the first processor's; x86 says
    ``flags``, some kernels ``Features``). Missing fields give (None, empty set)."""
    model, flags = None, frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip() or None
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split()) & frozenset(KNOWN_FLAGS)
    return model, flags


def _cgroup_quota_cores(root: Path) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us`` (None: no limit)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process can use: the affinity mask (or os.cpu_count()), capped by a cgroup
    quota rounded up; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota_cores(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def detect(cpuinfo: Path = Path("/proc/cpuinfo"), cgroup_root: Path = Path("/sys/fs/cgroup")
           ) -> CpuInfo:
    """The CPU of this machine (never raises; unreadable sources give empty flags)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    model, flags = parse_cpuinfo(text)
    model = model or platform.processor() or platform.machine() or "unknown"
    return CpuInfo(model=model, cores=available_cores(cgroup_root), flags=flags)


def from_flags(flags, model: str = "faked", cores: int = 1) -> CpuInfo:
    """A CpuInfo with the given flags (tests, and reasoning about another machine)."""
    return CpuInfo(model=model, cores=cores, flags=frozenset(flags) & frozenset(KNOWN_FLAGS))
