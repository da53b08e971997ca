#!/usr/bin/env python3
"""Pack train_gpt.py into a self-extracting script that runs the same code in fewer bytes.

The challenge counts the bytes of the submitted train_gpt.py. The packed form is two lines: an
import, and an exec of the lzma-compressed, base85-encoded source. The source runs in the packed
file's own module namespace, so `__name__`, `__file__` and everything the script does are as
before; the script reads its own file to count code bytes, so a run of the packed form counts the
packed size.

    python3 tools/pack_code.py train_gpt.py -o train_gpt.packed.py
    python3 tools/pack_code.py --unpack records/.../train_gpt.py -o readable.py
"""
from __future__ import annotations

import argparse
import base64
import lzma
import re
import sys
from pathlib import Path
from typing import Optional

STUB_IMPORT = "import lzma,base64\n"
STUB_EXEC = 'exec(lzma.decompress(base64.b85decode("{payload}")))\n'
PAYLOAD = re.compile(r'\Aimport lzma,base64\nexec\(lzma\.decompress\(base64\.b85decode\("([^"]*)"\)\)\)\n\Z')


class PackError(Exception):
    pass


def pack(source: str) -> str:
    # The .lzma ("alone") container: a 13-byte header, and lzma.decompress recognises it unaided.
    compressed = lzma.compress(source.encode("utf-8"), format=lzma.FORMAT_ALONE, preset=9 | lzma.PRESET_EXTREME)
    packed = STUB_IMPORT + STUB_EXEC.format(payload=base64.b85encode(compressed).decode("ascii"))
    if unpack(packed) != source:
        raise PackError("the packed form does not decompress to the source")
    return packed


def is_packed(text: str) -> bool:
    return PAYLOAD.match(text) is not None


def unpack(packed: str) -> str:
    match = PAYLOAD.match(packed)
    if match is None:
        raise PackError("not a script written by pack_code.py (want its two-line import/exec stub)")
    return lzma.decompress(base64.b85decode(match.group(1))).decode("utf-8")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="script to pack (or, with --unpack, a packed script)")
    parser.add_argument("-o", "--out", required=True, help="file to write")
    parser.add_argument("--unpack", action="store_true", help="recover the readable source from a packed script")
    args = parser.parse_args(argv)
    try:
        text = Path(args.source).read_text(encoding="utf-8")
        result = unpack(text) if args.unpack else pack(text)
    except (OSError, UnicodeDecodeError, PackError, lzma.LZMAError, ValueError) as exc:
        print(f"pack_code.py: {args.source}: {exc}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(result, encoding="utf-8")
    before, after = len(text.encode("utf-8")), len(result.encode("utf-8"))
    print(f"{args.source}: {before} bytes -> {args.out}: {after} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
