"""Device bundles: a folder of artifacts plus `manifest.json`, written last.

The manifest lists every file with its size and sha256; `Bundle.load` refuses a
bundle whose files do not match, so a truncated copy or an edited file is caught
before a model is loaded. A bare `.gguf` file also opens as a bundle (no manifest,
no checks beyond the file's own header), for models built elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BundleError
from ..fsutil import sha256_file, write_json

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.root.name)

    @property
    def llm(self) -> dict[str, Any]:
        return self.manifest["llm"]

    def path(self, rel: str) -> Path:
        return self.root / rel

    def llm_path(self) -> Path:
        return self.path(self.llm["file"])

    @property
    def runtime_defaults(self) -> dict[str, Any]:
        return self.manifest.get("runtime", {})

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
        if manifest.get("schema_version") != SCHEMA_VERSION or "files" not in manifest or "llm" not in manifest:
            raise BundleError(f"{manifest_path} is not a vishwamai-edge manifest of schema {SCHEMA_VERSION}")
        bundle = cls(path, manifest)
        if verify:
            bundle.verify()
        return bundle

    @classmethod
    def from_gguf(cls, path: Path) -> Bundle:
        from ..sources import check_gguf_file

        try:
            check_gguf_file(path)
        except Exception as exc:
            raise BundleError(str(exc)) from None
        return cls(
            path.parent,
            {"schema_version": SCHEMA_VERSION, "name": path.stem, "files": {},
             "llm": {"backend": "llamacpp", "format": "gguf", "file": path.name}},
        )

    def verify(self) -> None:
        """Check every file listed in the manifest: present, same size, same sha256."""
        for rel, info in self.manifest["files"].items():
            f = self.root / rel
            if not f.is_file():
                raise BundleError(f"bundle {self.root}: {rel} is missing")
            if f.stat().st_size != info["size"]:
                raise BundleError(
                    f"bundle {self.root}: {rel} is {f.stat().st_size} bytes, the manifest says {info['size']} "
                    "(truncated or replaced; rebuild or copy it again)"
                )
            if sha256_file(f) != info["sha256"]:
                raise BundleError(
                    f"bundle {self.root}: {rel} does not match its sha256 in the manifest "
                    "(corrupted or modified; rebuild or copy it again)"
                )


def file_entry(root: Path, rel: str) -> dict[str, Any]:
    f = root / rel
    return {"size": f.stat().st_size, "sha256": sha256_file(f)}


def write_manifest(root: Path, manifest: dict[str, Any], files: list[str]) -> Path:
    """Hash `files` (paths relative to root) and write the manifest last, atomically."""
    manifest = {"schema_version": SCHEMA_VERSION, **manifest}
    manifest["files"] = {rel: file_entry(root, rel) for rel in files}
    write_json(root / MANIFEST, manifest)
    return root / MANIFEST
