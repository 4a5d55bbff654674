"""``clipserve export``: see clipserve.export.pipeline."""

from __future__ import annotations

import sys

from clipserve import config as config_flags


def add_parser(sub) -> None:
    from clipserve.export.config import ExportConfig

    parser = sub.add_parser(
        "export", help="export CLIP models to ONNX at several precisions, report their "
        "quality, and write a Triton model repository")
    config_flags.add_flags(parser, ExportConfig)
    parser.set_defaults(run=run)


def run(args) -> int:
    from clipserve.export import pipeline
    from clipserve.export.config import ExportConfig
    from clipserve.export.models import ModelSpecError
    from clipserve.export.quantize import QuantizationError

    try:
        config = config_flags.from_args(ExportConfig, args)
        print(f"[export] config: {config_flags.describe(config)}", flush=True)
        rows = pipeline.export(config, log=lambda line: print(line, flush=True))
    except (ModelSpecError, QuantizationError, ValueError) as exc:
        print(f"clipserve export: error: {exc}", file=sys.stderr)
        return 2
    from clipserve.export import report
    print(report.markdown(rows, []))
    return 0
