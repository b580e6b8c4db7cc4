"""The SHA-256 of every file of every shipped recipe's bundle, manifest.json aside: run before and after a
change to the build's code and compare the two listings (a refactor must leave the bundles byte for byte).

    python tests/bundle_digests.py SOURCES OUT > digests.json

Recipes whose weights are published only on the Hub (LLaVA-1.5, VILA1.5, MiniCPM-V) are built from the tiny
checkpoints in their published layouts that the tests use; SOURCES keeps those checkpoints (made on the first
run, reused after, so two runs see the same inputs). The embedded recipes run on their real weights, the
training ones for a few steps. A build finished in OUT by an earlier run of the same code is not repeated.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
F32 = ["export.gguf.outtype=f32", "export.gguf.quants=[]", "export.gguf.imatrix=false"]
SHORT_TRAINING = ["finetune.steps=2", "finetune.save_every=2", "finetune.eval_every=2"]


def sources(folder: Path) -> dict[str, Path]:
    import minicpmv_models
    import tiny_models
    import vila_models
    import vision_models
    from whisper_models import build_tiny_whisper_encoder_folder

    done = folder / "done"
    paths = {
        "llava": folder / "llava-1.5-7b-hf", "vila": folder / "VILA1.5-3b", "vila-awq": folder / "VILA1.5-3b-AWQ",
        "minicpmv-2.0": folder / "minicpmv-2.0", "minicpmv-2.6": folder / "minicpmv-2.6",
        "llama": folder / "llama", "whisper-encoder": folder / "whisper-encoder",
    }
    if done.exists():
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    spm = tiny_models.train_sentencepiece_tokenizer(folder / "tok-spm")
    qwen2 = tiny_models.train_bpe_tokenizer(folder / "tok-qwen2", "qwen2")
    llama3 = tiny_models.train_bpe_tokenizer(folder / "tok-llama3", "llama3")
    vision_models.build_tiny_llava15_hf(paths["llava"], folder / "work")
    vila_models.build_tiny_vila(paths["vila"])
    vila_models.build_tiny_vila_awq(paths["vila-awq"])
    minicpmv_models.build_tiny_minicpmv(paths["minicpmv-2.0"], "2.0", spm)
    minicpmv_models.build_tiny_minicpmv(paths["minicpmv-2.6"], "2.6", qwen2)
    tiny_models.build_tiny_model(paths["llama"], "llama", llama3)
    build_tiny_whisper_encoder_folder(paths["whisper-encoder"])
    done.write_text("")
    return paths


def audio_recipe(src: dict[str, Path], work: Path) -> Path:
    """An LLM that hears (align with a Whisper encoder), as tests/test_audio_embeddings_e2e.py builds it."""
    from whisper_models import write_tone

    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(4):
        write_tone(work / f"t{i}.wav", 300.0 + 400 * i, seconds=0.6, seed=i)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "audio", "audio": f"t{i}.wav"}, {"type": "text", "text": "Pitch?"}]},
            {"role": "assistant", "content": "High." if i % 2 else "Low."}]})
    (work / "tones.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = work / "tiny-audio.yaml"
    recipe.write_text(json.dumps({
        "name": "tiny-audio", "source": {"kind": "hf", "path": str(src["llama"])},
        "export": {"gguf": {"outtype": "f32", "quants": [], "imatrix": False}, "audio": {"dtype": "fp32"}},
        "finetune": {"method": "align", "dataset": {"train": "tones.jsonl"}, "steps": 2, "batch_size": 2,
                     "micro_batch_size": 1, "max_seq_len": 256, "lr": 1e-3, "lora": {"r": 4, "alpha": 8},
                     "align": {"encoder": {"kind": "whisper", "path": str(src["whisper-encoder"])},
                               "projector": {"stack": 10}, "stage2_steps": 1}}}))
    return recipe


def builds(src: dict[str, Path], out: Path) -> list[tuple[str, Path, list[str], str, str | None]]:
    """(label, recipe, overrides, target, quant) for every shipped recipe, and the aligned audio family."""
    edge_off = ["export.engines.edgellm=false", "export.engines.clip=false"]
    return [
        ("smollm2-135m", RECIPES / "smollm2-135m.yaml", [], "laptop-cpu", None),
        ("smollm2-135m-orin", RECIPES / "smollm2-135m.yaml", edge_off, "orin-nano-8", None),
        ("smollm2-135m-whisper", RECIPES / "smollm2-135m-whisper.yaml", [], "laptop-cpu", None),
        ("smollm2-135m-finetune", RECIPES / "smollm2-135m-finetune.yaml", SHORT_TRAINING, "laptop-cpu", None),
        ("smollm2-135m-vision", RECIPES / "smollm2-135m-vision.yaml",
         [*SHORT_TRAINING, "finetune.dataset.shapes.train=12", "finetune.dataset.shapes.eval=6"], "laptop-cpu", None),
        ("llava-1.5-7b", RECIPES / "llava-1.5-7b.yaml", [f"source.path={src['llava']}", *F32,
                                                         "export.vision.dtype=fp32"], "laptop-cpu", "f32"),
        ("vila1.5-3b", RECIPES / "vila1.5-3b.yaml", [f"source.path={src['vila']}", *F32, "export.vision.dtype=fp32",
                                                     "export.engines.edgellm=false"], "laptop-cpu", "f32"),
        ("vila1.5-3b-awq", RECIPES / "vila1.5-3b.yaml", [f"source.path={src['vila-awq']}", *edge_off],
         "orin-nano-8", None),
        ("minicpm-v-2", RECIPES / "minicpm-v-2.yaml", [f"source.path={src['minicpmv-2.0']}", *F32], "laptop-cpu",
         "f32"),
        ("minicpm-v-2_6", RECIPES / "minicpm-v-2_6.yaml", [f"source.path={src['minicpmv-2.6']}", *F32],
         "laptop-cpu", "f32"),
        ("tiny-audio", audio_recipe(src, out / "audio-recipe"), [], "laptop-cpu", "f32"),
    ]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(sources_dir: Path, out: Path) -> None:
    from rich.console import Console

    from vishwamai_edge.build import build
    from vishwamai_edge.recipe import load_recipe
    from vishwamai_edge.targets import get_target

    src = sources(sources_dir)
    out.mkdir(parents=True, exist_ok=True)
    listing: dict[str, dict[str, str]] = {}
    for label, recipe_path, overrides, target, quant in builds(src, out):
        done = out / f"{label}.done"
        if not done.is_file():
            print(f"building {label}", file=sys.stderr, flush=True)
            shutil.rmtree(out / label, ignore_errors=True)
            recipe = load_recipe(recipe_path, overrides)
            result = build(recipe, get_target(target), out / label, quant=quant, n_threads=2,
                           console=Console(stderr=True, quiet=True))
            done.write_text(str(result.bundle))
        bundle = Path(done.read_text().strip())
        listing[label] = {str(p.relative_to(bundle)): sha256(p) for p in sorted(bundle.rglob("*"))
                          if p.is_file() and p.name != "manifest.json"}
    json.dump(listing, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
