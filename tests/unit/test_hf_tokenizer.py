"""Hugging Face tokenizers as data: the gateway's HfTokenizer (clipserve.tokenizer, reading
only the framed tokenizer.json and the sidecar's cleaning) gives the ids the export trained
and measured with (open_clip's own cleaning function, then the tokenizer framed the way
open_clip's HFTokenizer asks transformers to: max_length, padding='max_length',
truncation=True), on randomized strings. The one documented divergence, ftfy's mojibake
repair, is excluded the way tests/unit/test_tokenizer.py excludes it."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
ftfy = pytest.importorskip("ftfy")

from open_clip.tokenizer import get_clean_fn  # noqa: E402

from clipserve.export import families  # noqa: E402
from clipserve.tokenizer import (HF_CLEAN_FUNCTIONS, HfTokenizer, hf_clean_text,  # noqa: E402
                                 load_tokenizer)

CONTEXT = 16
ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" + " " * 8 + "\t\n\r\u00a0\u2028\u3000"
    "\u00e9\u00c5\u00df\u00e7\u0130\u0131\u03a3\u03c3\u4e2d\u6587\uff21\ufb01\u2019\u201c"
    "\U0001F642\u200d\u0301&;<>")
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "digit", "photo", "of", "the", "a", "handwritten", "number", "blurry", "picture",
         "drawing", "SEVEN", "Eight.", "&amp;", "_", "__init__"]


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 24)):
            if rng.random() < 0.5:
                parts.append(rng.choice(WORDS))
            else:
                parts.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 6))))
        texts.append(rng.choice([" ", "", "  ", "\t"]).join(parts))
    return [t for t in texts if ftfy.fix_text(t) == ftfy.fix_text(t, fix_encoding=False)]


@pytest.fixture(scope="module")
def digits_tokenizer(tmp_path_factory):
    return families.text_tokenizer("digits-siglip-s", CONTEXT,
                                   tmp_path_factory.mktemp("tok"))


def test_committed_vocabulary_is_what_the_builder_makes(tmp_path):
    rebuilt = families.build_digits_tokenizer(tmp_path / "digits.json")
    assert json.loads(rebuilt.read_text()) == json.loads(families.DIGITS_TOKENIZER.read_text())


def test_gateway_ids_equal_the_export_ids_on_random_strings(digits_tokenizer):
    gateway = load_tokenizer(digits_tokenizer.json_path, CONTEXT, digits_tokenizer.sidecar)
    assert isinstance(gateway, HfTokenizer)
    texts = random_texts(600, seed=1)
    assert len(texts) > 500
    ids, truncated = gateway.encode(texts)
    want = digits_tokenizer(texts)
    assert ids.dtype == np.int32 and ids.shape == (len(texts), CONTEXT)
    bad = [t for t, row, w in zip(texts, ids, want) if row.tolist() != w.tolist()]
    assert not bad, bad[:5]
    assert any(truncated) and not all(truncated)


def test_digits_ids_end_with_eos_and_pad_with_zero(digits_tokenizer):
    gateway = load_tokenizer(digits_tokenizer.json_path, CONTEXT, digits_tokenizer.sidecar)
    ids, truncated = gateway.encode(["A photo of the digit SEVEN.", "", "one " * 40])
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(families.DIGITS_TOKENIZER))
    eos = vocab.token_to_id("[EOS]")
    assert eos == vocab.get_vocab_size() - 1  # the largest id: the text tower's argmax finds it
    row = ids[0].tolist()
    assert row[row.index(eos) + 1:] == [0] * (CONTEXT - row.index(eos) - 1)
    assert vocab.token_to_id("[UNK]") not in row  # every prompt word is in the vocabulary
    assert ids[1].tolist() == [eos] + [0] * (CONTEXT - 1)
    assert ids[2, -1] == eos and truncated == [False, False, True]  # cut keeps the EOS


@pytest.mark.parametrize("clean", HF_CLEAN_FUNCTIONS)
def test_cleaning_equals_open_clips(clean):
    reference = get_clean_fn(clean)
    for text in random_texts(400, seed=2):
        assert hf_clean_text(text, clean) == reference(text), repr(text)


def test_bad_tokenizer_specs_are_refused(digits_tokenizer):
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sp'"):
        load_tokenizer(digits_tokenizer.json_path, CONTEXT, {"kind": "sp"})
    with pytest.raises(ValueError, match="context length 32"):
        load_tokenizer(digits_tokenizer.json_path, 32, digits_tokenizer.sidecar)
    with pytest.raises(ValueError, match="unknown text cleaning"):
        hf_clean_text("x", "stem")


def test_gemma_style_config_rebuilds_bos_and_eos_like_transformers(tmp_path):
    import shutil

    d = tmp_path / "gemma"
    d.mkdir()
    shutil.copyfile(families.DIGITS_TOKENIZER, d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizerFast", "bos_token": "[UNK]", "eos_token": "[EOS]",
        "add_bos_token": True, "add_eos_token": True, "pad_token": "[PAD]"}))
    work = tmp_path / "work"
    tokenizer = families._framed(d / "tokenizer.json", CONTEXT, "[PAD]", work / "t.json",
                                 families._tokenizer_config(d))[0]
    gateway = HfTokenizer(__import__("tokenizers").Tokenizer.from_file(str(work / "t.json")),
                          CONTEXT, "canonicalize")
    ids, _ = gateway.encode(["one two"])
    assert ids[0, 0] == 1 and 93 in ids[0].tolist()  # [UNK] stands in for <bos>, [EOS] for <eos>
    assert tokenizer.encode("one two").ids == ids[0, :len(tokenizer.encode("one two").ids)].tolist()
