"""A sentence-embedding model beside any LLM (the recipe's `embeddings` section): exported to one ONNX graph that
pools and normalises as its sentence-transformers config says, checked against sentence-transformers; the
device embeds with it (`runtime.embeddings`)."""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..errors import SourceError
from ..fsutil import sha256_json
from ..recipe import Recipe
from ..stages.context import BuildContext, BundlePart, encoder_providers, folder_part
from ..stages.stamps import folder_fingerprint, mark_done, up_to_date

REL_DIR = "encoders/embedding"
# what a sentence-transformers repo holds that the export reads (no pickles)
HUB_FILES = ["config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
             "tokenizer*", "special_tokens_map.json", "vocab.txt", "*.safetensors", "1_Pooling/*"]


class SentenceEmbeddings:
    name = "embeddings"

    def wanted(self, recipe: Recipe) -> bool:
        return recipe.embeddings is not None

    def build(self, ctx: BuildContext) -> BundlePart:
        return stage_embeddings(ctx)


SECTION = SentenceEmbeddings()


def stage_embeddings(ctx: BuildContext) -> BundlePart:
    from ..export.onnx.sentence_embeddings import CONTRACT, export_sentence_embedder

    spec = ctx.recipe.embeddings
    assert spec is not None
    folder = _source(ctx)
    out = ctx.root / "export" / f"embedding-{spec.dtype}"
    inputs = sha256_json(["embedding", __version__, folder_fingerprint(folder, recursive=True), spec.dtype])
    if (cached := up_to_date(ctx, out, inputs, out.name)) is None:
        with ctx.console.status(f"exporting the embedding model to ONNX ({spec.dtype}), checking it against "
                                "sentence-transformers"):
            cached = export_sentence_embedder(folder, out, spec.dtype, ctx.n_threads).to_dict()
        mark_done(out, inputs, cached)
        check = cached["check"]
        ctx.console.print(f"[green]✓[/] {out.name}: min cosine {check['min_cosine']:.6f}, max |difference| "
                          f"{check['max_abs_diff']:.2g} against sentence-transformers")
    entry = {**cached, "kind": "sentence-embedding", "source": _name(ctx, folder),
             "files": {k: f"{REL_DIR}/{v}" for k, v in cached["files"].items()},
             "providers": encoder_providers(ctx.target)}
    files = [(f, rel) for f, rel in folder_part(out, REL_DIR) if f.name != CONTRACT]  # the manifest holds it
    return BundlePart(files, {"encoders": {"embedding": entry}, "checks": {"embedding": cached["check"]}},
                      ["onnxruntime"])


def _source(ctx: BuildContext) -> Path:
    from ..sources.embedded import embedded_sentence_embedder

    spec = ctx.recipe.embeddings
    assert spec is not None
    if spec.kind == "embedded":
        return embedded_sentence_embedder()
    if spec.kind == "hub":
        from ..sources.hub import download

        assert spec.repo is not None
        lock_dir = ctx.root / "embeddings"
        lock_dir.mkdir(parents=True, exist_ok=True)
        return download(spec.repo, spec.revision, HUB_FILES, allow_pickle=False, lock_dir=lock_dir).path
    assert spec.path is not None
    path = ctx.recipe.resolve(spec.path)
    if not path.is_dir():
        raise SourceError(f"{ctx.recipe.path}: embeddings.path: {path} is not a folder")
    return path


def _name(ctx: BuildContext, folder: Path) -> dict[str, str]:
    from ..sources.embedded import EMBEDDER_LICENSE, EMBEDDER_NAME

    spec = ctx.recipe.embeddings
    assert spec is not None
    if spec.kind == "embedded":
        return {"name": EMBEDDER_NAME, "license": EMBEDDER_LICENSE}
    if spec.kind == "hub":  # the snapshot folder is named by the commit it resolved to
        return {"name": str(spec.repo), "revision": spec.revision, "revision_sha": folder.name}
    return {"name": folder.name}
