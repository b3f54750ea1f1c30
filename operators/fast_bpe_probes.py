"""Probe texts that a fast BPE core must encode exactly like the library before it is used.

Chosen where regex splitting and BPE differ between implementations: every script
(Unicode tables of onig, fancy-regex and the regex crate), combining marks (\\p{M} is a
letter for o200k, "other" for cl100k), whitespace runs and unicode spaces (the
`\\s+(?!\\S)` rule riptoken re-implements), digit runs (`\\p{N}{1,3}`), contractions,
special-looking text (must stay text), control and astral characters, long pieces of
>= 500 bytes (riptoken's inexact heap path, which the guard must catch), and lone
surrogates (tiktoken replaces them, HF raises). About 90 KB; the library encodes it
in well under 0.1 s.
"""
from __future__ import annotations

import random

_SCRIPTS = [
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!",
    "It's John's; they'll we've I'm you'd can't IT'S JOHN'S THEY'LL WE'VE I'M YOU'D 'S 'll",
    "Ça va? Œuvre, naïve café, Straße, ĳ, Ångström, Dvořák, Łódź, Việt Nam, Tiếng Việt có dấu",
    "Pneumonoultramicroscopicsilicovolcanoconiosis Donaudampfschifffahrtsgesellschaftskapitän",
    "中文分词测试：我们今天去北京天安门广场，看升旗仪式。《红楼梦》是一部小说。",
    "日本語のテキスト、カタカナとひらがな。東京都渋谷区。ｶﾀｶﾅ半角。",
    "한국어 텍스트입니다. 안녕하세요! 조합형 자모: \u1100\u1161\u11a8 호환 자모: ㄱㅏ",
    "العربية: مرحبا بالعالم، كيف حالك؟ ١٢٣٤٥ \u0627\u064e\u0644\u0652",
    "עברית: שלום עולם! אני כותב מימין לשמאל.",
    "हिन्दी: नमस्ते दुनिया, यह देवनागरी लिपि है। क्षत्रिय ज्ञान",
    "ไทย: สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "বাংলা ভাষা, தமிழ் மொழி, ગુજરાતી, ಕನ್ನಡ, മലയാളം, ພາສາລາວ, ትግርኛ, ᏣᎳᎩ",
    "Русский текст: Съешь же ещё этих мягких французских булок. Ελληνικά: Γειά σου κόσμε.",
    "Emoji: 😀😃 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ ☺︎ 🏳️‍🌈 🧑🏿‍🚀 *️⃣ 🫠",
    "Combining: e\u0301 a\u0308\u0304 o\u0302\u0323 Z\u0351\u0352\u0353a\u0354\u0355l\u0356g\u0357o \u0301start",
    "Digits: 0 12 345 6789 1234567890 3.14159 1,000,000 -42 +7e10 0x1F ٠١٢٣ ١٢ ۴۵ १२३ １２３ ²³ ½ Ⅻ 〇",
    "Math: ∀x∈ℝ, ∑ᵢ xᵢ² ≤ ∫₀^∞ e^{-t} dt; \\frac{a}{b} \\mathbb{N} $$\\alpha+\\beta$$",
    "Code: def f(x):\n    return {'a': [1, 2, 3], \"b\": None}  # comment\n\tif x != 0: pass\n",
    "URL https://example.com/path?q=1&r=two#frag mail: a.b@c.org <a href=\"x\">link</a>",
    "<|endoftext|> </s> <s> <|im_start|>user\nhi<|im_end|> [CLS] [SEP] <pad> <unk> <|begin_of_text|>",
    "<|endoftext|><|endoftext|>", "endoftext", "<|", "|>", "</", "s>",
]
_WHITESPACE = [
    "", " ", "  ", "\n", "\n\n", "\r\n", "\r\n\r\n", "\t", "\t\t\tx", " \t \n \r\n x", "trailing   ",
    "   leading", "a  b   c    d", "a \n b", "a\n \nb", "x\u00a0y\u2003z\u3000w\u2028v\u0085u\u202fw",
    "\u00a0\u00a0a", "tab\tsep\tvalues\t", "line\vfeed\fform", "a\u200bb\ufeffc", "end\n",
    "    indented\n        more\n", "\n\n\n\nparagraph\n\n\n", " \r\n \r\n", "\u3000\u3000全角",
]
_EDGE = [
    "'", "''", "'s", "a'", "'ll've're", "x's's", "\x00", "a\x00b", "\x1c\x1d\x1e\x1f", "\x7f\x80\x9f",
    "\ue000\uf8ff", "\uffff\ufffe", "\ufffd", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀀𠀁 𝟘𝟙𝟚", "hello世界123abc!!", "A1b2C3", "___init___",
    "...", "?!?!", "—–-‐", "«»“”‘’", "ﬁ ﬂ", "ǅ ǈ", "Ⓐⓑ", "\u0300", "\U000e0001\U000e0041",
]
# >= 500-byte pieces and near misses: riptoken's heap path (rank ties) must be caught.
_LONG = [
    " " * 600, " " * 499 + "x", "\n" * 600, " \n" * 300, "    \n" * 200, "\t" * 520, "\u3000" * 200,
    "=" * 600, "-" * 1000, "a" * 700, "ab" * 400, "abc" * 300, "é" * 300, "e\u0301" * 260, "的" * 300,
    "1" * 600, "12" * 300, "٣" * 300, "😀" * 150, "x" * 499, "ab" * 249, "-" * 499 + "\n" * 100,
    "word " * 200, "(" * 300 + ")" * 300, "Lorem" * 120 + " end",
    "                                                 \n" + ("                                                 "
                                                             "                         \n") * 7,
]
_SURROGATES = ["a\ud800b", "\udfff", "x\ud83d", "\ud83d\ude00 lone\udc00 pair"]


def _mixed(n: int, seed: int = 0) -> list[str]:
    """Random concatenations of the fragments above: boundaries between classes and scripts."""
    rng = random.Random(seed)
    frags = _SCRIPTS + _WHITESPACE + _EDGE + [s[:rng.randint(1, 40)] for s in _SCRIPTS]
    return ["".join(rng.choice(frags) for _ in range(rng.randint(2, 12))) for _ in range(n)]


PROBE_TEXTS: list[str] = _SCRIPTS + _WHITESPACE + _EDGE + _LONG + _SURROGATES + _mixed(300)
