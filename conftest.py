"""Shared pytest fixtures: a small dataset in the challenge's exact format, made from generated text.

Nothing here needs the network or ../shared: data/build_dataset.py trains a SentencePiece BPE model
with the challenge's settings on a generated pseudo-language and writes its train/val shards.
"""

import random

import numpy as np
import pytest
import sentencepiece as spm

from data import build_dataset as bd

VOCAB = 512


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: runs the script end to end in a subprocess (deselect with -m 'not slow')")


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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    docs = pseudo_language(1200, seed=0)
    # characters the tokenizer never saw reach the val split only through byte-fallback tokens
    val_docs = [d + " ∑ 😀 ж" if i % 10 == 0 else d for i, d in enumerate(docs[:100])]
    bd.build(val_docs + docs[100:], root, VOCAB, val_docs=100, shard_tokens=30_000, log=lambda _: None)
    shards = root / "datasets" / f"fineweb10B_sp{VOCAB}"
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"))
    val = np.fromfile(shards / "fineweb_val_000000.bin", dtype="<u2", offset=1024).astype(np.int64)
    return {"root": root, "shards": shards, "sp": sp, "val_docs": val_docs, "val_tokens": val, "vocab": VOCAB}
