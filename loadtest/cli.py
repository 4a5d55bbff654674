"""``clipserve loadtest``: flags generated from :class:`~clipserve.loadtest.config.LoadtestConfig`.

    clipserve loadtest --target 127.0.0.1:50051 --concurrency 8 --duration 10 --json run.json
    clipserve loadtest --target 127.0.0.1:50051 --rate 50 --duration 30 --plot run.png
    clipserve loadtest --target 127.0.0.1:50051 --sweep concurrency:1,2,4,8,16 --slo-ms 150
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path

from clipserve.config import add_flags, from_args

from .config import LoadtestConfig


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``loadtest`` on the ``clipserve`` subcommand parser."""
    parser = sub.add_parser(
        "loadtest", help="load-test a clipserve gateway (closed/open loop, sweeps)",
        description="Send EmbedImages/EmbedTexts/Classify calls to one gateway in a closed loop "
                    "(--concurrency) or an open loop (--rate), then print a table per endpoint "
                    "served (x-clip-endpoint). Stops by itself after --duration or --requests.")
    add_flags(parser, LoadtestConfig)
    parser.set_defaults(run=run)
    return parser


def build_workload(config: LoadtestConfig):
    """The :class:`Workload` a config describes (reads the image folder / texts file).

    Raises:
        ValueError: unreadable inputs.
    """
    from . import workload as wl

    mix = wl.parse_mix(config.mix)
    images, texts = [], []
    if {"image", "classify"} & set(mix):
        images = (wl.folder_images(Path(config.images)) if config.images
                  else wl.builtin_images(64, config.image_size, config.seed))
    if "text" in mix:
        texts = wl.file_texts(Path(config.texts)) if config.texts else wl.builtin_texts()
    return wl.Workload(mix, images, texts, config.batch,
                       wl.routing_metadata(config.scale, config.precision),
                       config.routing_keys, config.seed)


async def run_once(config: LoadtestConfig, target, workload, load: float | None = None,
                   open_loop: bool | None = None, label: str = ""):
    """One closed- or open-loop run at ``load`` (default: the config's)."""
    from . import runner, stats

    progress = runner.Progress(None if config.quiet else sys.stderr, label=label)
    open_loop = config.open_loop if open_loop is None else open_loop
    if open_loop:
        rate = load if load is not None else config.rate
        schedule = stats.arrival_times(rate, config.duration, config.requests, config.arrival,
                                       config.seed)
        return await runner.open_loop(target, workload, schedule, config.duration,
                                      config.warmup, config.max_in_flight, progress, rate)
    concurrency = int(load if load is not None else config.concurrency)
    return await runner.closed_loop(target, workload, concurrency, config.duration,
                                    config.requests, config.warmup, progress)


async def _main(config: LoadtestConfig) -> int:
    from . import report
    from .runner import SweepResult, parse_sweep
    from .targets import GatewayTarget, HttpGatewayTarget

    workload = build_workload(config)
    make = HttpGatewayTarget if config.protocol == "http" else GatewayTarget
    target = make(config.target, config.timeout, config.api_key, config.tls,
                  config.tls_ca_file)
    settings = dataclasses.asdict(config)
    settings["api_key"] = "***" if config.api_key else ""
    try:
        if config.sweep:
            kind, steps = parse_sweep(config.sweep)
            runs = []
            for step in steps:
                run = await run_once(config, target, workload, step, kind == "rate",
                                     label=f"[{kind} {step:g}] ")
                runs.append(run)
            sweep = SweepResult(kind, config.slo_ms, runs)
            print(report.format_sweep(sweep))
            if config.json:
                report.write_json(report.sweep_to_dict(sweep, settings), Path(config.json))
            if config.plot:
                report.plot_sweep({config.target: sweep}, Path(config.plot))
        else:
            run = await run_once(config, target, workload)
            print(report.format_table(run.overall(), run.endpoints()))
            if config.json:
                report.write_json(report.run_to_dict(run, settings), Path(config.json))
            if config.plot:
                report.plot_run(run, Path(config.plot))
    finally:
        await target.close()
    for path in (config.json, config.plot):
        if path:
            print(f"wrote {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Build the config (flags > CLIPSERVE_* env > defaults), run, print the table."""
    try:
        config = from_args(LoadtestConfig, args)
    except ValueError as exc:
        print(f"clipserve loadtest: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_main(config))
    except ValueError as exc:
        print(f"clipserve loadtest: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
