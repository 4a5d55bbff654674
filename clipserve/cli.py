"""The ``clipserve`` command: ``export`` now, ``serve`` and ``loadtest`` as they land.

Each subcommand's module is imported only when it runs, so a serving install without torch
can still run ``clipserve serve``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    from clipserve.export import cli as export_cli
    export_cli.add_parser(sub)
    from clipserve.server import cli as server_cli; server_cli.add_parser(sub)
    from clipserve.loadtest import cli as loadtest_cli; loadtest_cli.add_parser(sub)
    from clipserve import client_cli; client_cli.add_parsers(sub)
    from clipserve.loadtest import abreport; abreport.add_parser(sub)

    args = parser.parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
