"""CaseOps: the lossless case transform, the builder's --caseops dataset, and train_gpt.py's sidecar byte counts."""

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from torch import nn

import train_gpt as tg
from conftest import CPU, E2E, pseudo_language
from data import build_dataset as bd
from data import caseops as co
from data import shard_format

REPO = Path(__file__).resolve().parent
VOCAB = 400
AWKWARD = ["", " ", "Hello World", "NASA and the USA", "iPhone McDonald eBay ABc aBC", "I a A", "x", "X",
           "MiXeD cAsE 123abcDEF 4U", "École ÉCOLE Straße ÀB", "ж😀中文 ∑", "tab\tnew\nline\r\n  two  spaces ",
           co.TITLE + co.ALLCAPS + co.CAPNEXT + co.ESC, "a" + co.ESC + "B" + co.TITLE + "c", co.ESC * 3 + "Z",
           "\uE000\uE005 neighbours of the operators", "trailing CAPS", "CAPS"]


def random_text(rng: random.Random) -> str:
    alphabet = "aAbBzZ  .,0159éÉж😀\n" + "".join(co.OPERATORS)
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))


# --- the transform ---------------------------------------------------------------------------------


def test_transform_is_exactly_invertible_on_awkward_text():
    rng = random.Random(0)
    texts = AWKWARD + [random_text(rng) for _ in range(2000)] + pseudo_language(20, seed=1)
    for text in texts:
        encoded = co.encode(text)
        assert co.decode(encoded) == text
        assert not any("A" <= c <= "Z" for c in encoded)  # case lives only in the operators
    assert len({co.encode(t) for t in texts}) == len(set(texts))


def test_transform_matches_the_public_rules():
    T, A, C, E = co.OPERATORS
    assert co.encode("Hello NASA iPhone I the") == f"{T}hello {A}nasa i{C}phone {T}i the"
    assert co.encode("McDonald ABc") == f"{T}mc{C}donald {T}a{C}bc"
    assert co.encode(f"x{T}y{E}") == f"x{E}{T}y{E}{E}"
    assert co.encode("ÉCOLE 42ND") == f"É{A}cole 42{A}nd"  # only ASCII letter runs are words


@pytest.mark.parametrize("bad", [co.TITLE, co.CAPNEXT + "A", co.ALLCAPS + " x", co.ESC + "a", "end" + co.TITLE])
def test_decode_rejects_an_operator_with_nothing_to_apply_to(bad):
    with pytest.raises(co.CaseOpsError, match="has nothing to apply to"):
        co.decode(bad)


def test_original_char_bytes_sum_to_the_original_utf8_length():
    rng = random.Random(1)
    for text in AWKWARD + [random_text(rng) for _ in range(500)]:
        assert co.original_char_bytes(co.encode(text)).sum() == len(text.encode("utf-8"))


# --- the builder ---------------------------------------------------------------------------------


def awkward_documents(num_docs: int, seed: int) -> list[str]:
    """Pseudo-language with every kind of case, operator characters, digits and non-ASCII text."""
    rng = random.Random(seed)
    docs = []
    for i, doc in enumerate(pseudo_language(num_docs, seed)):
        words = doc.split(" ")
        for j in rng.sample(range(len(words)), k=min(4, len(words))):
            words[j] = rng.choice([str.upper, str.title, lambda w: w[:1] + w[1:].upper(), str.swapcase])(words[j])
        docs.append(" ".join(words) + ("" if i % 5 else f" {co.TITLE}lit{co.ESC} USA iPhone"))
    return docs


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("caseops")
    docs = awkward_documents(400, seed=3)
    stats = bd.build(docs, root, VOCAB, val_docs=30, shard_tokens=1500, use_caseops=True, log=lambda _: None)
    hp = tg.Hyperparameters.from_env({"DATA_DIR": str(root), "VOCAB_SIZE": str(VOCAB), "CASEOPS_ENABLED": "1",
                                      "EVAL_SEQ_LEN": str(stats["val_tokens"] - 1), "EVAL_STRIDE": "7",
                                      "VAL_BATCH_TOKENS": "4096"})
    return {"root": root, "docs": docs, "val_docs": docs[:30], "hp": hp, "sp": tg.load_tokenizer(hp)}


def val_documents(sp: spm.SentencePieceProcessor, hp: tg.Hyperparameters) -> list[np.ndarray]:
    tokens = np.concatenate([np.asarray(tg.open_shard(f)) for f in tg.find_shards(hp, "val")]).astype(np.int64)
    return np.split(tokens, np.flatnonzero(tokens == 1)[1:])


def test_builder_writes_the_public_caseops_layout(caseops_data):
    root, sp, hp = caseops_data["root"], caseops_data["sp"], caseops_data["hp"]
    directory = root / "datasets" / f"fineweb10B_sp{VOCAB}_lossless_caps_caseops_v1_reserved"
    assert tg.dataset_dir(hp) == directory
    assert tg.tokenizer_path(hp) == root / "tokenizers" / f"fineweb_{VOCAB}_bpe_lossless_caps_caseops_v1_reserved.model"
    val = sorted(p.name for p in directory.glob("fineweb_val_*.bin"))
    assert len(val) > 2 and val == sorted([f"fineweb_val_{i:06d}.bin" for i in range(len(val) // 2)]
                                          + [f"fineweb_val_bytes_{i:06d}.bin" for i in range(len(val) // 2)])
    assert [sp.id_to_piece(i) for i in range(4, 9)] == [*co.OPERATORS, "<0x00>"]
    docs = val_documents(sp, hp)
    assert [co.decode(sp.decode(d[1:].tolist())) for d in docs] == caseops_data["val_docs"]
    text_pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size()) if not (sp.is_byte(i) or sp.is_control(i))]
    assert not any("A" <= c <= "Z" for piece in text_pieces for c in piece)


def test_sidecar_counts_each_documents_original_bytes(caseops_data):
    sidecar, _ = tg.load_byte_sidecar(caseops_data["hp"])
    tokens = np.concatenate(val_documents(caseops_data["sp"], caseops_data["hp"]))
    starts = np.flatnonzero(tokens == 1)
    assert (sidecar[starts] == 0).all()  # BOS stands for no text
    per_doc = [int(part.sum()) for part in np.split(sidecar.astype(np.int64), starts[1:])]
    assert per_doc == [len(d.encode("utf-8")) for d in caseops_data["val_docs"]]


def test_sidecar_is_right_where_decoding_cannot_be(tmp_path):
    # SentencePiece writes a space as U+2581, so a literal U+2581 decodes as a space: only the counts are exact
    docs = ["Lead  \u2581 Mid\u2581word\u2581\u2581 END " + d for d in pseudo_language(120, seed=4)]
    bd.build(docs, tmp_path, VOCAB, val_docs=5, shard_tokens=10**6, use_caseops=True, log=lambda _: None)
    hp = tg.Hyperparameters.from_env({"DATA_DIR": str(tmp_path), "VOCAB_SIZE": str(VOCAB), "CASEOPS_ENABLED": "1"})
    sidecar, _ = tg.load_byte_sidecar(hp)
    assert sidecar.sum() == sum(len(d.encode("utf-8")) for d in docs[:5])


def test_builder_refuses_a_tokenizer_without_operators_or_that_normalizes(tmp_path, tiny_data):
    docs = awkward_documents(60, seed=9)
    plain = tiny_data["root"] / "tokenizers" / "fineweb_512_bpe.model"
    with pytest.raises(bd.BuildError, match="lacks the CaseOps operators U\\+E001, U\\+E002"):
        bd.build(docs, tmp_path / "a", 512, 10, 10**6, tokenizer=plain, use_caseops=True, log=lambda _: None)
    # a CaseOps tokenizer trained with NFKC normalization folds "ﬁ" to "fi": its pieces no longer spell the text
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(co.encode(d) for d in docs), model_prefix=str(tmp_path / "nfkc"), vocab_size=VOCAB,
        model_type="bpe", byte_fallback=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        user_defined_symbols=list(co.OPERATORS), hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(bd.BuildError, match="validation document 0: the tokenizer does not spell the encoded text"):
        bd.build(["of\ufb01ce"] + docs, tmp_path / "b", VOCAB, 1, 10**6, tokenizer=tmp_path / "nfkc.model",
                 use_caseops=True, log=lambda _: None)


# --- train_gpt.py: scoring on the original bytes ---------------------------------------------------------


class Lines(list):
    """Stands in for RunLog: collects the lines and the JSON fields."""

    def __init__(self):
        super().__init__()
        self.fields = {}

    def __call__(self, message: str) -> None:
        self.append(message)

    def update(self, **fields) -> None:
        self.fields.update(fields)


class Uniform(nn.Module):
    """Every token at probability 1/V: the loss is ln V, so bits per byte reveal the byte count."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, target_ids):
        return torch.tensor(math.log(self.vocab), dtype=torch.float64)

    def forward_logits(self, input_ids):
        return torch.zeros(*input_ids.shape, self.vocab)


def test_both_scoring_paths_charge_the_original_bytes(caseops_data):
    hp, sp = caseops_data["hp"], caseops_data["sp"]
    lines = Lines()
    val = tg.load_validation(hp, sp, lines)
    directory = tg.dataset_dir(hp)
    assert lines == [f"bytes: sidecar {','.join(str(p) for p in sorted(directory.glob('fineweb_val_bytes_*.bin')))}"]
    assert lines.fields["bytes_source"].startswith("sidecar ")
    # the decoded, inverse-transformed validation text; the first BOS is no target and later ones count 0 bytes
    decoded = [co.decode(sp.decode(d[1:].tolist())) for d in val_documents(sp, hp)]
    expected = sum(len(d.encode("utf-8")) for d in decoded)
    targets = len(val.tokens) - 1
    assert targets == sum(len(d) for d in val_documents(sp, hp)) - 1  # the whole split is scored
    _, bpb = tg.evaluate(Uniform(VOCAB), val, hp, CPU)
    assert targets * math.log2(VOCAB) / bpb == pytest.approx(expected, rel=1e-12)
    windows = tg.sliding_windows(targets, hp.eval_seq_len // 4, hp.eval_stride)
    sums = tg.score_windows(Uniform(VOCAB).forward_logits, val.tokens, windows, 8, hp.eval_seq_len // 4, val.bytes, CPU)
    assert sums[1].item() == targets and sums[2].item() == expected
    table = tg.byte_counts(sp).count(torch.from_numpy(val.tokens[:-1].astype(np.int64)),
                                     torch.from_numpy(val.tokens[1:].astype(np.int64))).sum().item()
    assert table > expected  # the table would charge 3 bytes per operator token


def test_a_plain_dataset_is_scored_with_the_tokenizer_table(tiny_data):
    hp = tg.Hyperparameters.from_env({"DATA_DIR": str(tiny_data["root"]), "VOCAB_SIZE": "512", "EVAL_SEQ_LEN": "64"})
    lines = Lines()
    val = tg.load_validation(hp, tiny_data["sp"], lines)
    assert lines == ["bytes: tokenizer table"] and lines.fields == {"bytes_source": "tokenizer table"}
    assert val.bytes.sidecar is None


def test_sidecar_problems_are_data_errors(caseops_data, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(caseops_data["root"], root)
    hp = tg.Hyperparameters.from_env({"DATA_DIR": str(root), "VOCAB_SIZE": str(VOCAB), "CASEOPS_ENABLED": "1"})
    sidecar = tg.dataset_dir(hp) / "fineweb_val_bytes_000001.bin"
    sidecar.write_bytes(sidecar.read_bytes()[:-2])
    with pytest.raises(tg.DataError, match="fineweb_val_bytes_000001.bin: file is .* bytes but its header promises"):
        tg.load_byte_sidecar(hp)
    sidecar.unlink()
    with pytest.raises(tg.DataError, match="do not pair with the validation shards"):
        tg.load_byte_sidecar(hp)
    for f in tg.dataset_dir(hp).glob("fineweb_val_bytes_*.bin"):
        f.unlink()
    with pytest.raises(tg.DataError, match="no byte sidecar .*CASEOPS_ENABLED=1"):
        tg.load_byte_sidecar(hp)


@pytest.mark.slow
def test_train_gpt_runs_on_a_built_caseops_dataset(caseops_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({k: str(v) for k, v in E2E.items()})
    env.update(DATA_DIR=str(caseops_data["root"]), VOCAB_SIZE=str(VOCAB), CASEOPS_ENABLED="1", RUN_ID="caseops",
               ITERATIONS="3", MAX_WALLCLOCK_SECONDS="0", SLIDING_WINDOW_ENABLED="0", GPTQ_CALIBRATION_BATCHES="1",
               OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "logs" / "caseops.txt").read_text()
    assert "bytes: sidecar " in log and "fineweb_val_bytes_000000.bin" in log
    assert json.loads((tmp_path / "logs" / "caseops.json").read_text())["bytes_source"].startswith("sidecar ")


def test_the_train_val_overlap_check_reads_the_caseops_dataset(caseops_data, tmp_path):
    # The check takes its shards from find_shards, so it reads the CaseOps directory, and the byte sidecars
    # beside the validation shards are not mistaken for validation documents.
    root = tmp_path / "data"
    shutil.copytree(caseops_data["root"], root, ignore=shutil.ignore_patterns(tg.OVERLAP_CACHE_NAME))
    hp = tg.dataclasses.replace(caseops_data["hp"], data_dir=str(root))
    clean = tg.overlap_verdict(hp)
    assert clean["overlap_docs"] == 0 and clean["val_docs"] == len(caseops_data["val_docs"]) == 30
    docs = val_documents(caseops_data["sp"], hp)
    train = tg.find_shards(hp, "train")[0]
    tokens = np.asarray(tg.open_shard(train))
    shard_format.write_shard(train, np.concatenate([tokens, docs[4], docs[9]]))
    assert tg.overlap_verdict(hp)["overlap_docs"] == 2  # the cache expired with the shard's size and time
