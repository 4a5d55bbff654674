"""Coverage-guided fuzz target (atheris/libFuzzer) for the gateway's decode and tokenise path.

Run it for a while by hand, or briefly from the tests (tests/unit/test_fuzz.py)::

    python -m tests.fuzz.fuzz_inputs -max_total_time=600 /tmp/corpus   # corpus dir optional

The first byte picks the target (even: image bytes, odd: UTF-8 text), the rest is the input.
A failure prints the crashing input and saves it as ``crash-<sha1>`` in the working directory;
replay it with ``python -m tests.fuzz.fuzz_inputs crash-<sha1>``. Invariants:
tests/fuzz/invariants.py. The tokenizer is read from ``$CLIPSERVE_FUZZ_TOKENIZER`` (a
tokenizer.json); without it only images are fuzzed.
"""

from __future__ import annotations

import os
import sys

import atheris

import grpc  # noqa: F401  (imported before instrumenting: not under test, slow to instrument)
import numpy  # noqa: F401

with atheris.instrument_imports(include=["PIL", "clipserve"]):
    import PIL.Image  # Pillow's Python format parsers are fuzzed too: load them now
    PIL.Image.init()
    from clipserve.server import images  # noqa: F401
    from clipserve import tokenizer as tokenizer_module
from tests.fuzz import invariants  # noqa: E402

_TOKENIZER = None
if os.environ.get("CLIPSERVE_FUZZ_TOKENIZER"):
    _TOKENIZER = tokenizer_module.ClipTokenizer.from_file(
        os.environ["CLIPSERVE_FUZZ_TOKENIZER"], 77)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    selector, payload = data[0], data[1:]
    if selector % 2 == 0 or _TOKENIZER is None:
        invariants.check_image(payload)
    else:
        invariants.check_text(_TOKENIZER, payload.decode("utf-8", "replace"))


def write_seeds(folder: str) -> None:
    """Put the valid seed images (prefixed with the image selector) in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    for i, seed in enumerate(invariants.seed_images()):
        with open(os.path.join(folder, f"seed-{i}"), "wb") as f:
            f.write(b"\x00" + seed)


def main(argv: list[str]) -> None:
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if corpus and os.path.isdir(corpus[0]) and not os.listdir(corpus[0]):
        write_seeds(corpus[0])
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
