"""``clipserve serve``: flags generated from :class:`~clipserve.server.config.ServerConfig`."""

from __future__ import annotations

import argparse
import logging
import sys

from clipserve.config import add_flags, from_args

from .config import ServerConfig


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve`` on the ``clipserve`` subcommand parser."""
    parser = sub.add_parser(
        "serve", help="serve CLIP embeddings over gRPC (clipserve.v1) through Triton",
        description="Start tritonserver on the model repository (or use --triton-url), then "
                    "the clipserve.v1 gRPC gateway with health, reflection and /metrics.")
    add_flags(parser, ServerConfig)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Build the config (flags > CLIPSERVE_* env > defaults) and serve until signalled."""
    try:
        config = from_args(ServerConfig, args)
    except ValueError as exc:
        print(f"clipserve serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .app import run_loop  # grpc server pieces load only when serving

    try:
        return run_loop(config)
    except (ValueError, RuntimeError) as exc:
        # Start-up problems (no repository, bad routing file, Triton failed): one clear line.
        logging.getLogger("clipserve.server").error("%s", exc)
        return 1
