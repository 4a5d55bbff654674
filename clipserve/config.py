"""One frozen config object per program, with flags and env overrides generated from it.

A program declares a frozen dataclass whose fields carry ``help`` in their metadata. This
module turns it into argparse flags (``--field-name``) and resolves each value in the order
flag > ``CLIPSERVE_<FIELD>`` environment variable > field default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")
ENV_PREFIX = "CLIPSERVE_"


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; ``tuple[str, ...]`` -> tuple."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return origin or tp


def _convert(text: str, tp: Any, name: str) -> Any:
    base = _base_type(tp)
    try:
        if base is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if base is tuple:
            return tuple(item.strip() for item in text.split(",") if item.strip())
        return base(text)
    except ValueError as exc:
        raise SystemExit(f"invalid value {text!r} for {name}: {exc}") from None


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(default) if isinstance(default, tuple) else default
        help_text = f"{f.metadata.get('help', '')} [env {env}; default: {shown}]"
        if _base_type(hints[f.name]) is bool:
            parser.add_argument(flag, dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                                help=help_text)


def from_args(cls: type[T], args: argparse.Namespace,
              environ: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from parsed flags, then env vars, then defaults."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        flag_value = getattr(args, f.name, None)
        env_value = environ.get(ENV_PREFIX + f.name.upper())
        if flag_value is not None:
            values[f.name] = flag_value if isinstance(flag_value, bool) else _convert(
                flag_value, hints[f.name], "--" + f.name.replace("_", "-"))
        elif env_value is not None:
            values[f.name] = _convert(env_value, hints[f.name], ENV_PREFIX + f.name.upper())
    return cls(**values)


def describe(config: Any, secret_fields: tuple[str, ...] = ()) -> str:
    """One line for the start-up log; fields named in ``secret_fields`` are masked."""
    parts = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in secret_fields and value:
            value = "***"
        parts.append(f"{f.name}={value}")
    return " ".join(parts)
