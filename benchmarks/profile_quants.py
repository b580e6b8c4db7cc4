"""Profile one model at several quantisations, side by side, with `vishwamai-edge profile`.

    python benchmarks/profile_quants.py                      # embedded SmolLM2: F16, Q8_0, Q4_K_M
    python benchmarks/profile_quants.py --recipe recipes/x.yaml --quants f16,q4_k_m --target orin-nx-16

Builds any missing bundle (resumable: finished stages are skipped), then runs every
profile scenario on all of them in one report: decode speed against context, time to
first token, peak memory, roofline ratio, and the runtime-overhead scenario (this
runtime's decode loop against raw llama-cpp-python on the same GGUF and threads).
Output: <out>/report.json, report.md, report.html, plots/*.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vishwamai_edge.build import build  # noqa: E402
from vishwamai_edge.profile import run_profile  # noqa: E402
from vishwamai_edge.recipe import load_recipe  # noqa: E402
from vishwamai_edge.runtime.bundle import MANIFEST  # noqa: E402
from vishwamai_edge.targets import get_target  # noqa: E402


def bundle_dir(build_root: Path, recipe_name: str, target, quant: str) -> Path:
    # build.py's naming: the target's default quantisation gets the plain target name
    name = target.name if quant == target.gguf_quant else f"{target.name}-{quant}"
    return build_root / recipe_name / name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "smollm2-135m.yaml")
    p.add_argument("--target", default="laptop-cpu", help="target profile the bundles are built for")
    p.add_argument("--quants", default="f16,q8_0,q4_k_m")
    p.add_argument("--build-root", type=Path, default=Path("build"))
    p.add_argument("--out", type=Path, default=None, help="default: build/profiles/<recipe>-quants")
    p.add_argument("--scenarios", default="all")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--machine", default=None, help="target profile of this machine (roofline bandwidth)")
    args = p.parse_args()

    console = Console(stderr=True)
    recipe = load_recipe(args.recipe)
    target = get_target(args.target)
    bundles = []
    for quant in [q.strip() for q in args.quants.split(",") if q.strip()]:
        path = bundle_dir(args.build_root, recipe.name, target, quant)
        if not (path / MANIFEST).is_file():
            console.print(f"building {path}")
            path = build(recipe, target, args.build_root, quant, args.threads, console=console).bundle
        bundles.append(path)
    out = args.out or Path("build/profiles") / f"{recipe.name}-quants"
    run_profile(bundles, out, args.scenarios, args.repeat, args.warmup, args.threads, None, args.machine,
                args.decode_tokens, console=console)
    print(out / "report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
