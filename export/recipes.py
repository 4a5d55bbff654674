"""The INT8 and INT4 methods a user can name (``--int8-method`` / ``--int4-method``) and the
candidate lists ``auto`` measures. Light to import (no onnx, no onnxruntime at import time):
the export config validates the flags with it. :mod:`clipserve.export.quantize` applies them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# INT8 quantizes the matmuls and the token-embedding table (a Gather on a constant: 49408 rows,
# most of a small text tower's bytes). LayerNorm, GELU, residual Adds and Softmax stay float
# (CLIP's activation outliers make them the parts that break; optimum #151, ORT #16219).
INT8_OPS = ["MatMul", "Gemm", "Gather"]
# INT4: MatMul weights blocked along K (axis 0); embedding rows blocked along D (axis 1).
INT4_OPS = (("MatMul", 0), ("Gather", 1))

# name -> (onnxruntime CalibrationMethod name, extra options)
INT8_CALIBRATORS = {"minmax": ("MinMax", {}), "entropy": ("Entropy", {})}
# Percentile levels are written pNN.NN (static-p99.99); any level in (90, 100) parses.
_PERCENTILE = re.compile(r"^p(\d{2}(?:\.\d+)?)$")


@dataclass(frozen=True)
class Int8Recipe:
    """One INT8 method. Names: ``dynamic`` (activation scales per batch at run time) or
    ``static-<calibrator>[-sym][-pertensor][-sq]``: Q/DQ with activation ranges calibrated by
    ``minmax``, ``entropy`` or a percentile ``pNN.NN``; ``-sym``: int8 activations with zero
    point 0 (otherwise uint8, asymmetric); ``-pertensor``: one weight scale per tensor
    (otherwise per output channel); ``-sq``: SmoothQuant first (alpha 0.5: activation
    outliers moved into the weights; needs onnx-neural-compressor)."""

    dynamic: bool = False
    calibrator: str = "p99.99"
    symmetric: bool = False
    per_channel: bool = True
    smooth: bool = False

    @property
    def name(self) -> str:
        if self.dynamic:
            return "dynamic" + ("" if self.per_channel else "-pertensor")
        return ("static-" + self.calibrator + ("-sym" if self.symmetric else "")
                + ("" if self.per_channel else "-pertensor") + ("-sq" if self.smooth else ""))

    @classmethod
    def parse(cls, name: str) -> "Int8Recipe":
        """Raises ValueError naming the grammar for anything else."""
        parts = name.strip().lower().split("-")
        per_channel = "pertensor" not in parts
        parts = [p for p in parts if p != "pertensor"]
        if parts == ["dynamic"]:
            return cls(dynamic=True, per_channel=per_channel)
        symmetric, smooth = "sym" in parts, "sq" in parts
        parts = [p for p in parts if p not in ("sym", "sq")]
        if len(parts) == 2 and parts[0] == "static":
            calibrator = parts[1]
            match = _PERCENTILE.match(calibrator)
            if calibrator in INT8_CALIBRATORS or (match and 90 < float(match[1]) < 100):
                return cls(calibrator=calibrator, symmetric=symmetric, per_channel=per_channel,
                           smooth=smooth)
        raise ValueError(
            f"unknown int8 method {name!r}; valid: auto, dynamic, static-CAL[-sym][-pertensor][-sq] "
            f"with CAL one of {', '.join(INT8_CALIBRATORS)} or a percentile like p99.99 "
            f"(e.g. static-entropy, static-p99.999-sym)")

    def calibration_method(self):
        from onnxruntime.quantization import CalibrationMethod

        if self.calibrator in INT8_CALIBRATORS:
            return getattr(CalibrationMethod, INT8_CALIBRATORS[self.calibrator][0])
        return CalibrationMethod.Percentile

    def calibration_options(self) -> dict:
        if self.calibrator in INT8_CALIBRATORS:
            return dict(INT8_CALIBRATORS[self.calibrator][1])
        return {"CalibPercentile": float(self.calibrator[1:])}

    def describe_activations(self) -> str:
        if self.dynamic:
            return "uint8 per-tensor, dynamic"
        kind = "int8 symmetric" if self.symmetric else "uint8 asymmetric"
        smooth = ", after SmoothQuant (alpha 0.5)" if self.smooth else ""
        return f"{kind} per-tensor, calibrated ({self.calibrator}){smooth}"


# The candidates ``--int8-method auto`` measures: bounded (each costs a calibration pass, a
# quality probe and a speed run), spanning the calibrators and the activation encoding.
INT8_AUTO_CANDIDATES = ("dynamic", "static-minmax", "static-entropy", "static-p99.99",
                        "static-p99.999", "static-p99.99-sym")


# INT4: which algorithm writes the 4-bit blocks.
INT4_ALGORITHMS = ("rtn", "hqq", "gptq")
INT4_KEEP = ("int4", "int8", "float")  # what the token embedding and output projection get


@dataclass(frozen=True)
class Int4Recipe:
    """One INT4 method. Names: ``ALG[-sym|-asym]-bBLOCK-aLEVEL[-keep8|-keepfp]``:
    ALG ``rtn`` (round to nearest), ``hqq`` (half-quadratic, data-free; asymmetric with float
    zero points), ``gptq`` (Hessian-corrected on calibration data); BLOCK 16..128 (power of
    two); LEVEL ``a0`` (weights only, float activations) or ``a4`` (int8 activations at run
    time, W4A8). ``-keep8``: the token embedding and the output projection at 8 bits;
    ``-keepfp``: in float. The token embedding is a Gather, which HQQ and GPTQ do not
    handle: under them it is RTN."""

    algorithm: str = "rtn"
    symmetric: bool = True
    block_size: int = 32
    accuracy_level: int = 4
    keep: str = "int4"

    @property
    def name(self) -> str:
        sym = "" if self.algorithm == "hqq" else ("-sym" if self.symmetric else "-asym")
        keep = {"int4": "", "int8": "-keep8", "float": "-keepfp"}[self.keep]
        return f"{self.algorithm}{sym}-b{self.block_size}-a{self.accuracy_level}{keep}"

    @classmethod
    def parse(cls, name: str) -> "Int4Recipe":
        """Raises ValueError naming the grammar for anything else."""
        parts = name.strip().lower().split("-")
        fields = {"algorithm": parts[0] if parts else ""}
        for part in parts[1:]:
            if part in ("sym", "asym"):
                fields["symmetric"] = part == "sym"
            elif part in ("keep8", "keepfp"):
                fields["keep"] = "int8" if part == "keep8" else "float"
            elif re.fullmatch(r"b\d+", part):
                fields["block_size"] = int(part[1:])
            elif part in ("a0", "a4"):
                fields["accuracy_level"] = int(part[1:])
            else:
                fields["algorithm"] = ""
        b = fields.get("block_size", 32)
        if (fields["algorithm"] not in INT4_ALGORITHMS or b < 16 or b > 128 or b & (b - 1)
                or (fields["algorithm"] == "hqq" and "symmetric" in fields)):
            raise ValueError(
                f"unknown int4 method {name!r}; valid: auto or ALG[-sym|-asym]-bBLOCK-aLEVEL"
                f"[-keep8|-keepfp] with ALG one of {', '.join(INT4_ALGORITHMS)} (hqq takes no "
                "-sym/-asym), BLOCK 16, 32, 64 or 128, LEVEL a0 (weight-only) or a4 (int8 "
                "compute); e.g. rtn-sym-b32-a4, gptq-asym-b64-a0-keep8")
        if fields["algorithm"] == "hqq":
            fields["symmetric"] = False
        return cls(**fields)

    def describe(self) -> dict:
        return {"method": f"int4-weight-only-{self.algorithm}", "candidate": self.name,
                "block_size": self.block_size, "accuracy_level": self.accuracy_level,
                "symmetric": self.symmetric, "ops": [op for op, _ in INT4_OPS],
                "activations": ("int8, quantized at run time (W4A8 compute)"
                                if self.accuracy_level == 4 else "float32 (weight-only)"),
                "token_embedding_and_projection": {
                    "int4": "int4" + (" (embedding RTN)" if self.algorithm != "rtn" else ""),
                    "int8": "int8 (embedding per-row int8, projection 8-bit blocks)",
                    "float": "float32"}[self.keep]}


# The candidates ``--int4-method auto`` measures (bounded; each costs a quantization, a
# quality probe and a speed run): the algorithms at block 32, the block sizes with RTN, and
# weight-only against int8 compute. ``-keep8``/``-keepfp`` are opt-in (name them): keeping the
# token embedding at 8 bits made digits-s's INT4 text tower larger than its INT8 one (3.64 vs
# 3.49 MB) for +0.0025 cosine, and an INT4 endpoint is there to be small.
INT4_AUTO_CANDIDATES = ("rtn-sym-b32-a4", "rtn-asym-b32-a4", "rtn-sym-b128-a4",
                        "rtn-sym-b32-a0", "hqq-b32-a4", "gptq-sym-b32-a4")


def int8_candidates(method: str) -> list[str]:
    """The INT8 candidates for ``--int8-method``: the auto list, or the one named (validated).

    Raises ValueError for an unknown name."""
    if method == "auto":
        return list(INT8_AUTO_CANDIDATES) + (
            [SMOOTHQUANT_AUTO_CANDIDATE] if smoothquant_available() else [])
    return [Int8Recipe.parse(method).name]


# Measured by auto only where onnx-neural-compressor is installed (the smoothquant extra).
SMOOTHQUANT_AUTO_CANDIDATE = "static-p99.99-sq"


def smoothquant_available() -> bool:
    """Whether SmoothQuant's library (onnx-neural-compressor) is installed here."""
    import importlib.util

    return importlib.util.find_spec("onnx_neural_compressor") is not None


def int4_candidates(method: str, block_size: int = 32) -> list[str]:
    """The INT4 candidates for ``--int4-method``: the auto list with ``block_size``
    (``--int4-block-size``) in place of 32 where it compares algorithms, or the one named.

    Raises ValueError for an unknown name."""
    if method != "auto":
        return [Int4Recipe.parse(method).name]
    names = [n.replace("-b32-", f"-b{block_size}-") for n in INT4_AUTO_CANDIDATES]
    return list(dict.fromkeys(Int4Recipe.parse(n).name for n in names))
