import argparse
from dataclasses import dataclass, field

import pytest

from clipserve import config


@dataclass(frozen=True)
class Example:
    port: int = field(default=8000, metadata={"help": "port"})
    names: tuple[str, ...] = field(default=("a",), metadata={"help": "names"})
    verbose: bool = field(default=False, metadata={"help": "verbose"})
    token: str = field(default="", metadata={"help": "secret"})


def parse(argv, env):
    parser = argparse.ArgumentParser()
    config.add_flags(parser, Example)
    return config.from_args(Example, parser.parse_args(argv), env)


def test_flag_beats_env_beats_default():
    assert parse([], {}) == Example()
    assert parse([], {"CLIPSERVE_PORT": "9000"}).port == 9000
    assert parse(["--port", "9100"], {"CLIPSERVE_PORT": "9000"}).port == 9100


def test_tuple_and_bool_conversion():
    got = parse(["--names", "x, y", "--verbose"], {})
    assert got.names == ("x", "y") and got.verbose is True
    assert parse([], {"CLIPSERVE_VERBOSE": "no"}).verbose is False


def test_bad_value_names_its_source():
    with pytest.raises(SystemExit, match="CLIPSERVE_PORT"):
        parse([], {"CLIPSERVE_PORT": "eighty"})


def test_describe_masks_secrets():
    line = config.describe(Example(token="hunter2"), secret_fields=("token",))
    assert "hunter2" not in line and "token=***" in line
