"""Tests of data/: the dataset builder, and the downloader against a local server that speaks the hub's protocol."""

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import E2E, pseudo_language
from data import build_dataset as bd
from data import shard_format

REPO = Path(__file__).resolve().parent
DOWNLOADER = REPO / "data" / "cached_challenge_fineweb.py"
BUILDER = REPO / "data" / "build_dataset.py"


# --- building from local text ----------------------------------------------------------------------


def test_builder_writes_a_dataset_train_gpt_reads(tmp_path):
    docs = pseudo_language(300, seed=5)
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:150]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[150:]))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(BUILDER), "--text", str(tmp_path / "a.txt"), "--jsonl",
                             str(tmp_path / "b.jsonl"), "--vocab-size", "400", "--val-docs", "20",
                             "--shard-tokens", "5000", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "docs_per_second=" in result.stdout and "tokens_per_second=" in result.stdout
    hp = tg.Hyperparameters.from_env({"DATA_DIR": str(out), "VOCAB_SIZE": "400", "EVAL_SEQ_LEN": "16"})
    sp = tg.load_tokenizer(hp)
    train = tg.find_shards(hp, "train")
    assert len(train) > 1 and all(tg.shard_token_count(f) <= 5000 for f in train)
    val = np.concatenate([np.asarray(tg.open_shard(f)) for f in tg.find_shards(hp, "val")])
    starts = np.flatnonzero(val == 1)
    assert starts[0] == 0 and len(starts) == 20  # every document starts with BOS; the first 20 are validation
    assert [sp.decode(d[1:].tolist()) for d in np.split(val, starts[1:])] == docs[:20]
    assert 2 not in val  # no EOS
    trained = spm.SentencePieceProcessor(model_file=str(out / "tokenizers" / "fineweb_400_bpe.model"))
    assert trained.is_byte(4) and trained.bos_id() == 1 and trained.pad_id() == 0 and trained.unk_id() == 3
    assert trained.encode("2026") == [trained.piece_to_id(c) for c in "2026"]  # digits are split


def test_builder_reuses_a_tokenizer_and_checks_its_size(tmp_path, tiny_data):
    docs = pseudo_language(60, seed=9)
    model = tiny_data["root"] / "tokenizers" / "fineweb_512_bpe.model"
    stats = bd.build(docs, tmp_path, 512, 10, 10**6, tokenizer=model, log=lambda _: None)
    assert stats["val_documents"] == 10 and (tmp_path / "tokenizers" / "fineweb_512_bpe.model").read_bytes() == model.read_bytes()
    with pytest.raises(bd.BuildError, match="has 512 pieces, not --vocab-size 1024"):
        bd.build(docs, tmp_path, 1024, 10, 10**6, tokenizer=model, log=lambda _: None)


def test_builder_errors_name_the_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    result = subprocess.run([sys.executable, str(BUILDER), "--jsonl", str(bad), "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and f"{bad}:2: expected a JSON object with a string field 'text'" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(bd.BuildError, match="--val-docs 5: need at least one validation and one training"):
        bd.build(["a", "b", "c", "d", "e"], tmp_path, 300, 5, 100)


def test_train_gpt_reads_the_shard_format_data_writes():
    assert (tg.SHARD_MAGIC, tg.SHARD_VERSION, tg.SHARD_HEADER_BYTES) == \
        (shard_format.SHARD_MAGIC, shard_format.SHARD_VERSION, shard_format.SHARD_HEADER_BYTES)


def test_python_docs_are_real_text():
    docs = list(bd.python_doc_documents())
    assert len(docs) > 100 and sum(map(len, docs)) > 300_000


# --- downloading from a hub ----------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(http.server.ThreadingHTTPServer):
    """Serves `files` (remote path -> bytes) of dataset repo `repo` at /datasets/<repo>/resolve/<rev>/<path>.

    A remote path in `break_files` behaves like a dying server: its first GET sends half the file and
    closes the connection, and every later GET of it is closed without a response."""

    def __init__(self, repo: str, files: dict[str, bytes]):
        self.repo, self.files, self.gets = repo, files, []
        self.break_files, self.broken = set(), set()
        super().__init__(("127.0.0.1", 0), HubHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def resolve(self):
        prefix = f"/datasets/{self.server.repo}/resolve/main/"
        path = self.path.split("?")[0]
        data = self.server.files.get(path[len(prefix):]) if path.startswith(prefix) else None
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if path.startswith(prefix) else "RepoNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return data

    def do_HEAD(self):
        self.resolve()

    def do_GET(self):
        remote = self.path.split("?")[0].split("/resolve/main/", 1)[-1]
        if remote in self.server.broken:
            self.close_connection = True  # hang up before answering
            return
        data = self.resolve()
        if data is not None:
            self.server.gets.append(self.path)
            if remote in self.server.break_files:
                self.server.broken.add(remote)
                self.wfile.write(data[:len(data) // 2])
                self.close_connection = True
                return
            self.wfile.write(data)


def shard_bytes(tokens) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, len(tokens)
    return header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


CASEOPS = "sp64_lossless_caps_caseops_v1_reserved"


@pytest.fixture
def hub():
    manifest = {"datasets": [{"name": "fineweb10B_sp64", "tokenizer_name": "sp_bpe_64",
                              "stats": {"files_train": 3, "files_val": 1}},
                             {"name": f"fineweb10B_{CASEOPS}", "tokenizer_name": "sp_bpe_64_caseops",
                              "stats": {"files_train": 2, "files_val": 1}}],
                "tokenizers": [{"name": "sp_bpe_64", "model_path": "tokenizers/fineweb_64_bpe.model",
                                "vocab_path": "tokenizers/fineweb_64_bpe.vocab"},
                               {"name": "sp_bpe_64_caseops",
                                "model_path": "tokenizers/fineweb_64_bpe_lossless_caps_caseops_v1_reserved.model"}]}
    files = {"datasets/manifest.json": json.dumps(manifest).encode(),
             "datasets/tokenizers/fineweb_64_bpe.model": b"model-bytes",
             "datasets/tokenizers/fineweb_64_bpe.vocab": b"vocab-bytes",
             "datasets/tokenizers/fineweb_64_bpe_lossless_caps_caseops_v1_reserved.model": b"caseops-model",
             "datasets/datasets/fineweb10B_sp64/fineweb_val_000000.bin": shard_bytes(range(50)),
             f"datasets/datasets/fineweb10B_{CASEOPS}/fineweb_val_000000.bin": shard_bytes(range(40)),
             f"datasets/datasets/fineweb10B_{CASEOPS}/fineweb_val_bytes_000000.bin": shard_bytes([3] * 40)}
    for i in range(3):
        files[f"datasets/datasets/fineweb10B_sp64/fineweb_train_{i:06d}.bin"] = shard_bytes([i] * 100)
        files[f"datasets/datasets/fineweb10B_{CASEOPS}/fineweb_train_{i:06d}.bin"] = shard_bytes([i] * 30000)
    server = FakeHub("someone/golf-data", files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def download(hub_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"HF_ENDPOINT": hub_url, "HF_HUB_CACHE": str(tmp_path / "cache"), "MATCHED_FINEWEB_REPO_ID": "someone/golf-data",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, str(DOWNLOADER), "--data-dir", str(tmp_path / "data"), *args],
                          env=env, capture_output=True, text=True, timeout=120)


def test_downloads_the_variant_into_the_train_gpt_layout(hub, tmp_path):
    result = download(hub.url, tmp_path, "--variant", "sp64", "--train-shards", "2")
    assert result.returncode == 0, result.stderr
    data = tmp_path / "data"
    shards = data / "datasets" / "fineweb10B_sp64"
    assert sorted(p.name for p in shards.iterdir()) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                         "fineweb_val_000000.bin"]
    assert (data / "tokenizers" / "fineweb_64_bpe.model").read_bytes() == b"model-bytes"
    assert all(tg.shard_token_count(p) for p in shards.iterdir())
    assert "[1/5]" in result.stdout and "downloaded" in result.stdout
    # a second run fetches nothing but the manifest; a damaged shard is fetched again
    hub.gets.clear()
    (shards / "fineweb_train_000001.bin").write_bytes(b"\0" * 100)
    again = download(hub.url, tmp_path, "--variant", "sp64", "--train-shards", "2")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("present, skipped") == 4
    fetched = [g.rsplit("/", 1)[1] for g in hub.gets]
    assert "fineweb_train_000000.bin" not in fetched
    assert tg.shard_token_count(shards / "fineweb_train_000001.bin") == 100


@pytest.mark.parametrize("args, message", [
    (["--variant", "gpt2"], "unknown variant 'gpt2'"),
    (["--variant", "sp64", "--train-shards", "9"], "--train-shards 9: someone/golf-data has only 3 training shards"),
    (["--variant", "sp8192"], "variant 'sp8192' is not in someone/golf-data's manifest; it has: sp64"),
])
def test_download_errors_are_clear(hub, tmp_path, args, message):
    result = download(hub.url, tmp_path, *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_downloads_the_caseops_variant_with_its_byte_sidecar(hub, tmp_path):
    result = download(hub.url, tmp_path, "--variant", CASEOPS, "--train-shards", "1")
    assert result.returncode == 0, result.stderr
    data = tmp_path / "data"
    hp = tg.Hyperparameters.from_env({"DATA_DIR": str(data), "VOCAB_SIZE": "64", "CASEOPS_ENABLED": "1"})
    assert sorted(p.name for p in tg.dataset_dir(hp).iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"]
    assert tg.tokenizer_path(hp).read_bytes() == b"caseops-model"
    assert [p.name for p in tg.find_shards(hp, "val")] == ["fineweb_val_000000.bin"]
    sidecar, files = tg.load_byte_sidecar(hp)
    assert sidecar.tolist() == [3] * 40 and [f.name for f in files] == ["fineweb_val_bytes_000000.bin"]


@pytest.mark.slow
def test_a_dropped_connection_is_a_clear_error_and_the_rerun_resumes(hub, tmp_path):
    name = f"datasets/datasets/fineweb10B_{CASEOPS}/fineweb_train_000001.bin"
    hub.break_files.add(name)
    first = download(hub.url, tmp_path, "--variant", CASEOPS, "--train-shards", "2")
    assert first.returncode == 2 and "Traceback" not in first.stderr, first.stderr
    error = first.stderr.strip().splitlines()[-1]
    assert error.startswith("cached_challenge_fineweb.py: error: fineweb_train_000001.bin: the connection broke")
    assert "Run the same command again to resume" in error
    shards = tmp_path / "data" / "datasets" / f"fineweb10B_{CASEOPS}"
    assert sorted(p.name for p in shards.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"]
    hub.break_files.clear()
    hub.broken.clear()
    hub.gets.clear()
    again = download(hub.url, tmp_path, "--variant", CASEOPS, "--train-shards", "2")
    assert again.returncode == 0, again.stderr
    assert [g.rsplit("/", 1)[1] for g in hub.gets if g.endswith(".bin")] == ["fineweb_train_000001.bin"]
    for path in shards.iterdir():
        assert path.read_bytes() == hub.files[f"datasets/datasets/fineweb10B_{CASEOPS}/{path.name}"]


@pytest.mark.slow
def test_network_failure_names_the_url(tmp_path):
    result = download("http://127.0.0.1:9", tmp_path, "--variant", "sp64")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "could not download http://127.0.0.1:9/datasets/" in result.stderr and "run the same command again" in result.stderr


# --- the main job on a machine without GPUs or hub access ----------------------------------------


@pytest.mark.slow
def test_run_sh_builds_a_demo_dataset_and_trains_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DATA_DIR=str(tmp_path / "demo"), MAX_WALLCLOCK_SECONDS="25", GPTQ_RESERVE_SECONDS="3",
               SLIDING_WINDOW_ENABLED="0", RUN_ID="demo", OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", str(REPO / "run.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "logs" / "demo.txt").read_text()
    assert "world_size:2" in log and "stopping_early: wallclock_cap" in log
    bpb = float(re.search(r"^quantized val_loss:\S+ val_bpb:(\S+) eval_time:\d+ms$", log, re.M).group(1))
    hp = tg.Hyperparameters.from_env({"DATA_DIR": str(tmp_path / "demo"), "VOCAB_SIZE": "1024", "EVAL_SEQ_LEN": "128"})
    tokens = tg.load_validation_tokens(hp).astype(np.int64)
    counts = tg.byte_counts(tg.load_tokenizer(hp))
    num_bytes = counts.count(torch.from_numpy(tokens[:-1]), torch.from_numpy(tokens[1:])).sum().item()
    uniform = np.log2(1024) * (len(tokens) - 1) / num_bytes
    assert bpb < 0.8 * uniform


def stand_in_gpu_env(tmp_path: Path, **env) -> dict:
    """A stand-in nvidia-smi that takes run.sh down its GPU branch (torch itself still sees no GPU)."""
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: Stand-in (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ATTN_BACKEND")}
    full.update(PATH=f"{tmp_path / 'bin'}:{full['PATH']}", OMP_NUM_THREADS="1", **{k: str(v) for k, v in env.items()})
    return full


def test_run_sh_on_a_gpu_machine_refuses_to_run_without_flash_attention_3(tmp_path):
    # No CUDA here, so the FA3 check cannot pass: the GPU branch stops before downloading or training.
    result = subprocess.run(["bash", str(REPO / "run.sh")], cwd=tmp_path, env=stand_in_gpu_env(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "| fa3 | import | SKIP: no CUDA device" in result.stdout
    assert "set ATTN_BACKEND=sdpa to train with PyTorch SDPA" in result.stderr
    assert not (tmp_path / "packed").exists() and not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_run_sh_on_a_gpu_machine_packs_the_script_and_runs_the_packed_form(tiny_data, tmp_path):
    # ATTN_BACKEND=sdpa opts out of the FA3 requirement; the data is already there, so nothing is
    # downloaded, and train_gpt.py itself still runs on the CPU with a small configuration.
    env = stand_in_gpu_env(tmp_path, **{**E2E, "ITERATIONS": 4, "MAX_WALLCLOCK_SECONDS": 0, "SLIDING_WINDOW_ENABLED": 0},
                           DATA_DIR=tiny_data["root"], RUN_ID="gpu_branch", ATTN_BACKEND="sdpa")
    result = subprocess.run(["bash", str(REPO / "run.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    packed = tmp_path / "packed" / "train_gpt.py"
    assert packed.read_text() == tg.counted_code((REPO / "train_gpt.py").read_text()).text
    log = (tmp_path / "logs" / "gpu_branch.txt").read_text()
    assert "world_size:1" in log and f"Code size: {packed.stat().st_size} bytes" in log
    assert re.search(r"^quantized val_loss:\S+ val_bpb:\S+ eval_time:\d+ms$", log, re.M)
