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

    from clipserve.export.config import EvaluateConfig
    evaluate = sub.add_parser(
        "evaluate", help="measure every endpoint of an existing repository on your labelled "
        "data (verdict per precision with intervals); optionally refit its sidecars")
    config_flags.add_flags(evaluate, EvaluateConfig)
    evaluate.set_defaults(run=run_evaluate)


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
    print("\n".join(report.verdict_table(rows)))
    return 0


def run_evaluate(args) -> int:
    from clipserve.export import report
    from clipserve.export.config import EvaluateConfig
    from clipserve.export.reevaluate import evaluate_repository

    try:
        config = config_flags.from_args(EvaluateConfig, args)
        print(f"[evaluate] config: {config_flags.describe(config)}", flush=True)
        rows = evaluate_repository(config, log=lambda line: print(line, flush=True))
    except (ValueError, OSError) as exc:
        print(f"clipserve evaluate: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report.verdict_table(rows)))
    return 0
