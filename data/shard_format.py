"""The challenge's shard format, defined once for data/ (train_gpt.py keeps its own copy; a test checks they agree).

A shard is 256 little-endian int32 -- magic, version, token count, then zeros -- followed by that many
little-endian uint16 values: token ids, or, in a CaseOps byte sidecar, each token's original UTF-8 bytes.
"""

from pathlib import Path

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4


def write_shard(path: Path, values: np.ndarray) -> None:
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(values)
    with path.open("wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(values, dtype="<u2").tobytes())


def shard_is_valid(path: Path) -> bool:
    """Header magic/version and a file size that matches the header's value count."""
    if not path.is_file() or path.stat().st_size < SHARD_HEADER_BYTES:
        return False
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    return (header.size == SHARD_HEADER_INTS and header[0] == SHARD_MAGIC and header[1] == SHARD_VERSION
            and path.stat().st_size == SHARD_HEADER_BYTES + 2 * int(header[2]))
