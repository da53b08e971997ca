"""CaseOps: a lossless text transform that moves letter case into operator characters, and byte sidecars.

The transform rewrites every maximal run of ASCII letters [A-Za-z]+ (everything else passes through):

    an all-lowercase word           unchanged                      the     -> the
    an all-uppercase word (len >= 2) ALLCAPS + lowercase            NASA    -> ALLCAPS nasa
    Capitalized (also one capital)  TITLE + lowercase              Hello   -> TITLE hello, I -> TITLE i
    any other mix                   [TITLE] + each later capital   iPhone  -> i CAPNEXT p hone
                                    as CAPNEXT + its lowercase     McD     -> TITLE m c CAPNEXT d

and a literal operator character in the input becomes ESC + that character. The operators are the
private-use characters U+E001..U+E004, made user symbols of the tokenizer (ids 4..7), so a model sees
"capitalize" as one token instead of a separate vocabulary of capitalized pieces.

Bits per byte must still be charged on the original text's bytes. `SidecarCounter` gives each token the
number of original UTF-8 bytes it stands for (operators 0, an escaped literal its own 3 bytes); the
builder writes those counts as `fineweb_val_bytes_NNNNNN.bin` beside each validation shard, and
train_gpt.py sums them instead of using the tokenizer's byte table. Names follow the public
`romeerp/parameter-golf-caseops-v1` dataset (see VARIANT_SUFFIX).
"""

import re

import numpy as np
import sentencepiece as spm

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
VARIANT_SUFFIX = "_lossless_caps_caseops_v1_reserved"  # fineweb10B_sp8192<suffix>/, fineweb_8192_bpe<suffix>.model
OPERATOR_BYTES = len(TITLE.encode("utf-8"))  # every operator is a 3-byte character

# Only words holding a capital need rewriting; lowercase words are left to the regex engine untouched.
_ENCODE = re.compile(r"[A-Za-z]*[A-Z][A-Za-z]*|[\ue001-\ue004]")
# Well-formed operator uses, then any other operator (which is malformed).
_DECODE = re.compile(r"\ue004[\ue001-\ue004]|\ue002[a-z]+|[\ue001\ue003][a-z]|[\ue001-\ue004]")


class CaseOpsError(ValueError):
    """Text that no encode() output can be: an operator with nothing to apply to."""


def _encode_word(word: str) -> str:
    lower = word.lower()
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    if word[0].isupper() and word[1:].islower() or len(word) == 1:
        return TITLE + lower
    head = TITLE + lower[0] if word[0].isupper() else word[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


def _encode_match(match: re.Match) -> str:
    text = match.group()
    return ESC + text if text in OPERATORS else _encode_word(text)


def encode(text: str) -> str:
    """The CaseOps form of `text`: no ASCII capitals, case carried by operator characters."""
    return _ENCODE.sub(_encode_match, text)


def _decode_match(match: re.Match) -> str:
    text = match.group()
    if len(text) > 1:  # the regex only lets well-formed uses through with their argument
        return text[1:] if text[0] == ESC else text[1:].upper()
    raise CaseOpsError(f"operator U+{ord(text):04X} at character {match.start()} has nothing to apply to: "
                       f"{match.string[max(0, match.start() - 20):match.start() + 20]!r}")


def decode(text: str) -> str:
    """The inverse of encode(): decode(encode(s)) == s for every string s."""
    return _DECODE.sub(_decode_match, text)


# --- byte sidecars --------------------------------------------------------------------------------


def original_char_bytes(transformed: str) -> np.ndarray:
    """For each character of an encoded text, the UTF-8 bytes it stands for in the original text."""
    cp = np.frombuffer(transformed.encode("utf-32-le"), dtype="<u4")
    counts = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    is_op = (cp >= 0xE001) & (cp <= 0xE004)
    counts[is_op] = 0
    escaped_at = -1
    for i in np.flatnonzero(is_op):  # ESC makes the next operator a literal; ESC ESC is a literal ESC
        if i == escaped_at:
            counts[i] = OPERATOR_BYTES
        elif cp[i] == ord(ESC):
            escaped_at = i + 1
    return counts


class SidecarCounter:
    """Per-token original bytes for a tokenizer whose pieces spell its input exactly.

    A piece covers len(piece) characters of the encoded text ("▁" is one character: a space, or a
    literal U+2581 -- which decodes as a space, so the counts, not the decoded text, are the truth);
    byte-fallback tokens count one byte each. That holds for the tokenizer build_dataset --caseops
    trains (identity normalization, whitespace kept); `counts` checks it on every document.
    """

    def __init__(self, sp: spm.SentencePieceProcessor):
        missing = [f"U+{ord(op):04X}" for op in OPERATORS if sp.piece_to_id(op) == sp.unk_id()]
        if missing:
            raise CaseOpsError(f"the tokenizer lacks the CaseOps operators {', '.join(missing)} as pieces; "
                               f"train it with them as user-defined symbols")
        n = sp.vocab_size()
        self.sp = sp
        self.is_byte = np.array([sp.is_byte(i) for i in range(n)])
        self.chars = np.zeros(n, dtype=np.int64)
        for i in range(n):
            if self.is_byte[i]:
                self.chars[i] = (int(sp.id_to_piece(i)[1:-1], 16) & 0xC0) != 0x80  # a lead byte starts a character
            elif not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
                self.chars[i] = len(sp.id_to_piece(i))

    def counts(self, ids: list[int], transformed: str, where: str) -> np.ndarray:
        """Original UTF-8 bytes of each token of `ids` = the tokenization of `transformed`."""
        ids = np.asarray(ids, dtype=np.int64)
        char_bytes = original_char_bytes(transformed)
        ends = np.cumsum(self.chars[ids])
        if (ends[-1] if len(ids) else 0) != len(char_bytes) or \
                self.sp.decode(ids.tolist()) != transformed.replace("\u2581", " "):
            raise CaseOpsError(f"{where}: the tokenizer does not spell the encoded text exactly (it normalizes "
                               f"or drops characters), so its tokens cannot be given original byte counts; "
                               f"use a tokenizer trained by build_dataset.py --caseops")
        cum = np.concatenate([[0], np.cumsum(char_bytes)])
        counts = cum[ends] - cum[ends - self.chars[ids]]
        counts[self.is_byte[ids]] = 1
        return counts
