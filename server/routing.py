"""Which scale and precision serve a call: header selection and the weighted, sticky A/B split.

Pure: no I/O, no clock, no global randomness (the caller passes a ``random.Random``). Reading and
reloading the routing file is the app's job; this module only parses its text.

Rules, in order:

1. ``x-clip-scale`` / ``x-clip-precision`` are validated (an unknown value is INVALID_ARGUMENT
   naming the valid ones). When both are sent they decide alone.
2. Otherwise an arm of the policy is drawn: with ``x-clip-routing-key`` by weighted rendezvous
   hashing of the key (the same key always lands on the same arm while the weights stand, and
   changing one weight moves only the keys that must move); without a key by a fresh weighted
   random draw per call. A header that was sent overrides that part of the arm.
3. Arms the caller reports as not eligible (endpoint absent or not ready) are skipped so traffic
   flows to the others; when none is eligible the top choice is returned anyway, and the caller
   reports it as NOT_FOUND or UNAVAILABLE.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Mapping

from clipserve.endpoints import Precision

from .errors import ServingError

HEADER_SCALE = "x-clip-scale"
HEADER_PRECISION = "x-clip-precision"
HEADER_ROUTING_KEY = "x-clip-routing-key"
HEADER_ENDPOINT = "x-clip-endpoint"  # response: the Triton model name that served the call

Target = tuple[str, Precision]  # (scale, precision)


@dataclass(frozen=True)
class Arm:
    """One A/B arm: a scale and precision receiving ``weight`` (relative) of header-less calls."""

    scale: str
    precision: Precision
    weight: float

    @property
    def target(self) -> Target:
        return self.scale, self.precision


@dataclass(frozen=True)
class RoutingPolicy:
    """The A/B arms; weights are relative and need not sum to 100."""

    arms: tuple[Arm, ...]

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("a routing policy needs at least one arm with a positive weight")

    @classmethod
    def single(cls, scale: str, precision: Precision = Precision.FP32) -> "RoutingPolicy":
        """All header-less traffic to one scale and precision (the default without a file)."""
        return cls((Arm(scale, precision, 1.0),))

    @classmethod
    def from_json(cls, text: str, default_scale: str) -> "RoutingPolicy":
        """Parse a routing file: ``{"weights": {"fp32": 90, "int8": 10}}``.

        A key is a precision (of ``default_scale``) or ``<scale>_<precision>``. Zero weights are
        allowed (an arm switched off) and dropped.

        Raises:
            ValueError: not JSON, unknown keys, a bad precision, negative or no positive weight.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"routing file is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or set(data) != {"weights"}:
            raise ValueError('routing file must be an object with exactly one key, "weights"')
        weights = data["weights"]
        if not isinstance(weights, dict):
            raise ValueError('"weights" must map "<precision>" or "<scale>_<precision>" to a '
                             "number")
        arms = []
        for key, weight in weights.items():
            scale, precision = _parse_arm_key(key, default_scale)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                    or not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weight of {key!r} must be a finite number >= 0, got {weight!r}")
            if weight > 0:
                arms.append(Arm(scale, precision, float(weight)))
        if not arms:
            raise ValueError("routing file has no arm with a positive weight")
        return cls(tuple(arms))

    def shares(self) -> dict[Target, float]:
        """Fraction of header-less traffic per (scale, precision); sums to 1."""
        total = sum(arm.weight for arm in self.arms)
        shares: dict[Target, float] = {}
        for arm in self.arms:
            shares[arm.target] = shares.get(arm.target, 0.0) + arm.weight / total
        return shares

    def missing(self, available: Collection[Target]) -> list[Target]:
        """Arms whose (scale, precision) is not in ``available``."""
        return [arm.target for arm in self.arms if arm.target not in available]


def _parse_arm_key(key: str, default_scale: str) -> Target:
    parts = key.split("_")
    if len(parts) == 1:
        scale, precision = default_scale, parts[0]
    elif len(parts) == 2:
        scale, precision = parts
    else:
        raise ValueError(f"routing key {key!r} must be '<precision>' or '<scale>_<precision>'")
    if not scale:
        raise ValueError(f"routing key {key!r} names no scale and there is no default scale")
    return scale, Precision.parse(precision)


def header(metadata: Iterable[tuple[str, str]] | Mapping[str, str] | None, name: str) -> str | None:
    """The first value of metadata key ``name`` (gRPC keys are lower case), stripped; None when
    absent or empty."""
    if metadata is None:
        return None
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    for key, value in items:
        if key == name:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            value = value.strip()
            return value or None
    return None


def key_point(routing_key: str, target: Target) -> float:
    """A stable uniform number in (0, 1) for (key, arm): blake2b, not Python's salted hash()."""
    digest = hashlib.blake2b(f"{routing_key}\0{target[0]}_{target[1].value}".encode(),
                             digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2.0 ** 64


def pick(weights: Mapping[Target, float], routing_key: str | None, rng: random.Random) -> Target:
    """Draw one target with probability proportional to its weight.

    With a key: weighted rendezvous hashing (highest ``-w / ln(u)`` wins, u from the key), which
    is sticky and proportional. Without: ``rng``.
    """
    targets = sorted(weights, key=lambda t: (t[0], t[1].value))  # order-independent draws
    if routing_key is None:
        return rng.choices(targets, weights=[weights[t] for t in targets])[0]
    return max(targets, key=lambda t: -weights[t] / math.log(key_point(routing_key, t)))


def route(policy: RoutingPolicy, metadata, scales: Collection[str],
          eligible: Callable[[Target], bool], rng: random.Random) -> Target:
    """Resolve the (scale, precision) for a call from its metadata.

    Args:
        policy: the current A/B arms.
        metadata: the call's invocation metadata.
        scales: the scales the repository holds (valid ``x-clip-scale`` values).
        eligible: whether a target can serve now (present and ready); see the module doc.
        rng: randomness for calls without a routing key.

    Raises:
        ServingError: INVALID_ARGUMENT for an unknown scale or precision header.
    """
    scale = header(metadata, HEADER_SCALE)
    if scale is not None and scale not in scales:
        raise ServingError.invalid_argument(
            f"unknown {HEADER_SCALE} {scale!r}; valid scales: {', '.join(sorted(scales))}")
    precision_text = header(metadata, HEADER_PRECISION)
    precision = None
    if precision_text is not None:
        try:
            precision = Precision.parse(precision_text)
        except ValueError as exc:
            raise ServingError.invalid_argument(f"{HEADER_PRECISION}: {exc}") from None
    if scale is not None and precision is not None:
        return scale, precision

    weights: dict[Target, float] = {}
    for arm in policy.arms:
        target = (scale or arm.scale, precision or arm.precision)
        weights[target] = weights.get(target, 0.0) + arm.weight
    if len(weights) == 1:  # one candidate (one arm: the default): it is the answer either way
        return next(iter(weights))
    usable = {t: w for t, w in weights.items() if eligible(t)}
    return pick(usable or weights, header(metadata, HEADER_ROUTING_KEY), rng)
