#!/usr/bin/env python3
"""Write the self-extracting wrapper that a run of train_gpt.py counts as its code size.

The challenge counts the bytes of the submitted train_gpt.py. A run of the readable script logs as
`Code size` the bytes of a two-line wrapper of itself: the source minified with python-minifier,
brotli-compressed (quality 11) and base85-encoded inside `exec(...)`. This tool calls the same
function (`counted_code` in train_gpt.py), so the file it writes is byte for byte the one the run
counted. The wrapper runs in its own module namespace, so `__name__`, `__file__` and everything the
script does are as before, and a run of the wrapper counts its own bytes: the same number.

Without python-minifier the wrapper holds the unminified source (larger; a warning says so), exactly
as a run without it counts.

    python3 tools/pack_code.py train_gpt.py -o packed/train_gpt.py
    python3 tools/pack_code.py --unpack packed/train_gpt.py -o minified.py
"""
from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Optional

import brotli

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402


class PackError(Exception):
    pass


def pack(source: str) -> tg.CountedCode:
    if tg.is_wrapper(source):
        raise PackError("already a packed wrapper (it counts its own bytes; pack the readable source instead)")
    return tg.counted_code(source)


def is_packed(text: str) -> bool:
    return tg.is_wrapper(text)


def unpack(packed: str) -> str:
    """The code the wrapper runs: the minified source (or the source itself, if it was packed unminified)."""
    if not tg.is_wrapper(packed):
        raise PackError("not a wrapper written by pack_code.py (want its two-line brotli/base85 import/exec stub)")
    payload = packed[len(tg.WRAPPER_PREFIX):-len(tg.WRAPPER_SUFFIX)]
    return brotli.decompress(base64.b85decode(payload)).decode("utf-8")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="script to pack (or, with --unpack, a packed script)")
    parser.add_argument("-o", "--out", required=True, help="file to write")
    parser.add_argument("--unpack", action="store_true",
                        help="write the code a packed script runs: the MINIFIED source, not the readable original")
    args = parser.parse_args(argv)
    try:
        text = Path(args.source).read_text(encoding="utf-8")
        if args.unpack:
            result = unpack(text)
        else:
            counted = pack(text)
            if counted.method == tg.CODE_UNMINIFIED:
                print("pack_code.py: WARNING: python-minifier is not installed (pip install python-minifier); "
                      "packing the unminified source", file=sys.stderr)
            result = counted.text
    except (OSError, UnicodeDecodeError, PackError, brotli.error, ValueError) as exc:
        print(f"pack_code.py: {args.source}: {exc}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(result, encoding="utf-8")
    before, after = len(text.encode("utf-8")), len(result.encode("utf-8"))
    print(f"{args.source}: {before} bytes -> {args.out}: {after} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
