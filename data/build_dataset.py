"""Build a dataset in the challenge's format from local text: a SentencePiece tokenizer and uint16 shards.

    python3 data/build_dataset.py --text notes/*.txt --vocab-size 1024 --val-docs 200 --out data/
    python3 data/build_dataset.py --jsonl docs.jsonl --tokenizer data/tokenizers/fineweb_8192_bpe.model --out data/
    python3 data/build_dataset.py --python-docs --vocab-size 1024 --out data/   # text every Python install has

Documents come from text files (one document per blank-line-separated block), JSONL files (a "text"
field per line), or `--python-docs` (the English documentation topics that ship with CPython's
pydoc). The first `--val-docs` documents are the validation split. Unless `--tokenizer` names an
existing model, a BPE tokenizer is trained on the training split with the challenge's settings
(byte fallback, split digits, nmt_nfkc, no dummy prefix, character coverage 0.999; pad 0, bos 1,
eos 2, unk 3). Every document
is written as BOS followed by its tokens (no EOS) into shards of at most `--shard-tokens` tokens:

    OUT/datasets/fineweb10B_sp{V}/fineweb_{train,val}_{000000..}.bin
    OUT/tokenizers/fineweb_{V}_bpe.model (+ .vocab)

which `train_gpt.py` reads with DATA_DIR=OUT VOCAB_SIZE=V.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
BOS_ID = 1


class BuildError(ValueError):
    """Bad input to the builder; the message names the file or option."""


# --- reading documents ---------------------------------------------------------------------------


def text_file_documents(path: Path) -> Iterator[str]:
    """Blank-line-separated blocks of a UTF-8 text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    for block in text.split("\n\n"):
        if block.strip():
            yield block.strip()


def jsonl_documents(path: Path, field: str) -> Iterator[str]:
    try:
        lines = path.open(encoding="utf-8")
    except OSError as exc:
        raise BuildError(f"{path}: cannot open ({exc})") from None
    with lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[field]
            except (ValueError, KeyError, TypeError):
                raise BuildError(f"{path}:{number}: expected a JSON object with a string field {field!r}") from None
            if not isinstance(text, str):
                raise BuildError(f"{path}:{number}: field {field!r} is not a string")
            if text.strip():
                yield text


def python_doc_documents() -> Iterator[str]:
    """CPython's pydoc topic texts: a few hundred documents of real English, on every Python install."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise BuildError("--python-docs: this Python has no pydoc_data.topics module") from None
    for name in sorted(topics):
        yield from (block.strip() for block in topics[name].split("\n\n\n") if block.strip())


def collect_documents(args) -> list[str]:
    docs = []
    for path in args.text or []:
        docs += text_file_documents(Path(path))
    for path in args.jsonl or []:
        docs += jsonl_documents(Path(path), args.jsonl_field)
    if args.python_docs:
        docs += python_doc_documents()
    if not docs:
        raise BuildError("no documents: give --text FILE..., --jsonl FILE... or --python-docs")
    return docs


# --- tokenizer and shards ------------------------------------------------------------------------


def train_tokenizer(docs: Iterable[str], prefix: Path, vocab_size: int, threads: int = 1,
                    character_coverage: float = 0.999) -> spm.SentencePieceProcessor:
    """BPE with the challenge's settings; writes PREFIX.model and PREFIX.vocab."""
    if vocab_size < 260:
        raise BuildError(f"--vocab-size {vocab_size}: byte fallback needs at least 256 byte pieces + 4 specials")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(docs), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
            pad_id=0, bos_id=BOS_ID, eos_id=2, unk_id=3, character_coverage=character_coverage,
            hard_vocab_limit=False, num_threads=threads, max_sentence_length=1 << 16, minloglevel=2)
    except RuntimeError as exc:
        raise BuildError(f"SentencePiece could not train a {vocab_size}-piece tokenizer on this text: {exc}; "
                         f"lower --character-coverage (byte fallback encodes the rarer characters)") from None
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """The challenge's shard: 256 little-endian int32 (magic, version, token count, zeros), then uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    with path.open("wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def encode_documents(sp: spm.SentencePieceProcessor, docs: list[str], batch: int = 256) -> Iterator[np.ndarray]:
    for i in range(0, len(docs), batch):
        for ids in sp.encode(docs[i:i + batch]):
            yield np.array([BOS_ID] + ids, dtype=np.uint16)


def write_split(sp: spm.SentencePieceProcessor, docs: list[str], directory: Path, split: str, shard_tokens: int) -> int:
    """Encode `docs` into shards fineweb_{split}_NNNNNN.bin of at most `shard_tokens` tokens; returns the token count."""
    pending, size, index, total = [], 0, 0, 0
    for doc in encode_documents(sp, docs):
        while len(doc):
            take = doc[:shard_tokens - size]
            pending.append(take)
            size += len(take)
            doc = doc[len(take):]
            if size == shard_tokens:
                write_shard(directory / f"fineweb_{split}_{index:06d}.bin", np.concatenate(pending))
                total, pending, size, index = total + size, [], 0, index + 1
    if size or index == 0:
        write_shard(directory / f"fineweb_{split}_{index:06d}.bin",
                    np.concatenate(pending) if pending else np.zeros(0, np.uint16))
        total += size
    return total


def build(docs: list[str], out: Path, vocab_size: int, val_docs: int, shard_tokens: int,
          tokenizer: Path | None = None, threads: int = 1, character_coverage: float = 0.999, log=print) -> dict:
    """The whole pipeline; returns counts and timings."""
    if not 0 < val_docs < len(docs):
        raise BuildError(f"--val-docs {val_docs}: need at least one validation and one training document "
                         f"out of {len(docs)}")
    val, train = docs[:val_docs], docs[val_docs:]
    model_path = out / "tokenizers" / f"fineweb_{vocab_size}_bpe.model"
    t0 = time.perf_counter()
    if tokenizer is None:
        sp = train_tokenizer(train, model_path.with_suffix(""), vocab_size, threads, character_coverage)
    else:
        if not tokenizer.is_file():
            raise BuildError(f"--tokenizer {tokenizer}: no such file")
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        if sp.vocab_size() != vocab_size:
            raise BuildError(f"--tokenizer {tokenizer} has {sp.vocab_size()} pieces, not --vocab-size {vocab_size}")
        model_path.parent.mkdir(parents=True, exist_ok=True)
        if tokenizer.resolve() != model_path.resolve():
            shutil.copyfile(tokenizer, model_path)
    tokenizer_s = time.perf_counter() - t0
    directory = out / "datasets" / f"fineweb10B_sp{vocab_size}"
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("fineweb_*.bin"):
        old.unlink()
    t1 = time.perf_counter()
    val_tokens = write_split(sp, val, directory, "val", shard_tokens)
    train_tokens = write_split(sp, train, directory, "train", shard_tokens)
    encode_s = time.perf_counter() - t1
    stats = dict(documents=len(docs), val_documents=len(val), train_tokens=train_tokens, val_tokens=val_tokens,
                 characters=sum(map(len, docs)), tokenizer_seconds=round(tokenizer_s, 2),
                 encode_seconds=round(encode_s, 2), docs_per_second=round(len(docs) / max(encode_s, 1e-9)),
                 tokens_per_second=round((train_tokens + val_tokens) / max(encode_s, 1e-9)))
    log(f"built {directory} and {model_path}: " + " ".join(f"{k}={v}" for k, v in stats.items()))
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", nargs="+", metavar="FILE", help="UTF-8 text files; blank lines separate documents")
    parser.add_argument("--jsonl", nargs="+", metavar="FILE", help="JSONL files, one document per line")
    parser.add_argument("--jsonl-field", default="text", help="the JSONL field holding the text (default: text)")
    parser.add_argument("--python-docs", action="store_true", help="use CPython's pydoc topic texts")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output DATA_DIR (default: data/)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="tokenizer size (default: 1024)")
    parser.add_argument("--tokenizer", type=Path, help="reuse this SentencePiece model instead of training one")
    parser.add_argument("--val-docs", type=int, default=50, help="the first N documents are validation (default: 50)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default: 1e8)")
    parser.add_argument("--threads", type=int, default=1, help="SentencePiece training threads")
    parser.add_argument("--character-coverage", type=float, default=0.999,
                        help="share of characters given their own piece (default 0.999, the challenge's)")
    args = parser.parse_args(argv)
    try:
        if args.shard_tokens <= 0:
            raise BuildError(f"--shard-tokens {args.shard_tokens}: must be positive")
        if args.vocab_size > 65536:
            raise BuildError(f"--vocab-size {args.vocab_size}: shards store uint16 tokens, so at most 65536")
        build(collect_documents(args), args.out, args.vocab_size, args.val_docs, args.shard_tokens,
              args.tokenizer, args.threads, args.character_coverage)
    except BuildError as exc:
        print(f"build_dataset.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
