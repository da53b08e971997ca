#!/usr/bin/env python3
"""Measure the counted code size of train_gpt.py under other minifier options, coders and encodings.

The chosen wrapper is train_gpt.py's own `counted_code`; every other row changes one choice, so the
table says what each choice is worth. Each size is the whole file a submission would be (stub
included), except the latin-1 row, an estimate of a non-UTF-8 file that is not used.

    python3 tools/compare_packing.py [train_gpt.py]
"""
from __future__ import annotations

import base64
import lzma
import sys
from pathlib import Path
from typing import Callable

import brotli
import python_minifier

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402

# python-minifier settings that change exactly one option against the one train_gpt.py uses
OURS = dict(remove_literal_statements=True, rename_locals=True, rename_globals=False, hoist_literals=False)
RECORDS_A = dict(OURS, rename_locals=False)  # --no-rename-locals --no-hoist-literals --remove-literal-statements
RECORDS_B = dict(RECORDS_A, remove_asserts=True, prefer_single_line=True)
LZMA_PREFIX, LZMA_SUFFIX = 'import lzma,base64\nexec(lzma.decompress(base64.b85decode("', '")))\n'
RAW_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 0, "pb": 0}]
RAW_SUFFIX = '"),lzma.FORMAT_RAW,None,[{"id":lzma.FILTER_LZMA2,"lc":3,"lp":0,"pb":0}]))\n'


def lzma_alone(code: bytes, preset: int = 9 | lzma.PRESET_EXTREME) -> str:
    data = lzma.compress(code, format=lzma.FORMAT_ALONE, preset=preset)
    return LZMA_PREFIX + base64.b85encode(data).decode() + LZMA_SUFFIX


def lzma_raw(code: bytes) -> str:
    data = lzma.compress(code, format=lzma.FORMAT_RAW, filters=RAW_FILTERS)
    return LZMA_PREFIX + base64.b85encode(data).decode() + RAW_SUFFIX


def brotli_b64(code: bytes) -> str:
    prefix = tg.WRAPPER_PREFIX.replace("b85decode", "b64decode")
    return prefix + base64.b64encode(brotli.compress(code, quality=11)).decode() + tg.WRAPPER_SUFFIX


def brotli_latin1_estimate(code: bytes) -> int:
    # raw bytes in a latin-1 string literal: one byte each, two for the five that need an escape
    data = brotli.compress(code, quality=11)
    stub = '# coding:latin-1\nimport brotli\nexec(brotli.decompress("".encode("latin-1")))\n'
    return len(stub) + len(data) + sum(data.count(c) for c in b'\0\r\n\\"')


def rows(source: str) -> list[tuple[str, Callable[[], int]]]:
    def minified(**options) -> bytes:
        return python_minifier.minify(source, **options).encode()

    raw, ours = source.encode(), tg.minify_source(source).encode()
    only_docstrings = dict(OURS, rename_locals=False, remove_annotations=False, combine_imports=False,
                           remove_pass=False, constant_folding=False, remove_explicit_return_none=False)
    return [
        ("readable source", lambda: len(raw)),
        ("no minifier, lzma-alone 9e + b85 (previous packer)", lambda: len(lzma_alone(raw))),
        ("no minifier, brotli-11 + b85 (fallback)", lambda: len(tg.wrap_code(source))),
        ("pyminify docstrings only, brotli-11 + b85", lambda: len(tg.wrap_code(minified(**only_docstrings).decode()))),
        ("records A: pyminify no-rename, lzma preset 6 + b85", lambda: len(lzma_alone(minified(**RECORDS_A), 6))),
        ("records B: pyminify no-rename, brotli-11 + b85", lambda: len(tg.wrap_code(minified(**RECORDS_B).decode()))),
        ("ours: + rename_locals, brotli-11 + b85 (counted)", lambda: tg.counted_code(source).size),
        ("ours, lzma-alone 9e + b85", lambda: len(lzma_alone(ours))),
        ("ours, lzma-raw lc3 lp0 pb0 + b85", lambda: len(lzma_raw(ours))),
        ("ours, brotli-11 + base64", lambda: len(brotli_b64(ours))),
        ("ours + hoist_literals", lambda: len(tg.wrap_code(minified(**OURS | {"hoist_literals": True}).decode()))),
        ("ours + rename_globals (unsafe: logged class names)",
         lambda: len(tg.wrap_code(minified(**OURS | {"rename_globals": True}).decode()))),
        ("ours, brotli-11 raw bytes in latin-1 (estimate, unused)", lambda: brotli_latin1_estimate(ours)),
    ]


def main(argv: list[str]) -> int:
    source = Path(argv[0] if argv else tg.__file__).read_text(encoding="utf-8")
    print("| variant | bytes |\n|---|---:|")
    for name, size in rows(source):
        print(f"| {name} | {size():,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
