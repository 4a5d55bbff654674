"""Turn an FP32 tower into the other precisions (see ``clipserve.endpoints.Precision`` for
what each one quantizes and what stays float).

Each function reads an FP32 ONNX file, writes the converted file and returns a dict that
describes what was done; that dict goes into the endpoint's sidecar.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx

from clipserve.export.config import INT4_BLOCK_SIZE
from clipserve.export.recipes import (  # noqa: F401 (re-exported)
    INT4_AUTO_CANDIDATES, INT4_OPS, INT8_AUTO_CANDIDATES, INT8_OPS, Int4Recipe, Int8Recipe)
# int4 MatMulNBits: 4 = compute with int8 activations (usually fastest on CPU); 0 = fp32.
INT4_ACCURACY_LEVEL = 4
# Ops that stay float32 under FP16: normalisation and reductions lose range or precision in
# half floats (LayerNorm variance, the L2 norm, softmax sums overflow to inf).
FP16_KEEP_FLOAT = ["LayerNormalization", "SkipLayerNormalization", "Softmax", "ReduceL2",
                   "ReduceSum", "ReduceMean", "Pow", "Sqrt", "Div", "Clip", "ArgMax"]
# INT8_OPS / INT4_OPS (what each precision quantizes) are in clipserve.export.recipes.


class QuantizationError(RuntimeError):
    """A precision cannot be produced for this model (e.g. nothing to quantize)."""


@contextlib.contextmanager
def _quiet_ort():
    """ORT's quantizers log advice (pre-processing, opset upgrades) on the root logger and
    module loggers at WARNING for every file, and print calibration progress; the export's
    own progress lines say what happened, so hold those back (errors still show)."""
    names = ["", "onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.transformers",
             "fusion_base", "onnx_model", "onnx_model_bert", "fusion_skiplayernorm",
             "onnx_neural_compressor"]
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # calibration progress is print()ed
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _count_ops(model: onnx.ModelProto, op_type: str) -> int:
    return sum(node.op_type == op_type for node in model.graph.node)


def _topological_sort(graph: onnx.GraphProto) -> None:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise QuantizationError("graph has a cycle or an undefined input after conversion")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def optimize(src: Path, dst: Path) -> Path:
    """ONNX Runtime's transformer optimizer (basic fusions: GELU, bias-GELU, LayerNorm).

    Applied before INT8/INT4 so the quantizers see fused ops; run at opt_level 1 so the file
    stays portable across execution providers."""
    from onnxruntime.transformers import optimizer

    with _quiet_ort():
        model = optimizer.optimize_model(str(src), model_type="bert", num_heads=0,
                                         hidden_size=0, opt_level=1, only_onnxruntime=False)
    model.save_model_to_file(str(dst), use_external_data_format=False)
    return dst


def to_fp16(src: Path, dst: Path) -> dict:
    """Weights and most activations to float16; FP16_KEEP_FLOAT ops and the graph's
    inputs/outputs keep their types."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(src), keep_io_types=True,
                                     op_block_list=FP16_KEEP_FLOAT)
    # The converter emits one Cast per (weight, consumer) pair under the same name when a kept
    # float weight has several consumers; the copies are identical, so keep one of each and
    # restore the topological order the removal breaks.
    defined, kept = {}, []
    for node in model.graph.node:
        key = tuple(node.output)
        if key in defined:
            first = defined[key]
            if first.op_type != node.op_type or list(first.input) != list(node.input):
                raise QuantizationError(f"fp16 conversion produced conflicting nodes for {key}")
            continue
        defined[key] = node
        kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _topological_sort(model.graph)
    onnx.checker.check_model(model)
    onnx.save(model, dst)
    return {"method": "fp16", "kept_float32": FP16_KEEP_FLOAT}


def _reduce_range(reduce_range: bool | None) -> bool:
    """reduce_range (7-bit weights) only where the CPU needs it: AVX2 without VNNI multiplies
    u8 x s8 with VPMADDUBSW, whose int16 pair sums saturate with full-range weights; VNNI and
    AMX accumulate in int32. None: decide from this machine (clipserve.cpu)."""
    if reduce_range is None:
        from clipserve import cpu

        return cpu.detect().needs_reduce_range
    return bool(reduce_range)


def _weights_text(reduce_range: bool) -> str:
    return "int8 per-channel, " + ("reduce_range" if reduce_range else "full range (VNNI)")


def to_int8_dynamic(src: Path, dst: Path, reduce_range: bool | None = None) -> dict:
    """Int8 weights per output channel; activations quantized per tensor at run time.
    ``reduce_range``: 7-bit weights; None decides from this CPU (see :func:`_reduce_range`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reduce_range = _reduce_range(reduce_range)
    with _quiet_ort():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=reduce_range, op_types_to_quantize=INT8_OPS)
    _require_quantized(dst, "MatMulInteger", "int8 (dynamic)")
    return {"method": "int8-dynamic", "weights": _weights_text(reduce_range),
            "reduce_range": reduce_range, "activations": "uint8 per-tensor, dynamic",
            "ops": INT8_OPS}


def to_int8_static(src: Path, dst: Path, input_name: str,
                   calibration: Iterable[np.ndarray], reduce_range: bool | None = None) -> dict:
    """Int8 QDQ with activation ranges from a calibration set (99.99th percentile).
    ``reduce_range``: 7-bit weights; None decides from this CPU (see :func:`_reduce_range`)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{input_name: batch} for batch in calibration])

        def get_next(self):
            return next(self._batches, None)

    reduce_range = _reduce_range(reduce_range)
    with _quiet_ort():
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True, reduce_range=reduce_range, op_types_to_quantize=INT8_OPS,
                        calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"CalibPercentile": 99.99})
    _require_quantized(dst, "QuantizeLinear", "int8 (static)")
    return {"method": "int8-static-qdq", "weights": _weights_text(reduce_range),
            "reduce_range": reduce_range, "activations": "uint8 per-tensor, calibrated (percentile 99.99)", "ops": INT8_OPS}


# TensorRT builds int8 engines from explicit Q/DQ only when both sides are symmetric int8
# (zero point 0) and fuses a DequantizeLinear into the layer it feeds; the patch/stem
# convolutions are quantized too (TensorRT has int8 Conv kernels; onnxruntime's CPU path keeps
# them float, see INT8_OPS). Embedding Gathers stay float: TensorRT does not take int8 Gather.
TENSORRT_INT8_OPS = ["MatMul", "Gemm", "Conv"]


def to_int8_tensorrt(src: Path, dst: Path, input_name: str,
                     calibration: Iterable[np.ndarray]) -> dict:
    """Int8 Q/DQ for TensorRT: int8 activations and weights, both symmetric (zero point 0),
    weights per channel, full range, activation ranges calibrated (99.99th percentile) on
    ``calibration``. The graph also runs on onnxruntime's CPU provider (S8S8), which is how
    the export measures its quality; the throughput that matters is TensorRT's, on a GPU."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{input_name: batch} for batch in calibration])

        def get_next(self):
            return next(self._batches, None)

    with _quiet_ort():
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        per_channel=True, reduce_range=False,
                        op_types_to_quantize=TENSORRT_INT8_OPS,
                        calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"CalibPercentile": 99.99, "ActivationSymmetric": True,
                                       "WeightSymmetric": True,
                                       # TensorRT takes float biases, not int32 Q/DQ ones
                                       "QuantizeBias": False})
    _require_quantized(dst, "QuantizeLinear", "int8 (TensorRT)")
    problems = tensorrt_qdq_problems(onnx.load(dst))
    if problems:
        raise QuantizationError("int8 (TensorRT): the graph is not TensorRT-ready: "
                                + "; ".join(problems[:5]))
    return {"method": "int8-tensorrt-qdq", "weights": "int8 per-channel, symmetric",
            "reduce_range": False,
            "activations": "int8 per-tensor, symmetric, calibrated (percentile 99.99)",
            "biases": "float", "ops": TENSORRT_INT8_OPS}


def tensorrt_qdq_problems(model: onnx.ModelProto) -> list[str]:
    """What keeps a Q/DQ graph from TensorRT's explicit int8 mode: a Q/DQ whose zero point is
    not int8 0 (an int32 one is a quantized bias, which TensorRT takes only as float), or a
    MatMul/Gemm/Conv with a constant weight whose inputs do not all come
    through a DequantizeLinear. Empty list: ready."""
    from onnx import numpy_helper

    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = node.attribute[0].t
    producer = {out: node for node in graph.node for out in node.output}
    problems = []
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if len(node.input) < 3 or node.input[2] not in constants:
                problems.append(f"{node.name}: no constant zero point")
                continue
            zp = constants[node.input[2]]
            values = numpy_helper.to_array(zp)
            if zp.data_type != onnx.TensorProto.INT8 or np.any(values != 0):
                problems.append(f"{node.name}: zero point {values.ravel()[:3]} of type "
                                f"{onnx.TensorProto.DataType.Name(zp.data_type)}, not int8 0")
        elif node.op_type in TENSORRT_INT8_OPS:
            inputs = node.input[:2]
            weight = inputs[1] if len(inputs) > 1 else ""
            source = producer.get(weight)
            weight_is_constant = weight in constants or (
                source is not None and source.op_type == "DequantizeLinear"
                and source.input[0] in constants)
            if not weight_is_constant:
                continue  # activation x activation (attention scores): TensorRT keeps float
            for name in inputs:
                feeder = producer.get(name)
                if feeder is None or feeder.op_type != "DequantizeLinear":
                    problems.append(f"{node.op_type} {node.name}: input {name} not dequantized")
    return problems


def to_int4(src: Path, dst: Path, block_size: int = INT4_BLOCK_SIZE,
            accuracy_level: int = INT4_ACCURACY_LEVEL) -> dict:
    """Weight-only 4-bit (RTN, symmetric) blocks for constant-weight MatMuls and embedding
    tables (MatMulNBits, GatherBlockQuantized)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(src), block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level,
                                     op_types_to_quantize=tuple(op for op, _ in INT4_OPS),
                                     quant_axes=INT4_OPS)
    with _quiet_ort():
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    _require_quantized(dst, "MatMulNBits", "int4")
    return {"method": "int4-weight-only-rtn", "block_size": block_size, "ops": [op for op, _ in INT4_OPS],
            "accuracy_level": accuracy_level, "symmetric": True,
            "activations": ("int8, quantized at run time (W4A8 compute)" if accuracy_level == 4
                            else "float32 (weight-only)")}


def _require_quantized(path: Path, op_type: str, what: str) -> None:
    if _count_ops(onnx.load(path, load_external_data=False), op_type) == 0:
        raise QuantizationError(
            f"{what}: no operator of this model could be quantized (no {op_type} produced in "
            f"{path.name}); this model has no constant-weight MatMul/Gemm for it")


def choose_int8(candidates: dict[str, dict], measure: Callable[[str], tuple[float, float, bool]],
                tolerance: float = 5e-4) -> str:
    """Pick between INT8 methods by measurement: ``measure(name)`` returns (mean cosine to
    FP32 on calibration data, items/s, batch_invariant).

    A served embedding must not depend on which other requests Triton's dynamic batcher put in
    the same batch, so batch-invariant methods win over others (dynamic quantization takes one
    activation scale per batch tensor; static QDQ uses fixed scales). Among those, the more
    faithful one wins unless another is within ``tolerance`` of its cosine, in which case the
    faster one does. Fills each candidate's ``cosine_calibration``, ``items_per_s`` and
    ``batch_invariant`` in place and returns the chosen name."""
    scores = {}
    for name, info in candidates.items():
        cosine, speed, invariant = measure(name)
        info.update(cosine_calibration=round(cosine, 6), items_per_s=round(speed, 1),
                    batch_invariant=invariant)
        scores[name] = (cosine, speed, invariant)
    pool = [name for name, (_, _, invariant) in scores.items() if invariant] or list(scores)
    best_cos = max(scores[name][0] for name in pool)
    close = [name for name in pool if scores[name][0] >= best_cos - tolerance]
    return max(close, key=lambda name: scores[name][1])


# -- INT8 and INT4 recipes: the candidates ``--int8-method`` / ``--int4-method`` name ---------

class _Reader:
    """A CalibrationDataReader over a list of feeds that can be iterated again (GPTQ deep-copies
    and iterates it; quantize_static calls get_next)."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self.feeds = [{input_name: batch} for batch in batches]
        self._next = 0

    def get_next(self):
        if self._next >= len(self.feeds):
            return None
        self._next += 1
        return self.feeds[self._next - 1]

    def __iter__(self):
        return iter(self.feeds)

    def __len__(self):
        return len(self.feeds)

    def rewind(self):  # onnx-neural-compressor's readers rewind between passes
        self._next = 0


SMOOTHQUANT_ALPHA = 0.5


def smooth_quant(src: Path, dst: Path, input_name: str, calibration: Iterable[np.ndarray],
                 alpha: float = SMOOTHQUANT_ALPHA) -> Path:
    """SmoothQuant (Xiao et al. 2023): per input channel of each MatMul/Gemm/Conv, divide the
    activation by s and multiply the weight rows by s, s = max|x|^alpha / max|w|^(1-alpha), so
    activation outliers move into the weights before int8 calibration. The 1/s stays a float
    Mul before each op: the Smoother's folding of it into the preceding op broke these graphs
    (FP32 cosine to the unsmoothed graph 0.57 image / 0.39 text on digits-s; 1.0 unfolded).

    onnxruntime's own ``extra_options={"SmoothQuant": True}`` imports
    ``neural_compressor.adaptor.ox_utils.smooth_quant``, which neural-compressor 3.x no longer
    ships (3.10 has no ONNX adaptor at all: its ONNX support moved to onnx-neural-compressor);
    so this calls onnx-neural-compressor 1.0's ``Smoother`` directly.

    Raises:
        QuantizationError: onnx-neural-compressor is not installed.
    """
    try:
        from onnx_neural_compressor.algorithms.smoother.core import Smoother
    except ImportError as exc:
        raise QuantizationError(
            f"SmoothQuant (-sq) needs onnx-neural-compressor ({exc}): pip install "
            "'clipserve[smoothquant]'") from exc
    with _quiet_ort():
        model = Smoother(onnx.load(src), _Reader(input_name, calibration)).transform(
            alpha=alpha, folding=False)
    onnx.save(model, dst)
    return dst


def to_int8(src: Path, dst: Path, recipe: Int8Recipe, input_name: str = "",
            calibration: Iterable[np.ndarray] = (), reduce_range: bool | None = None,
            nodes_to_exclude: Iterable[str] = (), calibration_cache: Path | None = None) -> dict:
    """Quantize ``src`` to INT8 by ``recipe``. Static recipes calibrate on ``calibration``
    (batches for ``input_name``); ``calibration_cache``: a file of activation ranges written
    on the first call and reused by later ones with the same calibrator (the mixed-precision
    search re-quantizes many times). ``nodes_to_exclude``: nodes left in float.
    Returns the sidecar's description."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    reduce_range = _reduce_range(reduce_range)
    excluded = sorted(nodes_to_exclude)
    if recipe.smooth:
        batches = list(calibration)
        src = smooth_quant(src, Path(dst).with_suffix(".smoothed.onnx"), input_name, batches)
        calibration = batches
    info = {"method": "int8-dynamic" if recipe.dynamic else "int8-static-qdq",
            "candidate": recipe.name,
            "weights": ("int8 per-channel, " if recipe.per_channel else "int8 per-tensor, ")
            + ("reduce_range" if reduce_range else "full range (VNNI)"),
            "reduce_range": reduce_range, "activations": recipe.describe_activations(),
            "ops": INT8_OPS}
    with _quiet_ort():
        if recipe.dynamic:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                             per_channel=recipe.per_channel, reduce_range=reduce_range,
                             op_types_to_quantize=INT8_OPS, nodes_to_exclude=excluded)
        else:
            options = recipe.calibration_options()
            if recipe.symmetric:
                options["ActivationSymmetric"] = True
            quantize_static(
                str(src), str(dst), _Reader(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8 if recipe.symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8, per_channel=recipe.per_channel,
                reduce_range=reduce_range, op_types_to_quantize=INT8_OPS,
                nodes_to_exclude=excluded, calibrate_method=recipe.calibration_method(),
                extra_options=options,
                calibration_cache_path=str(calibration_cache) if calibration_cache else None)
    _require_quantized(dst, "MatMulInteger" if recipe.dynamic else "QuantizeLinear",
                       f"int8 ({recipe.name})")
    if excluded:
        info["float_nodes"] = excluded
    return info


def quantizable_nodes(model: onnx.ModelProto, op_types=INT8_OPS) -> list[str]:
    """Names of the nodes INT8 quantizes: ``op_types`` with a constant weight (MatMul/Gemm
    input 1, Gather input 0), in graph order; the candidates for staying float."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    names = []
    for node in model.graph.node:
        if node.op_type not in op_types or not node.name:
            continue
        weight = node.input[0] if node.op_type == "Gather" else node.input[1]
        if weight in constants:
            names.append(node.name)
    return names


def float_nodes(model: onnx.ModelProto, candidates: Iterable[str]) -> list[str]:
    """Which of ``candidates`` (node names of the float graph) a Q/DQ graph left in float: the
    node is still there and its weight does not come through a DequantizeLinear."""
    producer = {out: node for node in model.graph.node for out in node.output}
    by_name = {node.name: node for node in model.graph.node}
    left = []
    for name in candidates:
        node = by_name.get(name)
        if node is None:
            continue
        weight = node.input[0] if node.op_type == "Gather" else node.input[1]
        source = producer.get(weight)
        if source is None or source.op_type != "DequantizeLinear":
            left.append(name)
    return left


def sensitive_ends(model: onnx.ModelProto) -> list[str]:
    """The nodes ``-keep8``/``-keepfp`` treat apart: Gathers on a 2-D constant table (the token
    embedding) and the last constant-weight MatMul (the output projection)."""
    tables = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    gathers = [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables]
    matmuls = [n for n in quantizable_nodes(model, ("MatMul",))]
    return gathers + matmuls[-1:]


def _hide_weights(model: onnx.ModelProto, names: set[str]) -> list[str]:
    """Route the constant weights of ``names`` through an Identity so no weight-only quantizer
    sees a constant there (the ORT quantizers skip such nodes); returns the hidden inputs."""
    hidden = []
    for node in model.graph.node:
        if node.name in names:
            index = 0 if node.op_type == "Gather" else 1
            original = node.input[index]
            node.input[index] = original + "__kept"
            hidden.append(original)
    model.graph.node.extend(onnx.helper.make_node("Identity", [w], [w + "__kept"],
                                                  name=w + "__kept") for w in hidden)
    _topological_sort(model.graph)
    return hidden


def _unhide_weights(model: onnx.ModelProto, hidden: list[str]) -> None:
    targets = {w + "__kept": w for w in hidden}
    kept = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in targets)]
    for node in kept:
        node.input[:] = [targets.get(name, name) for name in node.input]
    del model.graph.node[:]
    model.graph.node.extend(kept)


def _gather_int8_rows(model: onnx.ModelProto, node_name: str) -> None:
    """Replace a Gather on a float table by a Gather on an int8 table (one symmetric scale per
    row) and a Mul by the gathered rows' scales: 4x smaller, no float table at run time."""
    from onnx import helper, numpy_helper

    graph = model.graph
    node = next(n for n in graph.node if n.name == node_name)
    table_init = next(t for t in graph.initializer if t.name == node.input[0])
    table = numpy_helper.to_array(table_init).astype(np.float32)
    scale = np.maximum(np.abs(table).max(axis=1), 1e-12) / 127.0
    q = np.clip(np.round(table / scale[:, None]), -127, 127).astype(np.int8)
    base = table_init.name
    graph.initializer.remove(table_init)
    graph.initializer.extend([numpy_helper.from_array(q, base + "_int8"),
                              numpy_helper.from_array(scale.astype(np.float32)[:, None],
                                                      base + "_row_scale")])
    out, ids = node.output[0], node.input[1]
    new = [helper.make_node("Gather", [base + "_int8", ids], [out + "_q"], name=node_name + "_q8"),
           helper.make_node("Cast", [out + "_q"], [out + "_f"], to=onnx.TensorProto.FLOAT,
                            name=node_name + "_cast"),
           helper.make_node("Gather", [base + "_row_scale", ids], [out + "_s"],
                            name=node_name + "_scale"),
           helper.make_node("Mul", [out + "_f", out + "_s"], [out], name=node_name + "_mul")]
    index = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, n in enumerate(new):
        graph.node.insert(index + offset, n)


def _weight_only_pass(model: onnx.ModelProto, config=None, **kwargs) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, algo_config=config, **kwargs)
    with _quiet_ort():
        quantizer.process()
    result = quantizer.model
    return result.model if hasattr(result, "model") else result


def to_int4_recipe(src: Path, dst: Path, recipe: Int4Recipe, input_name: str = "",
                   calibration: Iterable[np.ndarray] = ()) -> dict:
    """Weight-only 4-bit blocks by ``recipe`` for constant-weight MatMuls (MatMulNBits) and
    embedding tables (GatherBlockQuantized). GPTQ calibrates on ``calibration`` (batches for
    ``input_name``). Returns the sidecar's description."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (GPTQWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig)

    model = onnx.load(src)
    ends = sensitive_ends(model) if recipe.keep != "int4" else []
    hidden = _hide_weights(model, set(ends)) if ends else []
    common = dict(block_size=recipe.block_size, is_symmetric=recipe.symmetric,
                  accuracy_level=recipe.accuracy_level)
    if recipe.algorithm == "rtn":
        model = _weight_only_pass(model, op_types_to_quantize=tuple(op for op, _ in INT4_OPS),
                                  quant_axes=INT4_OPS, **common)
    else:
        if recipe.algorithm == "hqq":
            config = HQQWeightOnlyQuantConfig(block_size=recipe.block_size, bits=4,
                                              op_types_to_quantize=("MatMul",))
        else:
            batches = list(calibration)
            if not batches:
                raise QuantizationError("int4 gptq needs calibration data (none was given)")
            config = GPTQWeightOnlyQuantConfig(_Reader(input_name, batches),
                                               op_types_to_quantize=("MatMul",))
        try:
            model = _weight_only_pass(model, config, **common)
        except ValueError as exc:
            # onnxruntime 1.32's GPTQ (its vendored neural-compressor code) packs asymmetric
            # zero points per column without padding: a weight with an odd number of blocks
            # along K fails to reshape.
            raise QuantizationError(
                f"int4 {recipe.name}: onnxruntime's {recipe.algorithm} failed on this graph "
                f"({exc}); with -asym this is its zero-point packing for an odd number of "
                "blocks per column: use -sym or a smaller block") from exc
        # the embedding table (a Gather) by RTN: neither HQQ nor GPTQ handles Gather
        model = _weight_only_pass(model, op_types_to_quantize=("Gather",),
                                  quant_axes=INT4_OPS, **common)
    if hidden:
        _unhide_weights(model, hidden)
    if recipe.keep == "int8":
        for name in ends:
            if any(n.name == name and n.op_type == "Gather" for n in model.graph.node):
                _gather_int8_rows(model, name)
        model = _weight_only_pass(model, op_types_to_quantize=("MatMul",), bits=8,
                                  block_size=32, is_symmetric=True,
                                  accuracy_level=recipe.accuracy_level)
    for node in model.graph.node:  # HQQ does not write the level; one level for every node
        if node.op_type == "MatMulNBits":
            attrs = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(attrs)
            if recipe.accuracy_level:
                node.attribute.append(onnx.helper.make_attribute("accuracy_level",
                                                                 recipe.accuracy_level))
    _topological_sort(model.graph)
    onnx.save(model, dst)
    _require_quantized(dst, "MatMulNBits", f"int4 ({recipe.name})")
    info = recipe.describe()
    if ends:
        info["kept_apart"] = ends
    return info
