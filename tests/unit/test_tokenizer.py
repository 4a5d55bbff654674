"""ClipTokenizer gives exactly open_clip.tokenize's ids, without torch at serving time.

The reference is the installed open_clip (export extra); these tests skip without it. The one
documented divergence, ftfy's heuristic mojibake repair, is asserted precisely: with that ftfy
step switched off inside open_clip, every text matches.
"""

from __future__ import annotations

import html
import random
import types

import numpy as np
import pytest
from tokenizers import Tokenizer

open_clip = pytest.importorskip("open_clip")
ftfy = pytest.importorskip("ftfy")
regex = pytest.importorskip("regex")

import open_clip.tokenizer as open_clip_tokenizer  # noqa: E402

from clipserve import tokenizer as tokenizer_module  # noqa: E402
from clipserve.tokenizer import ClipTokenizer, clean_text, write_tokenizer_json  # noqa: E402

SOT, EOT = 49406, 49407
REFERENCE = open_clip_tokenizer._tokenizer  # the SimpleTokenizer behind open_clip.tokenize


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    return write_tokenizer_json(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


def ours(path, texts, context_length):
    return ClipTokenizer.from_file(path, context_length).encode(texts)


def reference(texts, context_length):
    ids = open_clip.tokenize(list(texts), context_length=context_length).numpy()
    truncated = [len(REFERENCE.encode(text)) + 2 > context_length for text in texts]
    return ids, truncated


def mismatched(texts, ids, want_ids) -> list[str]:
    return [text for text, row, want in zip(texts, ids, want_ids) if row.tolist() != want.tolist()]


def without_mojibake_repair(monkeypatch):
    """open_clip with ftfy's fix_encoding step off: the cleaning clipserve reproduces."""
    fix_text = ftfy.fix_text
    monkeypatch.setattr(open_clip_tokenizer, "ftfy", types.SimpleNamespace(
        fix_text=lambda text: fix_text(text, fix_encoding=False)))


def mojibake_repaired(text: str) -> bool:
    return ftfy.fix_text(text) != ftfy.fix_text(text, fix_encoding=False)


CORPUS = [
    "a photo of the digit seven",
    "A Photo Of The DIGIT Seven",
    "a photo of a cat.",
    "Hello, world! How are you? (fine); [ok] {yes} -- 100% #1 @home $5 a/b\\c",
    "...!!!???,,,;;;",
    "3.14159 and 2024-06-01 and 1,000,000 and 42nd",
    "it's they're we've I'm you'll he'd don't",
    "IT'S THEY'RE WE'VE I'M YOU'LL HE'D DON'T",
    "it\u2019s a \u201cquoted\u201d word \u2018here\u2019",
    "caf\u00e9 na\u00efve \u00c5ngstr\u00f6m Stra\u00dfe \u00e7a va",
    "cafe\u0301 decomposed accent (NFC makes it \u00e9)",
    "\u6771\u4eac\u306e\u5199\u771f \ud55c\uad6d\uc5b4 \u4e2d\u6587",
    "\uff33\uff54\uff41\uff52\u3000\uff57\uff49\uff44\uff54\uff48\uff01 \uff76\uff9e",
    "\ufb01sh \ufb02ower \ufb06ar \u0133",
    "emoji \U0001F642 \U0001F44D\U0001F3FD \U0001F468\u200d\U0001F469\u200d\U0001F467",
    "  extra   spaces\tand\ttabs\nand\nnewlines\r\nand\u00a0nbsp\u2028  ",
    "\n\n\t  \r\n",
    "",
    "Tom &amp; Jerry &lt;3 &gt; &quot;x&quot; &#39;y&#39; &#x2019; &rsquo; &EACUTE;",
    "double &amp;amp; escaped &amp;lt;b&amp;gt;",
    "a <b>tag</b> line keeps &rsquo; for html.unescape\nnext line &rsquo; too",
    "first line &rsquo;\nsecond <line> &rsquo;",
    "\x1b[31mred\x1b[0m and \x00nul \x07bell \x7fdel \ufeffbom",
    "c1 \x93quoted\x94 \x85 \x81",
    "the <start_of_text> and <end_of_text> tokens",
    "x<<start_of_text>y <end_of_text><start_of_text> <START_OF_TEXT> <\u017ftart_of_text>",
    "it'\u017f long s, \u017f alone, ' alone, 's, 'x",
    "\u03a3\u039f\u03a6\u039f\u03a3 \u1fb3 \u03b1\u0345 k\u0345 \u0130stanbul \u0131",
    "\u0558 \U00011de0 \U00031350 \u0663\u0968 \u216b \u00bd \u00b2",
    "\U0010fffd private \ue000 unassigned \U000e01ef \ufffd",
]
LONG = "a photo of a very long caption that keeps going " * 30


@pytest.mark.parametrize("context_length", [16, 77])
def test_corpus_matches_open_clip(tokenizer_json, context_length):
    ids, truncated = ours(tokenizer_json, CORPUS + [LONG], context_length)
    want_ids, want_truncated = reference(CORPUS + [LONG], context_length)
    assert ids.dtype == np.int32 and ids.shape == (len(CORPUS) + 1, context_length)
    for text, row, want_row in zip(CORPUS + [LONG], ids, want_ids):
        assert row.tolist() == want_row.tolist(), repr(text)
    assert truncated == want_truncated
    # The corpus exercises both outcomes at both lengths.
    assert any(truncated) and not all(truncated)


def test_special_ids_and_empty_text(tokenizer_json):
    tokenizer = ClipTokenizer.from_file(tokenizer_json, 77)
    assert (tokenizer.sot_id, tokenizer.eot_id) == (SOT, EOT)
    ids, truncated = tokenizer.encode([""])
    assert ids[0, :2].tolist() == [SOT, EOT] and not ids[0, 2:].any()
    assert truncated == [False]


def test_spelled_special_tokens_become_special_ids(tokenizer_json):
    # open_clip's regex yields "<start_of_text>" as one piece, mapped to the special id.
    text = "a <start_of_text> b <end_of_text>"
    ids, _ = ours(tokenizer_json, [text], 77)
    assert ids[0, :6].tolist() == [SOT, 320, SOT, 321, EOT, EOT]  # a, b: 320, 321
    assert ids.tolist() == reference([text], 77)[0].tolist()


@pytest.mark.parametrize("context_length", [16, 77])
def test_long_text_truncates_the_clip_way(tokenizer_json, context_length):
    ids, truncated = ours(tokenizer_json, [LONG], context_length)
    assert truncated == [True]
    assert ids[0, 0] == SOT and ids[0, -1] == EOT and (ids[0] != 0).all()
    assert ids.tolist() == reference([LONG], context_length)[0].tolist()


@pytest.mark.parametrize("context_length", [16, 77])
def test_truncation_boundary(tokenizer_json, context_length):
    cat = REFERENCE.encode("cat")
    assert len(cat) == 1 and len(REFERENCE.encode("cat " * 5)) == 5  # one token per word
    fits = "cat " * (context_length - 2)
    overflows = "cat " * (context_length - 1)
    ids, truncated = ours(tokenizer_json, [fits, overflows], context_length)
    assert truncated == [False, True]
    assert ids[0].tolist() == [SOT] + cat * (context_length - 2) + [EOT]
    assert ids[1].tolist() == [SOT] + cat * (context_length - 2) + [EOT]
    assert ids.tolist() == reference([fits, overflows], context_length)[0].tolist()


# Random texts: mostly pieces chosen to hit every cleaning and regex rule, some arbitrary code
# points (any plane, surrogates included).
PIECES = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list(" .,!?;:-_()[]{}<>/\\@#$%^&*+='\"`~|")
    + list(" \t\n\r\x0b\x0c\x85\xa0\u2028\u2029\u3000\u200b\u180e\ufeff")
    + list("\x00\x01\x1b\x7f")
    + [chr(cp) for cp in range(0x80, 0x100)]
    + list("\u017f\ufb06\ufb05\ufb01\u0133\u01c5")
    + list("\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f\u02bc")
    + [chr(cp) for cp in range(0xFF01, 0xFF70, 3)]
    + list("\uff76\uff9e\u0301\u0345\u0308\u0327")
    + list("\u1fb3\u03b1\u03a3\u03c3\u03c2\u0130\u0131\u00df\u1e9e")
    + list("\u6771\u4eac\u65e5\u672c\ud55c\uad6d\u3131\u0663\u0968\u216b\u00bd\u00b2\u0558")
    + ["\U0001F642", "\U0001F44D\U0001F3FD", "\U0001F468\u200d\U0001F469", "\ud83d", "\ude42",
       "\U00011de0", "\U00031350"]
    + ["&amp;", "&lt;", "&gt;", "&#39;", "&EACUTE;", "&#x2019;", "&rsquo;", "&amp;lt;", "&nbsp;",
       "&#128;", "&#0;", "&", "#", ";"]
    + ["<start_of_text>", "<end_of_text>", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'\u017f",
       "\x1b[31m", "\r\n"]
)


def random_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 40)):
            if rng.random() < 0.85:
                parts.append(rng.choice(PIECES))
            else:
                parts.append(chr(rng.randrange(0x110000)))
        texts.append("".join(parts))
    return texts


RANDOM_TEXTS = random_texts(seed=1234, count=400)


def test_random_texts_match_open_clip(tokenizer_json):
    # Everything except what ftfy's mojibake heuristic rewrites (the documented divergence).
    texts = [text for text in RANDOM_TEXTS if not mojibake_repaired(text)]
    assert len(texts) >= 300
    ids, truncated = ours(tokenizer_json, texts, 77)
    want_ids, want_truncated = reference(texts, 77)
    assert mismatched(texts, ids, want_ids) == []
    assert truncated == want_truncated


def test_random_texts_match_open_clip_without_mojibake_repair(tokenizer_json, monkeypatch):
    # The divergence is exactly ftfy's fix_encoding step: switch it off and every text matches.
    assert any(mojibake_repaired(text) for text in RANDOM_TEXTS)
    without_mojibake_repair(monkeypatch)
    ids, truncated = ours(tokenizer_json, RANDOM_TEXTS, 77)
    want_ids, want_truncated = reference(RANDOM_TEXTS, 77)
    assert mismatched(RANDOM_TEXTS, ids, want_ids) == []
    assert truncated == want_truncated


def test_mojibake_is_the_known_divergence(tokenizer_json, monkeypatch):
    text = "caf\u00c3\u00a9 au lait"  # "café" encoded as UTF-8 and read as Latin-1
    assert mojibake_repaired(text)
    ids, _ = ours(tokenizer_json, [text], 77)
    assert ids.tolist() != reference([text], 77)[0].tolist()  # open_clip repairs it to "café"
    without_mojibake_repair(monkeypatch)
    assert ids.tolist() == reference([text], 77)[0].tolist()


def test_clean_text_matches_ftfy_without_fix_encoding():
    for text in CORPUS + RANDOM_TEXTS:
        fixed = html.unescape(html.unescape(ftfy.fix_text(text, fix_encoding=False))).strip()
        assert clean_text(text) == " ".join(fixed.split()).lower(), repr(text)


def test_pre_tokenizer_matches_open_clip_regex_across_unicode(tokenizer_json):
    # The serving regex engine has its own (older) Unicode tables; the JSON spells out open_clip's
    # classes. Every code point below U+3400 and every 5th above, each in a few contexts
    # (the whole range was checked once outside the suite; it takes a minute here).
    code_points = [cp for cp in range(0x110000)
                   if not 0xD800 <= cp < 0xE000 and (cp < 0x3400 or cp % 5 == 0)]
    text = "".join(chr(cp) + " " + chr(cp) + chr(cp) + "a1'" + chr(cp) for cp in code_points)
    pre_tokenizer = Tokenizer.from_file(str(tokenizer_json)).pre_tokenizer
    pieces = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]
    to_bytes = REFERENCE.byte_encoder  # open_clip byte-encodes each regex piece before its BPE
    want = ["".join(to_bytes[b] for b in piece.encode())
            for piece in regex.findall(REFERENCE.pat, text)]
    assert pieces == want


def test_encode_rejects_a_single_string_and_handles_an_empty_batch(tokenizer_json):
    tokenizer = ClipTokenizer.from_file(tokenizer_json, 16)
    with pytest.raises(TypeError):
        tokenizer.encode("a photo")
    ids, truncated = tokenizer.encode([])
    assert ids.shape == (0, 16) and ids.dtype == np.int32 and truncated == []


def test_context_length_below_two_is_rejected(tokenizer_json):
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer.from_file(tokenizer_json, 1)


def test_export_refuses_an_unknown_open_clip_regex(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "OPEN_CLIP_PATTERN", r"'s|'t|[\p{L}]+")
    with pytest.raises(RuntimeError, match="regex"):
        write_tokenizer_json(tmp_path / "tokenizer.json")
