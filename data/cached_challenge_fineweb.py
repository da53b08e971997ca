"""Download the challenge's tokenized FineWeb from the Hugging Face hub into data/.

    python3 data/cached_challenge_fineweb.py --variant sp8192 --train-shards 80
    python3 data/cached_challenge_fineweb.py --variant sp8192_lossless_caps_caseops_v1_reserved --train-shards 80

Reads the dataset repo's manifest.json, then fetches the variant's validation shards, the first
--train-shards training shards and its tokenizer files into data/datasets/fineweb10B_<variant>/ and
data/tokenizers/ -- the layout train_gpt.py reads with DATA_DIR=./data/. Files already present and
valid are skipped, so an interrupted download resumes; every shard's header and size are checked.
The CaseOps variant (sp<V>_lossless_caps_caseops_v1_reserved, see data/caseops.py) also fetches the
byte sidecar fineweb_val_bytes_N.bin of every validation shard, and defaults to the dataset repo
romeerp/parameter-golf-caseops-v1 that hosts it.

Environment: MATCHED_FINEWEB_REPO_ID (default kevclark/parameter-golf, which hosts sp8192; for CaseOps
romeerp/parameter-golf-caseops-v1),
MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (default "datasets"), and the hub client's own HF_ENDPOINT,
HF_TOKEN, HF_HUB_CACHE.
"""

import argparse
import importlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

if __package__:  # imported as data.cached_challenge_fineweb (the tests)
    from .caseops import VARIANT_SUFFIX as CASEOPS_SUFFIX
    from .shard_format import shard_is_valid
else:  # run as python3 data/cached_challenge_fineweb.py: data/ is on sys.path
    from caseops import VARIANT_SUFFIX as CASEOPS_SUFFIX
    from shard_format import shard_is_valid

REMOTE_PREFIX = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets").strip("/")
DEFAULT_REPO, CASEOPS_REPO = "kevclark/parameter-golf", "romeerp/parameter-golf-caseops-v1"


class DownloadError(RuntimeError):
    """Something the user can act on; the message says what and what to try."""


def is_caseops(variant: str) -> bool:
    return variant.endswith(CASEOPS_SUFFIX)


def dataset_name(variant: str) -> str:
    if variant == "byte260" or re.fullmatch(rf"sp\d+({CASEOPS_SUFFIX})?", variant):
        return f"fineweb10B_{variant}"
    raise DownloadError(f"unknown variant {variant!r}: expected sp<VOCAB_SIZE> (e.g. sp1024, sp8192), "
                        f"sp<VOCAB_SIZE>{CASEOPS_SUFFIX} or byte260")


def repo_id(variant: str) -> str:
    """MATCHED_FINEWEB_REPO_ID, else the public repo that hosts the variant."""
    return os.environ.get("MATCHED_FINEWEB_REPO_ID") or (CASEOPS_REPO if is_caseops(variant) else DEFAULT_REPO)


def connection_errors() -> tuple[type[BaseException], ...]:
    """The network exceptions of whichever HTTP library this huggingface_hub uses (httpx2, httpx or requests).

    A connection dropped mid-transfer surfaces as one of them after the hub client's own retries."""
    found = []
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except ImportError:
            continue
    return tuple(found)


def local_path(remote: str, data_dir: Path) -> Path:
    """`<prefix>/datasets/x/y.bin` -> data/datasets/x/y.bin; `<prefix>/tokenizers/t.model` -> data/tokenizers/t.model."""
    parts = Path(remote).parts
    if REMOTE_PREFIX and parts[:1] == (REMOTE_PREFIX,):
        parts = parts[1:]
    return data_dir.joinpath(*parts)


def fetch(remote: str, data_dir: Path, repo: str) -> Path:
    """Download one file of the dataset repo (through the hub client's cache) to its place under data/."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    url = f"{constants.ENDPOINT}/datasets/{repo}/resolve/main/{remote}"
    folder, name = os.path.split(remote)
    destination = local_path(remote, data_dir)
    try:
        cached = Path(hf_hub_download(repo_id=repo, filename=name, subfolder=folder or None, repo_type="dataset"))
    except LocalEntryNotFoundError as exc:  # the hub could not be reached (a subclass of EntryNotFoundError)
        raise DownloadError(f"could not download {url}: {exc}. Check the network (or a proxy), HF_ENDPOINT, "
                            f"and HF_TOKEN for a private repo; then run the same command again: finished files "
                            f"are kept") from None
    except (EntryNotFoundError, RepositoryNotFoundError) as exc:
        raise DownloadError(f"{url} does not exist ({type(exc).__name__}); check MATCHED_FINEWEB_REPO_ID={repo!r} "
                            f"and MATCHED_FINEWEB_REMOTE_ROOT_PREFIX={REMOTE_PREFIX!r}") from None
    except (HfHubHTTPError, OSError) as exc:
        raise DownloadError(f"could not download {url}: {exc}. Check the network (or a proxy), HF_ENDPOINT, "
                            f"and HF_TOKEN for a private repo; then run the same command again: finished files "
                            f"are kept") from None
    except connection_errors() as exc:
        raise DownloadError(f"{destination.name}: the connection broke while downloading {url} and the hub client's "
                            f"retries did not get it back ({type(exc).__name__}: {exc}). Run the same command again "
                            f"to resume: the files already finished are kept, and this one is fetched anew") from None
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(destination.name + ".part")
    shutil.copyfile(cached.resolve(), tmp)
    tmp.replace(destination)
    return destination


def load_manifest(data_dir: Path, repo: str) -> dict:
    path = fetch(f"{REMOTE_PREFIX}/manifest.json" if REMOTE_PREFIX else "manifest.json", data_dir, repo)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise DownloadError(f"{path} is not valid JSON; delete it and run again") from None


def plan_downloads(manifest: dict, variant: str, train_shards: int, repo: str) -> list[str]:
    """Remote paths to fetch: validation shards (and CaseOps byte sidecars), the first `train_shards` training
    shards, tokenizer files."""
    name = dataset_name(variant)
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        available = sorted(d.get("name", "?").removeprefix("fineweb10B_") for d in manifest.get("datasets", []))
        raise DownloadError(f"variant {variant!r} is not in {repo}'s manifest; it has: {', '.join(available) or 'none'}")
    stats = entry.get("stats") or {}
    files_train, files_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards > files_train:
        raise DownloadError(f"--train-shards {train_shards}: {repo} has only {files_train} training shards for {variant}")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tokenizer is None:
        raise DownloadError(f"the manifest names tokenizer {entry.get('tokenizer_name')!r} for {variant} but does not list it")
    prefix = f"{REMOTE_PREFIX}/" if REMOTE_PREFIX else ""
    files = [f"{prefix}datasets/{name}/fineweb_val_{i:06d}.bin" for i in range(files_val)]
    if is_caseops(variant):
        files += [f"{prefix}datasets/{name}/fineweb_val_bytes_{i:06d}.bin" for i in range(files_val)]
    files += [f"{prefix}datasets/{name}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    files += [f"{prefix}{tokenizer[key]}" for key in ("model_path", "vocab_path") if tokenizer.get(key)]
    return files


def is_present(remote: str, data_dir: Path) -> bool:
    path = local_path(remote, data_dir)
    return shard_is_valid(path) if path.suffix == ".bin" else path.is_file() and path.stat().st_size > 0


def download(variant: str, train_shards: int, data_dir: Path, log=print) -> list[Path]:
    repo = repo_id(variant)
    files = plan_downloads(load_manifest(data_dir, repo), variant, train_shards, repo)
    done = []
    for i, remote in enumerate(files, 1):
        path = local_path(remote, data_dir)
        if is_present(remote, data_dir):
            log(f"[{i}/{len(files)}] {path} present, skipped")
        else:
            fetch(remote, data_dir, repo)
            if path.suffix == ".bin" and not shard_is_valid(path):
                path.unlink()
                raise DownloadError(f"{path}: downloaded shard has a bad header or size; run again to retry")
            log(f"[{i}/{len(files)}] {path} downloaded ({path.stat().st_size / 1e6:.1f} MB)")
        done.append(path)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sp8192",
                        help=f"sp<VOCAB_SIZE>, sp<VOCAB_SIZE>{CASEOPS_SUFFIX} or byte260 (default: sp8192)")
    parser.add_argument("--train-shards", type=int, default=80, help="training shards to fetch (default: 80)")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent,
                        help="where datasets/ and tokenizers/ go (default: this data/ folder)")
    args = parser.parse_args(argv)
    try:
        if args.train_shards < 0:
            raise DownloadError(f"--train-shards {args.train_shards}: must be >= 0")
        download(args.variant, args.train_shards, args.data_dir)
    except DownloadError as exc:
        print(f"cached_challenge_fineweb.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
