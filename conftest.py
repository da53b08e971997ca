"""Shared pytest fixtures: a small dataset in the challenge's exact format, made from generated text.

Nothing here needs the network or ../shared: a SentencePiece BPE model with the challenge's settings
is trained on a generated pseudo-language, and its tokens are written as train/val shards.
"""

import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

VOCAB = 512


def pseudo_language(num_docs: int, seed: int) -> list[str]:
    """Documents with learnable structure: Zipf-distributed words, bigram habits, digits, non-ASCII."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "do", "fa", "gu", "zo", "qui", "é", "ñu"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)})
    weights = [1.0 / (i + 1) for i in range(len(words))]
    follow = {w: rng.sample(words, 3) for w in words}
    docs = []
    for _ in range(num_docs):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            w = rng.choices(words, weights)[0]
            out = [w.capitalize()]
            for _ in range(rng.randint(4, 12)):
                w = rng.choice(follow[w]) if rng.random() < 0.7 else rng.choices(words, weights)[0]
                out.append(w)
            if rng.random() < 0.2:
                out.append(str(rng.randint(0, 2026)))
            sentences.append(" ".join(out) + rng.choice([".", ".", "!", " — 中文."]))
        docs.append(" ".join(sentences))
    return docs


def write_shard(path: Path, tokens: np.ndarray, magic: int = 20240520, version: int = 1) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens)
    with path.open("wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def train_tokenizer(texts: list[str], prefix: Path, vocab_size: int) -> spm.SentencePieceProcessor:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=1.0, num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def encode_docs(sp: spm.SentencePieceProcessor, docs: list[str]) -> np.ndarray:
    """Every document prefixed with BOS (id 1), no EOS, as the challenge's shards are."""
    return np.concatenate([np.array([1] + sp.encode(d), dtype=np.int64) for d in docs])


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    (root / "tokenizers").mkdir()
    shards = root / "datasets" / f"fineweb10B_sp{VOCAB}"
    shards.mkdir(parents=True)
    docs = pseudo_language(1200, seed=0)
    train_docs = docs[100:]
    # characters the tokenizer never saw reach the val split only through byte-fallback tokens
    val_docs = [d + " ∑ 😀 ж" if i % 10 == 0 else d for i, d in enumerate(docs[:100])]
    sp = train_tokenizer(train_docs, root / "tokenizers" / f"fineweb_{VOCAB}_bpe", VOCAB)
    train = encode_docs(sp, train_docs)
    half = len(train) // 2
    write_shard(shards / "fineweb_train_000000.bin", train[:half])
    write_shard(shards / "fineweb_train_000001.bin", train[half:])
    val = encode_docs(sp, val_docs)
    write_shard(shards / "fineweb_val_000000.bin", val)
    return {"root": root, "shards": shards, "sp": sp, "val_docs": val_docs, "val_tokens": val, "vocab": VOCAB}
