"""Brief fuzzing of the decode and tokenise path: hypothesis properties, then a few seconds of
the coverage-guided atheris target (tests/fuzz/fuzz_inputs.py) when atheris is installed.

Invariants are in tests/fuzz/invariants.py. Example counts are sized for a 2-core CI machine
(about 20 s together); run the atheris target by hand for a long session.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT
from tests.fuzz import invariants

SEEDS = invariants.seed_images()
FUZZ = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw) -> bytes:
    """A valid seed image with a few random edits: truncation, byte flips, insertions, splices.
    Near-valid files reach deep into the decoders, unlike random bytes."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("truncate", "flip", "insert", "splice", "zero")))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "truncate":
            del data[at:]
        elif op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "splice":
            other = draw(st.sampled_from(SEEDS))
            data[at:] = other[draw(st.integers(0, len(other) - 1)):]
        elif op == "zero":
            data[at:at + draw(st.integers(1, 64))] = b"\x00" * 8
    return bytes(data)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@st.composite
def png_headers(draw) -> bytes:
    """PNGs with arbitrary (often lying) headers: dimensions, bit depth, colour type,
    interlace, and a short or absent pixel stream."""
    width = draw(st.integers(0, 2**31 - 1) | st.integers(1, 300))
    height = draw(st.integers(0, 2**31 - 1) | st.integers(1, 300))
    depth = draw(st.sampled_from((1, 2, 4, 8, 16, 3, 0)))
    colour = draw(st.sampled_from((0, 2, 3, 4, 6, 1, 7)))
    interlace = draw(st.sampled_from((0, 1, 2)))
    body = draw(st.binary(max_size=64))
    idat = zlib.compress(body) if draw(st.booleans()) else body
    return (b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0,
                                          interlace))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused_or_decoded(data):
    invariants.check_image(data)


@FUZZ
@given(mutated())
def test_mutated_images_are_refused_or_decoded(data):
    invariants.check_image(data)


@FUZZ
@given(png_headers())
def test_lying_png_headers_are_refused_or_decoded(data):
    invariants.check_image(data)


def test_every_seed_decodes():
    # The seeds must be valid, or the mutations above start from garbage.
    assert [invariants.check_image(seed) for seed in SEEDS[:-3]] == ["ok"] * (len(SEEDS) - 3)


# -- text --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> Path:
    """The real CLIP vocabulary as export writes it (needs open_clip, the export extra)."""
    pytest.importorskip("open_clip", reason="writing tokenizer.json needs open_clip")
    from clipserve.tokenizer import write_tokenizer_json

    return write_tokenizer_json(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_json):
    from clipserve.tokenizer import ClipTokenizer

    return ClipTokenizer.from_file(tokenizer_json, 77)


TEXTS = (st.text(max_size=300)
         | st.text(alphabet=st.sampled_from("&#x;<>_ \u00c3\u00a9\u0080abc0123456789"),
                   max_size=2000)
         | st.builds(lambda piece, n: piece * n,
                     st.sampled_from(("&amp;", "&#", "<start_of_text>", "<end_of_text>",
                                      "\u200b", "\U0001f600", "\u202e", "a ", "\\x")),
                     st.integers(1, 2000)))


@FUZZ
@given(TEXTS)
def test_any_text_tokenises_to_a_well_formed_row(tokenizer, text):
    invariants.check_text(tokenizer, text)


# -- coverage-guided -------------------------------------------------------------------------

def test_atheris_target_runs_briefly_without_findings(tmp_path, tokenizer_json):
    pytest.importorskip("atheris", reason="atheris is in the dev extra (Linux x86-64)")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    env = {**os.environ, "CLIPSERVE_FUZZ_TOKENIZER": str(tokenizer_json),
           "PYTHONPATH": str(ROOT)}
    seconds = int(os.environ.get("CLIPSERVE_FUZZ_SECONDS", "10"))
    fuzz = [sys.executable, "-m", "tests.fuzz.fuzz_inputs", f"-max_total_time={seconds}",
            "-timeout=10", "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", str(corpus)]
    # libFuzzer's RSS limit reads the peak RSS (getrusage), which Linux keeps across execve:
    # spawned straight from this pytest process (vfork + exec) the fuzzer would start with
    # pytest's own peak (past 2 GB late in the suite, with torch loaded) and report a false
    # out-of-memory within a second. A shell that forks the fuzzer (and does not exec it) gives
    # it a fresh peak.
    result = subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *fuzz],
                            cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=seconds + 120)
    output = result.stdout + result.stderr
    crashes = [found for pattern in ("crash-*", "timeout-*", "oom-*")
               for found in sorted(Path(tmp_path).glob(pattern))]
    assert result.returncode == 0 and not crashes, output[-4000:]
    assert "Done" in output, output[-4000:]
