"""Build a dataset in the challenge's format from local text: a SentencePiece tokenizer and uint16 shards.

    python3 data/build_dataset.py --text notes/*.txt --vocab-size 1024 --val-docs 200 --out data/
    python3 data/build_dataset.py --jsonl docs.jsonl --tokenizer data/tokenizers/fineweb_8192_bpe.model --out data/
    python3 data/build_dataset.py --python-docs --vocab-size 1024 --out data/   # text every Python install has
    python3 data/build_dataset.py --text notes/*.txt --caseops --vocab-size 8192 --val-docs 200 --out data/

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

With --caseops every document is first rewritten by the CaseOps transform (data/caseops.py), the
tokenizer gets the four operators as user symbols (ids 4..7) and spells its input exactly (identity
normalization, whitespace kept), and each validation shard gets a byte sidecar: the original UTF-8
bytes of each token, so that bits per byte are charged on the text before the transform.

    OUT/datasets/fineweb10B_sp{V}_lossless_caps_caseops_v1_reserved/fineweb_{train,val,val_bytes}_*.bin
    OUT/tokenizers/fineweb_{V}_bpe_lossless_caps_caseops_v1_reserved.model

which `train_gpt.py` reads with DATA_DIR=OUT VOCAB_SIZE=V CASEOPS_ENABLED=1.
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

if __package__:  # imported as data.build_dataset (the tests)
    from . import caseops
    from .shard_format import write_shard
else:  # run as python3 data/build_dataset.py: data/ is on sys.path
    import caseops
    from shard_format import write_shard

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
                    character_coverage: float = 0.999, caseops_symbols: bool = False) -> spm.SentencePieceProcessor:
    """BPE with the challenge's settings; writes PREFIX.model and PREFIX.vocab.

    With `caseops_symbols` the CaseOps operators are user symbols (ids 4..7, always one token each) and
    the text is neither normalized nor stripped of repeated whitespace, so that the pieces spell the
    encoded text exactly and every token's original bytes are known (see caseops.SidecarCounter).
    """
    if vocab_size < 260:
        raise BuildError(f"--vocab-size {vocab_size}: byte fallback needs at least 256 byte pieces + 4 specials")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(docs), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, add_dummy_prefix=False,
            normalization_rule_name="identity" if caseops_symbols else "nmt_nfkc",
            remove_extra_whitespaces=not caseops_symbols,
            user_defined_symbols=list(caseops.OPERATORS) if caseops_symbols else [],
            pad_id=0, bos_id=BOS_ID, eos_id=2, unk_id=3, character_coverage=character_coverage,
            hard_vocab_limit=False, num_threads=threads, max_sentence_length=1 << 16, minloglevel=2)
    except RuntimeError as exc:
        raise BuildError(f"SentencePiece could not train a {vocab_size}-piece tokenizer on this text: {exc}; "
                         f"lower --character-coverage (byte fallback encodes the rarer characters)") from None
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def encode_documents(sp: spm.SentencePieceProcessor, docs: list[str], threads: int,
                     batch: int = 256) -> Iterator[np.ndarray]:
    """One row per document: BOS followed by its tokens."""
    for i in range(0, len(docs), batch):
        for ids in sp.encode(docs[i:i + batch], num_threads=threads):
            yield np.array([[BOS_ID] + ids], dtype=np.int64)


def encode_with_sidecar(sp: spm.SentencePieceProcessor, encoded_docs: list[str], threads: int,
                        batch: int = 256) -> Iterator[np.ndarray]:
    """Two rows per CaseOps document: BOS + tokens, and each token's original UTF-8 bytes (BOS: 0)."""
    counter = caseops.SidecarCounter(sp)
    for i in range(0, len(encoded_docs), batch):
        for j, ids in enumerate(sp.encode(encoded_docs[i:i + batch], num_threads=threads)):
            counts = counter.counts(ids, encoded_docs[i + j], f"validation document {i + j}")
            yield np.array([[BOS_ID] + ids, [0, *counts]], dtype=np.int64)


def write_split(rows: Iterator[np.ndarray], directory: Path, names: list[str], shard_tokens: int) -> int:
    """Write parallel streams (row k of every document goes to NAMES[k]_NNNNNN.bin) in shards of at most
    `shard_tokens` values, cut at the same places; returns the number of tokens."""
    pending, size, index, total = [], 0, 0, 0

    def flush() -> None:
        block = np.concatenate(pending, axis=1) if pending else np.zeros((len(names), 0), np.int64)
        for name, values in zip(names, block):
            write_shard(directory / f"{name}_{index:06d}.bin", values)

    for doc in rows:
        while doc.shape[1]:
            take = doc[:, :shard_tokens - size]
            pending.append(take)
            size += take.shape[1]
            doc = doc[:, take.shape[1]:]
            if size == shard_tokens:
                flush()
                total, pending, size, index = total + size, [], 0, index + 1
    if size or index == 0:
        flush()
        total += size
    return total


def ready_tokenizer(train: list[str], model_path: Path, vocab_size: int, tokenizer: Path | None, threads: int,
                    character_coverage: float, caseops_symbols: bool) -> spm.SentencePieceProcessor:
    """Train a tokenizer at `model_path`, or copy the given one there after checking its size."""
    if tokenizer is None:
        return train_tokenizer(train, model_path.with_suffix(""), vocab_size, threads, character_coverage,
                               caseops_symbols)
    if not tokenizer.is_file():
        raise BuildError(f"--tokenizer {tokenizer}: no such file")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    if sp.vocab_size() != vocab_size:
        raise BuildError(f"--tokenizer {tokenizer} has {sp.vocab_size()} pieces, not --vocab-size {vocab_size}")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    if tokenizer.resolve() != model_path.resolve():
        shutil.copyfile(tokenizer, model_path)
    return sp


def build(docs: list[str], out: Path, vocab_size: int, val_docs: int, shard_tokens: int,
          tokenizer: Path | None = None, threads: int = 1, character_coverage: float = 0.999,
          use_caseops: bool = False, log=print) -> dict:
    """The whole pipeline; returns counts and timings (encode_seconds includes the CaseOps transform)."""
    if not 0 < val_docs < len(docs):
        raise BuildError(f"--val-docs {val_docs}: need at least one validation and one training document "
                         f"out of {len(docs)}")
    suffix = caseops.VARIANT_SUFFIX if use_caseops else ""
    t0 = time.perf_counter()
    texts = [caseops.encode(d) for d in docs] if use_caseops else docs
    transform_s = time.perf_counter() - t0
    val, train = texts[:val_docs], texts[val_docs:]
    model_path = out / "tokenizers" / f"fineweb_{vocab_size}_bpe{suffix}.model"
    t0 = time.perf_counter()
    sp = ready_tokenizer(train, model_path, vocab_size, tokenizer, threads, character_coverage, use_caseops)
    tokenizer_s = time.perf_counter() - t0
    directory = out / "datasets" / f"fineweb10B_sp{vocab_size}{suffix}"
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("fineweb_*.bin"):
        old.unlink()
    t1 = time.perf_counter()
    try:
        val_rows = encode_with_sidecar(sp, val, threads) if use_caseops else encode_documents(sp, val, threads)
        val_names = ["fineweb_val", "fineweb_val_bytes"] if use_caseops else ["fineweb_val"]
        val_tokens = write_split(val_rows, directory, val_names, shard_tokens)
    except caseops.CaseOpsError as exc:
        raise BuildError(f"{tokenizer or model_path}: {exc}") from None
    train_tokens = write_split(encode_documents(sp, train, threads), directory, ["fineweb_train"], shard_tokens)
    encode_s = time.perf_counter() - t1 + transform_s
    stats = dict(documents=len(docs), val_documents=len(val), train_tokens=train_tokens, val_tokens=val_tokens,
                 characters=sum(map(len, docs)), bytes=sum(len(d.encode("utf-8")) for d in docs),
                 tokenizer_seconds=round(tokenizer_s, 2), transform_seconds=round(transform_s, 2),
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
    parser.add_argument("--threads", type=int, default=1,
                        help="SentencePiece threads, for training and encoding (default: 1)")
    parser.add_argument("--caseops", action="store_true",
                        help="CaseOps variant: case operators, a tokenizer with them as symbols, val byte sidecars")
    parser.add_argument("--character-coverage", type=float, default=0.999,
                        help="share of characters given their own piece (default 0.999, the challenge's)")
    args = parser.parse_args(argv)
    try:
        if args.shard_tokens <= 0:
            raise BuildError(f"--shard-tokens {args.shard_tokens}: must be positive")
        if args.vocab_size > 65536:
            raise BuildError(f"--vocab-size {args.vocab_size}: shards store uint16 tokens, so at most 65536")
        build(collect_documents(args), args.out, args.vocab_size, args.val_docs, args.shard_tokens,
              args.tokenizer, args.threads, args.character_coverage, args.caseops)
    except BuildError as exc:
        print(f"build_dataset.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
