"""The train/val overlap check: every val document that is also a training document is found, exactly once,
wherever chunk edges and shard boundaries fall; the verdict is cached beside the shards; a run and the
record packager refuse overlapping data."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from data.build_dataset import write_shard
from conftest import E2E, SCRIPT, hparams, run_script

sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
import check_overlap  # noqa: E402
import package_record  # noqa: E402
from runlogs import Run  # noqa: E402

BOS = tg.BOS_ID


def reference_key(doc: list[int]) -> int:
    """The key by its definition, one document at a time with Python integers."""
    return (sum(t * pow(tg.HASH_BASE, j, tg.HASH_MODULUS) for j, t in enumerate(doc))
            + len(doc) * tg.LENGTH_SALT) % tg.HASH_MODULUS


def random_docs(rng: np.random.Generator, count: int, longest: int = 40) -> list[list[int]]:
    return [[BOS] + rng.integers(3, 500, size=rng.integers(3, longest)).tolist() for _ in range(count)]


def write_split(directory: Path, split: str, docs: list[list[int]], shard_tokens: int) -> None:
    """The documents as one stream cut into shards of shard_tokens: documents straddle the cuts."""
    stream = np.array([t for d in docs for t in d], dtype=np.int64)
    for i, lo in enumerate(range(0, len(stream), shard_tokens)):
        write_shard(directory / f"fineweb_{split}_{i:06d}.bin", stream[lo:lo + shard_tokens])


def shards(directory: Path, split: str) -> list[Path]:
    return sorted(directory.glob(f"fineweb_{split}_*.bin"))


def cut_documents(files: list[Path]) -> int:
    """Documents cut by a shard boundary: shards after the first that start without BOS."""
    return sum(int(tg.open_shard(f)[0] != BOS) for f in files[1:])


def copy_dataset(tiny_data, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_data["root"], root, ignore=shutil.ignore_patterns(tg.OVERLAP_CACHE_NAME))
    return root


def val_documents(tiny_data) -> list[np.ndarray]:
    tokens = np.fromfile(tiny_data["shards"] / "fineweb_val_000000.bin", dtype="<u2", offset=tg.SHARD_HEADER_BYTES)
    starts = np.flatnonzero(tokens == BOS)
    return np.split(tokens, starts[1:])


def append_to_shard(path: Path, docs: list[np.ndarray]) -> None:
    tokens = np.fromfile(path, dtype="<u2", offset=tg.SHARD_HEADER_BYTES)
    write_shard(path, np.concatenate([tokens, *docs]))


# --- the hash ------------------------------------------------------------------------------------


def test_keys_follow_the_definition_wherever_a_document_lies():
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 30, longest=300) + [[BOS], [BOS, 0], [BOS, 0, 0]]
    stream = np.array([t for d in docs for t in d], dtype=np.uint16)
    starts = np.flatnonzero(stream == BOS)
    keys = tg.document_keys(stream, starts)
    assert keys.dtype == np.uint64 and keys.tolist() == [reference_key(d) for d in docs]
    shifted = np.concatenate([np.array([7, 8, 9], dtype=np.uint16), stream])  # a leading partial, then the same
    assert tg.document_keys(shifted, np.concatenate([[0], starts + 3]))[1:].tolist() == keys.tolist()
    assert len(set(keys.tolist()[-3:])) == 3  # trailing zero tokens change the key through the length


def test_inverse_powers_undo_the_powers():
    exponents = np.array([0, 1, 2, 5, 1000, 123_456, (1 << 20) - 1])
    table = tg.hash_powers(1 << 20)
    assert (table[exponents] * tg.inverse_hash_powers(exponents)).tolist() == [1] * len(exponents)


# --- the check -----------------------------------------------------------------------------------


def test_clean_dataset_passes(tiny_data):
    result = tg.train_val_overlap(shards(tiny_data["shards"], "train"), shards(tiny_data["shards"], "val"))
    bos = sum(int((tg.open_shard(f) == BOS).sum()) for f in shards(tiny_data["shards"], "train"))
    assert result["overlap_docs"] == 0 and result["overlap_fraction"] == 0.0 and result["examples"] == []
    assert result["val_docs"] == len(tiny_data["val_docs"]) == 100
    halves = 2 * cut_documents(shards(tiny_data["shards"], "train"))
    assert result["train_docs"] == bos + halves and result["val_tokens"] == len(tiny_data["val_tokens"])


def test_injected_val_documents_are_counted_exactly(tiny_data, tmp_path):
    root = copy_dataset(tiny_data, tmp_path)
    directory = root / "datasets" / "fineweb10B_sp512"
    val = val_documents(tiny_data)
    altered = val[40].copy()
    altered[-1] += 1
    # val docs 3, 7 (twice) and 50 verbatim; a changed copy of 40 and a truncated 60 do not count
    append_to_shard(directory / "fineweb_train_000001.bin", [val[3], val[7], altered, val[60][:-1]])
    append_to_shard(directory / "fineweb_train_000000.bin", [val[50], val[7]])
    result = tg.train_val_overlap(shards(directory, "train"), shards(directory, "val"))
    assert result["overlap_docs"] == 3 and result["overlap_fraction"] == 0.03
    first = result["examples"][0]
    starts = np.cumsum([0] + [len(d) for d in val])
    assert first["val"] == f"fineweb_val_000000.bin:{starts[50]}" and first["tokens"] == len(val[50])
    train0 = tg.shard_token_count(directory / "fineweb_train_000000.bin")
    assert first["train"] == f"fineweb_train_000000.bin:{train0 - len(val[50]) - len(val[7])}"
    assert sorted(e["val"] for e in result["examples"]) == sorted(f"fineweb_val_000000.bin:{starts[i]}" for i in (3, 7, 50))


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 1 << 20])
def test_documents_straddling_chunks_and_shards_are_hashed_whole(tmp_path, chunk):
    rng = np.random.default_rng(1)
    val = random_docs(rng, 20)
    train = random_docs(rng, 50) + [val[4]] + random_docs(rng, 10) + [val[9], val[9]] + random_docs(rng, 30)
    write_split(tmp_path, "val", val, shard_tokens=97)
    write_split(tmp_path, "train", [[5, 6]] + train, shard_tokens=113)  # starts with a partial document
    assert len(shards(tmp_path, "train")) > 5 and len(shards(tmp_path, "val")) > 2
    result = tg.train_val_overlap(shards(tmp_path, "train"), shards(tmp_path, "val"), chunk_tokens=chunk)
    cut = cut_documents(shards(tmp_path, "train"))
    assert cut > 0 and (result["overlap_docs"], result["val_docs"]) == (2, 20)
    assert result["train_docs"] == len(train) + 1 + 2 * cut  # + the leading partial, + both halves of each cut
    assert [e["tokens"] for e in result["examples"]] == [len(val[4]), len(val[9])]


def test_a_stream_without_bos_is_a_data_error(tmp_path, monkeypatch):
    write_split(tmp_path, "train", [[BOS, 5], [7] * 50], shard_tokens=20)
    write_split(tmp_path, "val", [[BOS, 5]], shard_tokens=20)
    monkeypatch.setattr(tg, "MAX_DOCUMENT_TOKENS", 30)
    with pytest.raises(tg.DataError, match=r"fineweb_train_000001.bin: over 30 tokens without a BOS \(id 1\)"):
        tg.train_val_overlap(shards(tmp_path, "train"), shards(tmp_path, "val"), chunk_tokens=8)


# --- the cache -----------------------------------------------------------------------------------


def test_verdict_is_cached_beside_the_shards_and_expires_with_them(tiny_data, tmp_path, monkeypatch):
    root = copy_dataset(tiny_data, tmp_path)
    hp = hparams(DATA_DIR=root, VOCAB_SIZE=512)
    cache = tg.dataset_dir(hp) / tg.OVERLAP_CACHE_NAME
    first = tg.overlap_verdict(hp)
    assert not first["cached"] and first["not_cached"] is None and cache.is_file()
    assert json.loads(cache.read_text())["inputs"]["check_version"] == tg.OVERLAP_CHECK_VERSION

    def recompute(*args):
        raise AssertionError("recomputed")

    with monkeypatch.context() as m:
        m.setattr(tg, "train_val_overlap", recompute)
        again = tg.overlap_verdict(hp)
    assert again["cached"] and again["overlap_docs"] == 0 and again["val_docs"] == first["val_docs"]
    shard = tg.dataset_dir(hp) / "fineweb_train_000001.bin"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert not tg.overlap_verdict(hp)["cached"]
    append_to_shard(shard, val_documents(tiny_data)[:2])
    changed = tg.overlap_verdict(hp)
    assert not changed["cached"] and changed["overlap_docs"] == 2
    monkeypatch.setattr(tg, "OVERLAP_CHECK_VERSION", tg.OVERLAP_CHECK_VERSION + 1)
    assert not tg.overlap_verdict(hp)["cached"] and tg.overlap_verdict(hp)["cached"]


def test_an_unwritable_cache_is_computed_and_reported(tiny_data, tmp_path):
    root = copy_dataset(tiny_data, tmp_path)
    hp = hparams(DATA_DIR=root, VOCAB_SIZE=512)
    (tg.dataset_dir(hp) / tg.OVERLAP_CACHE_NAME).mkdir()  # stands in for a read-only directory (tests run as root)
    verdict = tg.overlap_verdict(hp)
    assert not verdict["cached"] and "IsADirectoryError" in verdict["not_cached"]
    line = tg.describe_overlap(verdict)[0]
    assert line.startswith("data_check: train/val overlap 0 of 100 val documents (computed in ")
    assert "; not cached: IsADirectoryError" in line and not tg.overlap_verdict(hp)["cached"]


# --- the run, the tool and the packager ----------------------------------------------------------


def overlapping_dataset(tiny_data, tmp_path) -> Path:
    root = copy_dataset(tiny_data, tmp_path)
    append_to_shard(root / "datasets" / "fineweb10B_sp512" / "fineweb_train_000000.bin", val_documents(tiny_data)[:5])
    return root


def check_in_a_run(hp: tg.Hyperparameters) -> tuple[tg.RunLog, list[str]]:
    rt = tg.Runtime(0, 0, 1, torch.device("cpu"), False, "sdpa", False, torch.float32)
    log = tg.RunLog(hp, rt, "code")
    try:
        tg.check_train_val_overlap(hp, rt, log)
    finally:
        lines = log.text_path.read_text().splitlines()
    return log, lines


def test_a_run_stops_on_overlap_unless_allowed(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = overlapping_dataset(tiny_data, tmp_path)
    with pytest.raises(tg.DataError, match=r"5 of 100 validation documents \(5.00%\) also appear verbatim") as err:
        check_in_a_run(hparams(DATA_DIR=root, VOCAB_SIZE=512, RUN_ID="strict"))
    assert "#2127" in str(err.value) and "MAX_TRAIN_VAL_OVERLAP=1" in str(err.value)
    log, lines = check_in_a_run(hparams(DATA_DIR=root, VOCAB_SIZE=512, RUN_ID="loose", MAX_TRAIN_VAL_OVERLAP=0.05))
    assert lines == ["data_check: train/val overlap 5 of 100 val documents (cached)"] + [
        f"data_check: val {e['val']} = train {e['train']} ({e['tokens']} tokens)" for e in log.result["data_check"]["examples"]]
    recorded = json.loads(log.json_path.read_text())["data_check"]
    assert recorded["overlap_docs"] == 5 and recorded["cached"] and len(recorded["examples"]) == 5


def test_the_knob_is_a_fraction():
    with pytest.raises(tg.ConfigError, match=r"MAX_TRAIN_VAL_OVERLAP=1.5: must be a fraction in \[0, 1\]"):
        tg.check_config(hparams(MAX_TRAIN_VAL_OVERLAP=1.5), 1)


def test_the_tool_reports_and_sets_its_exit_status(tiny_data, tmp_path, capsys):
    assert check_overlap.main([str(tiny_data["root"]), "512", "--recompute"]) == 0
    assert "train/val overlap 0 of 100 val documents" in capsys.readouterr().out
    root = overlapping_dataset(tiny_data, tmp_path)
    assert check_overlap.main([str(root), "512", "--chunk-tokens", "5", "--trace-memory"]) == 1
    out = capsys.readouterr().out
    assert "overlap 5 of 100 val documents (computed in" in out and out.count("data_check: val ") == 5
    assert "peak array memory" in out
    assert (root / "datasets" / "fineweb10B_sp512" / tg.OVERLAP_CACHE_NAME).is_file()
    assert check_overlap.main([str(tmp_path / "nowhere"), "512"]) == 2
    assert "does not exist" in capsys.readouterr().err


def package_runs(overlaps: list) -> list[Run]:
    return [Run(Path(f"{i}.json"), {"metrics": {}, "world_size": 8, "device": "NVIDIA H100 80GB HBM3",
                                    **({} if n is None else {"data_check": {"overlap_docs": n}})})
            for i, n in enumerate(overlaps)]


@pytest.mark.parametrize("overlaps, verdict, failed", [
    ([0, 0, 0], True, []),
    ([0, 3, 0], False, ["no_train_val_overlap"]),
    ([0, None, 0], None, ["no_train_val_overlap (not recorded by every run)"]),
])
def test_the_packager_refuses_a_record_on_overlapping_data(overlaps, verdict, failed):
    checks = package_record.compliance(package_runs(overlaps))
    assert checks["no_train_val_overlap"] is verdict
    assert [k for k in package_record.failed_checks(checks) if "overlap" in k] == failed


@pytest.mark.slow
def test_train_gpt_exits_with_a_data_error_on_overlapping_data(tiny_data, tmp_path):
    root = overlapping_dataset(tiny_data, tmp_path)
    result = run_script([sys.executable, str(SCRIPT)], dict(E2E, DATA_DIR=root, RUN_ID="overlap"), tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "train_gpt.py: data error: 5 of 100 validation documents (5.00%)" in result.stderr
    assert "data_check: train/val overlap 5 of 100 val documents (computed in" in result.stdout
    recorded = json.loads((tmp_path / "logs" / "overlap.json").read_text())
    assert recorded["status"] == "failed" and recorded["data_check"]["overlap_docs"] == 5
