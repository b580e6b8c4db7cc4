"""Models by Hugging Face Hub id: `source: {kind: hub, repo: ORG/NAME, revision: main}`.

`huggingface_hub.snapshot_download` fetches only what the stages read (configs,
tokenizer, chat template, safetensors; never pickles unless the recipe allows
them) into the shared HF cache, with its progress bars; HF_TOKEN, HF_ENDPOINT,
HF_HOME and HF_HUB_OFFLINE are honoured as huggingface_hub reads them.

The commit a build used is written to `build/<recipe>/source-hub.json`; a later
build of the same repo, revision and patterns takes that commit from the cache
without any request (so a bundle rebuilt later holds the same weights). Delete
that file, or change `source.revision`, to resolve the branch again.

Resuming: files already downloaded are kept, so a rerun fetches only the rest.
Within one file huggingface_hub resumes a dropped connection itself (Range
requests, 5 tries); a partial file left by a killed process is not reused
(huggingface_hub 2.4 downloads to a process-unique temporary, PR 4228).
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import SourceError, first_line, require
from ..fsutil import write_json
from .folders import check_hf_dir

LOCK_FILE = "source-hub.json"

# What the stages read from an HF folder (export, checks, vision, chat template).
STAGE_FILES = [
    "config*.json", "generation_config.json", "tokenizer*", "*.model", "special_tokens_map.json",
    "chat_template*", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json",
]
PICKLE_FILES = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "*.bin.index.json"]


@dataclass
class HubSnapshot:
    path: Path  # the snapshot folder in the HF cache
    repo: str
    revision: str  # as the recipe names it
    sha: str  # the commit it resolved to

    def record(self) -> dict:
        return {"repo": self.repo, "revision": self.revision, "revision_sha": self.sha}


def download(
    repo: str, revision: str, patterns: list[str] | None, allow_pickle: bool, lock_dir: Path | None = None,
) -> HubSnapshot:
    """The repo's files at `revision` (only `patterns`, default STAGE_FILES) in the HF cache."""
    hub = require("huggingface_hub", "build")
    allow = list(patterns or STAGE_FILES)
    ignore = None if allow_pickle else PICKLE_FILES
    key = {"repo": repo, "revision": revision, "allow": allow, "ignore": ignore}
    lock = _read_lock(lock_dir, key)
    if lock is not None:  # this build resolved it before: the same commit, from the cache, no request
        try:
            path = _snapshot(hub, repo, lock["revision_sha"], allow, ignore, local_files_only=True)
            return HubSnapshot(Path(path), repo, revision, lock["revision_sha"])
        except Exception:  # noqa: BLE001 - not (fully) cached any more: fetch the recorded commit
            revision_to_fetch = lock["revision_sha"]
    else:
        revision_to_fetch = revision
    try:
        path = Path(_snapshot(hub, repo, revision_to_fetch, allow, ignore))
    except Exception as exc:  # noqa: BLE001 - mapped to one line below, or re-raised
        raise hub_error(exc, repo, revision_to_fetch) from None
    snap = HubSnapshot(path, repo, revision, path.name)
    if lock_dir is not None:
        write_json(lock_dir / LOCK_FILE, {**snap.record(), "key": key})
    return snap


def _snapshot(hub, repo: str, revision: str, allow, ignore, local_files_only: bool = False) -> str:
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry warnings would break the one-line error; the bars stay
    return hub.snapshot_download(
        repo, revision=revision, allow_patterns=allow, ignore_patterns=ignore, local_files_only=local_files_only,
    )


def _read_lock(lock_dir: Path | None, key: dict) -> dict | None:
    if lock_dir is None:
        return None
    try:
        data = json.loads((lock_dir / LOCK_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("key") == key and data.get("revision_sha") else None


def read_record(lock_dir: Path) -> dict | None:
    """repo, revision and revision_sha of the last hub source resolved for this build folder."""
    try:
        data = json.loads((lock_dir / LOCK_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return {k: data[k] for k in ("repo", "revision", "revision_sha") if k in data}


def hub_error(exc: BaseException, repo: str, revision: str) -> BaseException:
    """huggingface_hub's (and httpx's) exceptions as one-line SourceErrors; anything else unchanged."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub import errors as e

    where = f"{repo}@{revision}"
    endpoint = constants.ENDPOINT
    if isinstance(exc, e.GatedRepoError):
        if _token():
            return SourceError(f"Hub repo {repo} is gated and the token in HF_TOKEN has no access: "
                               f"accept its terms at {endpoint}/{repo} with that account")
        return SourceError(f"Hub repo {repo} is gated: accept its terms at {endpoint}/{repo} and set HF_TOKEN "
                           "to an access token of that account")
    if isinstance(exc, e.RevisionNotFoundError):
        return SourceError(f"revision {revision!r} does not exist in Hub repo {repo} (source.revision)")
    if isinstance(exc, e.RepositoryNotFoundError):
        private = "" if _token() else " (a private repo needs HF_TOKEN)"
        return SourceError(f"Hub repo {repo} does not exist at {endpoint}{private} (source.repo)")
    if isinstance(exc, (e.LocalEntryNotFoundError, e.OfflineModeIsEnabled)):
        if constants.is_offline_mode():
            return SourceError(f"HF_HUB_OFFLINE is set and {where} is not (fully) in the cache "
                               f"{constants.HF_HUB_CACHE}; unset HF_HUB_OFFLINE to download it")
        return SourceError(f"cannot reach the Hub at {endpoint} and {where} is not in the cache: check the "
                           "network (set HF_HUB_OFFLINE=1 to build from a cached copy only)")
    if isinstance(exc, (httpx2.TransportError, e.FileMetadataError)) or (
        isinstance(exc, OSError) and "Consistency check failed" in str(exc)
    ):
        return SourceError(f"download of {where} was interrupted ({first_line(exc)}); rerun the build to resume "
                           "(finished files are kept)")
    if isinstance(exc, e.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return SourceError(f"the Hub answered HTTP {status} for {where}: {first_line(exc)}")
    return exc


def check_snapshot(snap: HubSnapshot, allow_pickle: bool, lock_dir: Path) -> Path:
    """The snapshot as an HF folder the stages can read: safetensors, or pickles converted (allow_pickle)."""
    if any(snap.path.glob("*.safetensors")):
        return snap.path
    listed = _listed_files(snap)
    pickles = [f for f in listed if any(fnmatch.fnmatch(f, p) for p in PICKLE_FILES[:-1])]
    if not pickles:
        raise SourceError(f"Hub repo {snap.repo}@{snap.sha[:12]} has no *.safetensors weights")
    if not allow_pickle:
        raise SourceError(
            f"Hub repo {snap.repo}@{snap.sha[:12]} has no *.safetensors weights, only pickles "
            f"({', '.join(pickles[:3])}); set source.allow_pickle: true to load them (pickles can run code)"
        )
    # the same commit (its tree listing is cached: only the pickles are requested)
    hub = require("huggingface_hub", "build")
    try:
        _snapshot(hub, snap.repo, snap.sha, STAGE_FILES + PICKLE_FILES, None)
    except Exception as exc:  # noqa: BLE001
        raise hub_error(exc, snap.repo, snap.sha) from None
    return pickles_to_safetensors(snap.path, lock_dir / "source")


def _listed_files(snap: HubSnapshot) -> list[str]:
    """The repo's files at the commit, from the tree listing snapshot_download cached (no request)."""
    try:
        from huggingface_hub import get_cached_repo_tree

        return sorted(f.path for f in get_cached_repo_tree(snap.repo, revision=snap.sha))
    except Exception:  # noqa: BLE001 - no listing cached: say what is on disk
        return sorted(p.name for p in snap.path.iterdir())


def pickles_to_safetensors(src: Path, out_dir: Path) -> Path:
    """torch pickles (weights only) -> an HF folder with the same tensors in safetensors, once per commit."""
    from ..fsutil import atomic_dir, copy_hf_dir

    stamp = out_dir / ".from-snapshot"
    if stamp.is_file() and stamp.read_text() == str(src):
        return out_dir
    from safetensors.torch import save_file

    from .pickles import load_tensors

    shards = sorted(p for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth") and p.is_file())
    with atomic_dir(out_dir) as tmp:
        copy_hf_dir(src, tmp)
        weight_map: dict[str, str] = {}
        for shard in shards:
            (tmp / shard.name).unlink()
            state = load_tensors(shard, mmap=True)
            name = shard.with_suffix(".safetensors").name.replace("pytorch_model", "model")
            save_file({k: v.contiguous() for k, v in state.items()}, tmp / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in state})
        for index in tmp.glob("*.bin.index.json"):
            data = json.loads(index.read_text())
            index.unlink()
            if len(shards) > 1:
                data["weight_map"] = weight_map
                (tmp / "model.safetensors.index.json").write_text(json.dumps(data, indent=2))
        (tmp / ".from-snapshot").write_text(str(src))
    return out_dir


def select_gguf(snap: HubSnapshot, patterns: list[str] | None) -> Path:
    """The one GGUF file a `use_as_is` hub source names with source.files."""
    found = sorted(
        p for p in snap.path.rglob("*.gguf")
        if any(fnmatch.fnmatch(p.relative_to(snap.path).as_posix(), pat) for pat in patterns or ["*.gguf"])
    )
    if not found:
        raise SourceError(f"Hub repo {snap.repo}@{snap.sha[:12]} has no GGUF file matching source.files")
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4])
        raise SourceError(f"{len(found)} GGUF files of {snap.repo} match source.files ({names}); name one")
    return found[0]


def link_out(path: Path, out_dir: Path) -> Path:
    """A cache snapshot's file (a relative symlink to its blob) as a real file of the same name and bytes.

    A bundle holds no symlinks: hard-linked where the disk allows, else copied.
    """
    import shutil

    blob = path.resolve()
    out = out_dir / path.name
    if out.is_file() and os.path.samefile(out, blob):
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(blob, tmp)
    except OSError:
        shutil.copy2(blob, tmp)
    os.replace(tmp, out)
    return out


def _token() -> str | None:
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def hub_source(spec, root: Path) -> Path:
    """A `kind: hub` source: the HF folder (or, with use_as_is, the GGUF file) from the Hub cache."""
    snap = download(spec.repo, spec.revision, spec.files, spec.allow_pickle, lock_dir=root)
    if spec.use_as_is:
        return link_out(select_gguf(snap, spec.files), root / "source")
    return check_hf_dir(check_snapshot(snap, spec.allow_pickle, root))
