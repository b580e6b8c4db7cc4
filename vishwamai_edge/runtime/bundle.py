"""Device bundles: a folder of artifacts plus `manifest.json`, written last.

The manifest lists every file with its size and sha256; `Bundle.load` refuses a
bundle whose files do not match, so a truncated copy or an edited file is caught
before a model is loaded. The runtime opens a bundle's files only through
`Bundle.file`, which accepts a path only if the manifest lists it and it resolves
inside the bundle folder (symlinks included): a manifest cannot make the device
load `/tmp/x.gguf` or `../x.gguf`. A bare `.gguf` file also opens as a bundle
(no manifest, no checks beyond the file's own header), for models built elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import BundleError
from ..fsutil import check_gguf_file, sha256_file, write_json
from .manifest import READS, SCHEMA_VERSION, LLMSection, Manifest, RuntimeDefaults, migrate

MANIFEST = "manifest.json"


@dataclass
class Bundle:
    root: Path
    manifest: Manifest
    bare_file: str | None = None  # a bare .gguf opened as a bundle: the one file it may open

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def llm(self) -> LLMSection:
        return self.manifest.llm

    def file(self, rel: str) -> Path:
        """The path of a file the bundle owns: listed in the manifest and inside the bundle folder."""
        if self.bare_file is not None:
            if rel != self.bare_file:
                raise BundleError(f"{self.root / self.bare_file} is a bare GGUF file; it has no {rel}")
            return self.root / rel
        if rel not in self.manifest.files:
            raise BundleError(f"bundle {self.root}: {rel!r} is not listed in the manifest's files")
        return _inside(self.root, rel)

    def llm_path(self) -> Path:
        return self.file(self.llm.file)

    @property
    def runtime_defaults(self) -> RuntimeDefaults:
        return self.manifest.runtime

    @classmethod
    def load(cls, path: Path | str, verify: bool = True) -> Bundle:
        path = Path(path)
        if path.is_file() and path.suffix == ".gguf":
            return cls.from_gguf(path)
        if not path.exists():
            raise BundleError(f"bundle {path} does not exist")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{path} is not a bundle: it has no {MANIFEST} (an unfinished build?)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
        bundle = cls(path, parse_manifest(manifest, manifest_path))
        bundle.llm_path()  # the model file must be one the manifest lists, inside the bundle
        if verify:
            bundle.verify()
        return bundle

    @classmethod
    def from_gguf(cls, path: Path) -> Bundle:
        try:
            check_gguf_file(path)
        except Exception as exc:
            raise BundleError(str(exc)) from None
        return cls(path.parent, Manifest(name=path.stem, llm=LLMSection(file=path.name)), bare_file=path.name)

    def verify(self) -> None:
        """Check every file listed in the manifest: inside the bundle, present, same size, same sha256."""
        for rel, info in self.manifest.files.items():
            f = _inside(self.root, rel)
            if not f.is_file():
                raise BundleError(f"bundle {self.root}: {rel} is missing")
            if f.stat().st_size != info.size:
                raise BundleError(
                    f"bundle {self.root}: {rel} is {f.stat().st_size} bytes, the manifest says {info.size} "
                    "(truncated or replaced; rebuild or copy it again)"
                )
            if sha256_file(f) != info.sha256:
                raise BundleError(
                    f"bundle {self.root}: {rel} does not match its sha256 in the manifest "
                    "(corrupted or modified; rebuild or copy it again)"
                )


def parse_manifest(data: Any, where: Path) -> Manifest:
    """A manifest's JSON as the typed manifest: schema 1 migrated, any other refused in one line."""
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version not in READS:
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise BundleError(f"{where}: manifest schema {version} is newer than this vishwamai-edge reads "
                              f"({SCHEMA_VERSION}); update vishwamai-edge, or rebuild the bundle with this one")
        raise BundleError(f"{where} is not a vishwamai-edge manifest this version reads (schema "
                          f"{', '.join(map(str, READS))}); rebuild the bundle with this version of vishwamai-edge")
    try:
        return Manifest.model_validate(migrate(data) if version == 1 else data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise BundleError(f"{where}: {loc}: {first['msg'].lower()}") from None


def _inside(root: Path, rel: str) -> Path:
    """root/rel, refused unless it is relative and resolves (through any symlink) inside root."""
    if not rel or Path(rel).is_absolute() or "\\" in rel:
        raise BundleError(f"bundle {root}: {rel!r} is not a path relative to the bundle folder")
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        raise BundleError(f"bundle {root}: {rel!r} points outside the bundle folder")
    return root / rel


def file_entry(root: Path, rel: str) -> dict[str, Any]:
    f = root / rel
    return {"size": f.stat().st_size, "sha256": sha256_file(f)}


def write_manifest(root: Path, manifest: dict[str, Any], files: list[str]) -> Path:
    """Hash `files` (paths relative to root) and write the manifest last, atomically, through the typed
    manifest (a section of the wrong shape fails the build, not the device)."""
    manifest = {**manifest, "schema_version": SCHEMA_VERSION,
                "files": {rel: file_entry(root, rel) for rel in files}}
    write_json(root / MANIFEST, Manifest.model_validate(manifest).dump())
    return root / MANIFEST


def add_files(root: Path, files: list[str], updates: dict[str, Any]) -> dict[str, Any]:
    """Add `files` (already in place under root) to an existing bundle's manifest and merge `updates`
    into its top-level sections; the files already listed are not hashed again. Written atomically."""
    manifest = parse_manifest(json.loads((root / MANIFEST).read_text()), root / MANIFEST).dump()
    for rel in files:
        _inside(root, rel)
        manifest["files"][rel] = file_entry(root, rel)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key] = {**manifest[key], **value}
        else:
            manifest[key] = value
    manifest = Manifest.model_validate(manifest).dump()
    write_json(root / MANIFEST, manifest)
    return manifest

