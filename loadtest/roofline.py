"""The roofline: how much arithmetic an image costs, and how much this machine can do.

:func:`onnx_flops` counts the multiply-adds of a tower's ONNX graph (MatMul, Gemm, Conv,
Einsum-free graphs as clipserve exports them) from shapes inferred at batch 1; each
multiply-add is two FLOPs. Element-wise work (LayerNorm, GELU, softmax, adds) is left out: it
is a few percent of a ViT's FLOPs and memory-bound anyway. :func:`attainable_gflops` times a
large float32 matmul through numpy's BLAS, the best case for dense math on these cores.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def _dims(value_info) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None
            for d in value_info.type.tensor_type.shape.dim]


def onnx_flops(path: Path, batch: int = 1) -> dict:
    """FLOPs of one forward pass at ``batch`` (default 1 item), by op type.

    Args:
        path: an ONNX model; external weight data need not be present (only shapes are read).
        batch: value given to every symbolic input dimension.

    Returns:
        {"total": int, "by_op": {"MatMul": int, ...}, "uncounted": [node names whose shapes
        stayed unknown]}.

    Raises:
        ValueError: the file cannot be read as ONNX.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ValueError(f"cannot read ONNX model {path}: {exc}") from exc
    for graph_input in model.graph.input:
        for dim in graph_input.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = batch
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int | None]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        shapes[vi.name] = _dims(vi)
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)

    by_op: dict[str, int] = {}
    uncounted: list[str] = []
    for node in inferred.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv", "MatMulInteger", "QLinearMatMul",
                                "MatMulNBits", "ConvInteger", "QLinearConv"):
            continue
        flops = _node_flops(node, shapes)
        if flops is None:
            uncounted.append(node.name or node.op_type)
            continue
        by_op[node.op_type] = by_op.get(node.op_type, 0) + flops
    return {"total": sum(by_op.values()), "by_op": by_op, "uncounted": uncounted}


def _known(shape) -> bool:
    return shape is not None and all(d is not None and d > 0 for d in shape)


def _node_flops(node, shapes) -> int | None:
    out = shapes.get(node.output[0])
    if not _known(out):
        return None
    if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
        weight = shapes.get(node.input[3 if node.op_type == "QLinearConv" else 1])
        if not _known(weight):
            return None
        # weight [C_out, C_in/groups, kH, kW]: each output element is C_in/groups*kH*kW MACs.
        return 2 * int(np.prod(out)) * int(np.prod(weight[1:]))
    a = shapes.get(node.input[0])
    if not _known(a):
        return None
    k = a[-1]
    if node.op_type == "Gemm":
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        k = a[0] if trans_a else a[-1]
    return 2 * int(np.prod(out)) * int(k)


def attainable_gflops(n: int = 2048, seconds: float = 2.0, repeats: int = 3) -> float:
    """Best float32 GFLOP/s of an n x n matmul (numpy's BLAS, all its threads), over
    ``repeats`` timed rounds of about ``seconds / repeats`` each."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm up threads and caches
    best = 0.0
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while True:
            a @ b
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / repeats:
                break
        best = max(best, 2.0 * n ** 3 * count / elapsed / 1e9)
    return best


def vit_image_flops(image_size: int, patch: int, width: int, layers: int, embed_dim: int) -> int:
    """Analytic matmul FLOPs of a CLIP ViT image tower at batch 1, to check :func:`onnx_flops`:
    patch embedding, per layer QKV/out projections, attention scores and weighted sums, the MLP
    (4x width), and the output projection of the class token."""
    tokens = (image_size // patch) ** 2 + 1
    patch_embed = 2 * (tokens - 1) * width * 3 * patch * patch
    per_layer = (2 * tokens * width * 3 * width      # QKV
                 + 2 * tokens * tokens * width * 2    # scores and weighted sum
                 + 2 * tokens * width * width         # out projection
                 + 2 * tokens * width * 4 * width * 2)  # MLP up and down
    return patch_embed + layers * per_layer + 2 * width * embed_dim


# Peak arithmetic of each precision relative to the float32 FMA peak of the same cores, from
# what one instruction does per 32-bit lane (the measured float32 matmul stands in for that
# peak; numpy's BLAS gets within a few percent of it on large squares):
# - AVX512_BF16 VDPBF16PS: 2 bf16 products accumulated per float32 lane -> 2x.
# - VNNI VPDPBUSD (AVX512_VNNI / AVX_VNNI): 4 u8 x s8 products per int32 lane -> 4x.
# - int8 without VNNI: VPMADDUBSW + VPMADDWD (+ add), about 2x at best.
# - AMX (per core per cycle, Intel's figures: 1024 bf16 FLOPs through TDPBF16PS, 2048 int8 ops
#   through TDPBSSD, against 64 fp32 FLOPs of two AVX-512 FMA ports) -> bf16 16x, int8 32x of
#   the AVX-512 float32 peak.
# fp16 computes in float32 on CPUs (its weights are converted), so its peak is fp32's; int4
# (MatMulNBits, accuracy level 4) multiplies int8-quantized activations, so its peak is int8's.
# These are upper bounds; memory bandwidth and the non-matmul ops keep real graphs below them.
def precision_peak_factors(cpu) -> dict[str, tuple[float, str]]:
    """{precision: (factor over the float32 peak, the instruction it assumes)} for
    :class:`clipserve.cpu.CpuInfo` ``cpu``; see the table above."""
    if cpu.amx:
        bf16, int8 = (16.0, "AMX TDPBF16PS"), (32.0, "AMX TDPBSSD")
    else:
        bf16 = (2.0, "AVX512_BF16 VDPBF16PS") if cpu.bf16_native else (1.0, "emulated in fp32")
        int8 = (4.0, "VNNI VPDPBUSD") if cpu.vnni else (2.0, "VPMADDUBSW/VPMADDWD (no VNNI)")
    return {"fp32": (1.0, "fp32 FMA (measured matmul)"), "fp16": (1.0, "computed in fp32"),
            "bf16": bf16, "int8": int8, "int4": (int8[0], int8[1] + " on int8 activations")}


def precision_peaks(cpu, fp32_gflops: float) -> dict[str, dict]:
    """Attainable G(FL)OP/s per precision: the measured float32 matmul times
    :func:`precision_peak_factors`. Returns {precision: {"gflops", "factor", "assumes"}}."""
    return {p: {"gflops": round(fp32_gflops * f, 2), "factor": f, "assumes": why}
            for p, (f, why) in precision_peak_factors(cpu).items()}


# float32 FLOPs per cycle per core of the widest FMA the flags show, assuming two FMA ports (most
# server cores since Haswell/Skylake-SP; a one-port AVX-512 part halves it): lanes x 2 (an FMA is
# a multiply and an add) x ports.
FMA_PORTS = 2


def fp32_flops_per_cycle(cpu, fma_ports: int = FMA_PORTS) -> tuple[int, str]:
    """(float32 FLOPs per cycle per core, the instructions assumed) for the CPU's flags."""
    if "avx512f" in cpu.flags:
        lanes, isa = 16, "AVX-512 FMA"
    elif "fma" in cpu.flags and "avx2" in cpu.flags:
        lanes, isa = 8, "AVX2 FMA"
    else:
        return 4 * fma_ports, f"SSE mul+add, {fma_ports} ports"  # no FMA: a mul and an add port
    return lanes * 2 * fma_ports, f"{isa} x {fma_ports} ports"


def clock_ghz(cpuinfo: Path = Path("/proc/cpuinfo")) -> float | None:
    """The first CPU's current clock from /proc/cpuinfo ("cpu MHz"), in GHz; None where it is
    not readable (other OS, ARM kernels without the field). It is the clock at read time, not a
    turbo ceiling: a spec-sheet peak at a higher all-core turbo would be higher."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "cpu mhz":
            try:
                return round(float(value) / 1000.0, 3)
            except ValueError:
                return None
    return None


def analytic_peaks(cpu, ghz: float | None, fma_ports: int = FMA_PORTS) -> dict[str, dict]:
    """Peak G(FL)OP/s per precision from the flags, the core count and the clock alone (no
    measurement): cores x GHz x float32 FLOPs per cycle (:func:`fp32_flops_per_cycle`) x the
    precision's factor (:func:`precision_peak_factors`), e.g. 2 cores x 2.3 GHz x 64 = 294
    GFLOP/s fp32, 589 bf16 (AVX512_BF16), 1178 int8 (VNNI), 9421 bf16 / 18842 int8 with AMX.
    Returns {precision: {"gflops", "factor", "assumes"}}; an empty dict without a clock."""
    if not ghz or ghz <= 0:
        return {}
    per_cycle, fma = fp32_flops_per_cycle(cpu, fma_ports)
    base = cpu.cores * ghz * per_cycle
    clock = f"{cpu.cores} cores x {ghz:.2f} GHz x {per_cycle} fp32 FLOP/cycle ({fma})"
    return {p: {"gflops": round(base * f, 1), "factor": f,
                "assumes": clock if p == "fp32" else f"{why}, {f:g}x of {clock}"}
            for p, (f, why) in precision_peak_factors(cpu).items()}
