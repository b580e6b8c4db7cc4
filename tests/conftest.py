"""Shared fixtures: tiny models per family (session-scoped, built once) and the embedded model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# CLI subprocesses (`python -m vishwamai_edge.cli` from a temporary folder) import this checkout's package
_ROOT = str(Path(__file__).parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (_ROOT, os.environ.get("PYTHONPATH"))))

import tiny_models  # noqa: E402

FAMILIES = {
    # family -> (tokenizer style, config overrides)
    "llama": ("llama3", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 64}}),
    "mistral": ("spm", {}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    # Gemma: (1 + weight) RMSNorm, tied embeddings, a head_dim of its own
    "gemma": ("spm", {"tie_word_embeddings": True, "head_dim": 32}),
}


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "llama3": tiny_models.train_bpe_tokenizer(root / "llama3", "llama3"),
        "qwen2": tiny_models.train_bpe_tokenizer(root / "qwen2", "qwen2"),
        "spm": tiny_models.train_sentencepiece_tokenizer(root / "spm"),
    }


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dirs):
    """tiny_model(family) -> HF folder of a random tiny model of that family, built once."""
    built: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in built:
            style, overrides = FAMILIES[family]
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            built[family] = tiny_models.build_tiny_model(out, family, tokenizer_dirs[style], **overrides)
        return built[family]

    return make


TOKENIZER_VARIANTS = {
    "gemma": lambda out, dirs: tiny_models.train_gemma_tokenizer(out),
    "gemma-spm-only": lambda out, dirs: tiny_models.train_gemma_tokenizer(out, tokenizer_json=False),
    "spm-json-only": lambda out, dirs: tiny_models.without_tokenizer_model(dirs["spm"], out),
    "llama2-spm-only": lambda out, dirs: tiny_models.train_llama2_spm_only_tokenizer(out),
}

VARIANTS = {
    # name -> (model family, tokenizer style, build options)
    "llama-bias": ("llama", "llama3", {"attention_bias": True, "bias_std": 0.5}),
    # Gemma's own tokenizer: <start_of_turn>/<end_of_turn> are pieces inside the SentencePiece model
    "gemma-chat": ("gemma", "gemma", {"tie_word_embeddings": True, "head_dim": 32}),
    "gemma-spm-only": ("gemma", "gemma-spm-only", {"tie_word_embeddings": True, "head_dim": 32}),
    # SentencePiece stored as tokenizer.json only (byte fallback), as a GGUF source's folder has it
    "mistral-json-only": ("mistral", "spm-json-only", {}),
    # an older Llama 2 / Vicuna folder: tokenizer.model only (no tokenizer.json), Llama 2 chat template
    "llama2-spm-only": ("llama", "llama2-spm-only", {}),
}


@pytest.fixture(scope="session")
def tiny_variant(tmp_path_factory, tokenizer_dirs):
    """tiny_variant(name) -> HF folder of one of VARIANTS (a family with another tokenizer or options)."""
    built: dict[str, Path] = {}
    tokenizers: dict[str, Path] = {}

    def tokenizer(style: str) -> Path:
        if style in tokenizer_dirs:
            return tokenizer_dirs[style]
        if style not in tokenizers:
            out = tmp_path_factory.mktemp("tok") / style
            tokenizers[style] = TOKENIZER_VARIANTS[style](out, tokenizer_dirs)
        return tokenizers[style]

    def make(name: str) -> Path:
        if name not in built:
            family, style, options = VARIANTS[name]
            out = tmp_path_factory.mktemp(f"tiny-{name}")
            built[name] = tiny_models.build_tiny_model(out, family, tokenizer(style), **options)
        return built[name]

    return make


@pytest.fixture(scope="session")
def embedded_hf_dir() -> Path:
    from vishwamai_edge.sources.embedded import embedded_hf_dir as resolve

    return resolve()


@pytest.fixture(scope="session")
def embedded_build(tmp_path_factory):
    """The embedded model built into a Q4_K_M laptop-cpu bundle once per test session."""
    from rich.console import Console

    from vishwamai_edge.build import build
    from vishwamai_edge.recipe import load_recipe
    from vishwamai_edge.targets import get_target

    out = tmp_path_factory.mktemp("build")
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "smollm2-135m.yaml")
    return build(recipe, get_target("laptop-cpu"), out, console=Console(stderr=True, quiet=True))


@pytest.fixture(scope="session")
def embedded_bundle(embedded_build) -> Path:
    return embedded_build.bundle


ADAPTER_NAME = "marrowick"


@pytest.fixture(scope="session")
def adapter_bundle(embedded_build, tmp_path_factory):
    """A copy of the embedded Q4_K_M bundle with the Marrowick LoRA added by `build --add-to`, trained
    beside the base build (the same stamps as tests/train/test_e2e_finetune.py: one training).
    Returns (bundle, (sha256, mtime, inode) of its model file before, the same after)."""
    import json
    import shutil
    import subprocess
    import sys

    from vishwamai_edge.demo import FINETUNE_RECIPE
    from vishwamai_edge.fsutil import sha256_file

    root = Path(__file__).parents[1]
    bundle = tmp_path_factory.mktemp("adapter-bundle") / "laptop-cpu"
    shutil.copytree(embedded_build.bundle, bundle)
    model = bundle / json.loads((bundle / "manifest.json").read_text())["llm"]["file"]
    before = (sha256_file(model), model.stat().st_mtime_ns, model.stat().st_ino)
    proc = subprocess.run(
        [sys.executable, "-m", "vishwamai_edge.cli", "build", "--recipe", str(root / FINETUNE_RECIPE), "--add-to",
         str(bundle), "--out", str(embedded_build.bundle.parents[1]), "--threads", "2", "--set",
         f"export.adapter.name={ADAPTER_NAME}"], capture_output=True, text=True, timeout=1200, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(bundle), ADAPTER_NAME]
    after = (sha256_file(model), model.stat().st_mtime_ns, model.stat().st_ino)
    return bundle, before, after


@pytest.fixture(scope="session")
def tiny_minicpm(tmp_path_factory, tokenizer_dirs):
    """tiny_minicpm(tied=False) -> HF folder of a random tiny MiniCPM LLM (SentencePiece tokenizer), built once."""
    import minicpm_models

    built: dict[bool, Path] = {}

    def make(tied: bool = False) -> Path:
        if tied not in built:
            out = tmp_path_factory.mktemp(f"tiny-minicpm-{'tied' if tied else 'untied'}")
            built[tied] = minicpm_models.build_tiny_minicpm(out, tokenizer_dirs["spm"], tie_word_embeddings=tied)
        return built[tied]

    return make


@pytest.fixture(scope="session")
def tiny_minicpmv(tmp_path_factory, tokenizer_dirs):
    """tiny_minicpmv("2.0" | "2.6") -> a random tiny MiniCPM-V folder with the published names, built once."""
    import minicpmv_models

    built: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in built:
            out = tmp_path_factory.mktemp(f"tiny-minicpmv-{variant}")
            tokenizer = tokenizer_dirs["spm" if variant == "2.0" else "qwen2"]
            built[variant] = minicpmv_models.build_tiny_minicpmv(out, variant, tokenizer)
        return built[variant]

    return make


# -- test tiers -----------------------------------------------------------------------------------
# `python -m pytest` runs the fast tier; `python -m pytest -m slow` the slow one (real weights at
# length, training to a quality bar, browsers, the Edge-LLM exporter). In the fast tier a test whose
# body (call and teardown) takes longer than FAST_LIMIT_S fails, and so does a setup longer than
# FAST_SETUP_LIMIT_S: a setup builds the shared fixtures (the embedded bundle, tiny models) that
# many tests then reuse, paid by whichever test comes first, so it gets its own, larger bound.
FAST_LIMIT_S = float(os.environ.get("VISHWAMAI_EDGE_FAST_LIMIT_S", "60"))
FAST_SETUP_LIMIT_S = float(os.environ.get("VISHWAMAI_EDGE_FAST_SETUP_LIMIT_S", "180"))
_SPENT = pytest.StashKey[dict]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    spent = item.stash.setdefault(_SPENT, {})
    spent[call.when] = call.duration
    if call.when != "teardown" or item.get_closest_marker("slow") is not None or not report.passed:
        return
    body, setup = spent.get("call", 0.0) + spent["teardown"], spent.get("setup", 0.0)
    if body > FAST_LIMIT_S or setup > FAST_SETUP_LIMIT_S:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} took {body:.0f} s (setup {setup:.0f} s) in the fast tier, over its "
                           f"limits ({FAST_LIMIT_S:.0f} s, setup {FAST_SETUP_LIMIT_S:.0f} s): make it smaller, "
                           "share its fixture, or mark it @pytest.mark.slow (tests/README.md)")
