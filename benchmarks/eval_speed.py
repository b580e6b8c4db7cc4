"""`eval` beside llama.cpp's `llama-perplexity` on the same work, one run: wall time and the numbers.

    python benchmarks/eval_speed.py --f16 build/smollm2-135m/export/model-f16.gguf \
        --bundle build/smollm2-135m/laptop-cpu [--text FILE] [--n-ctx 512] [--threads 2] [--json out.json]

Two jobs over the same text and windows, each timed as a whole process run from the command line
(model loading and tokenizing included, as a user waits for it):
- perplexity of the Q4_K_M bundle alone: `vishwamai-edge eval BUNDLE` against `llama-perplexity -m Q4.gguf`;
- KL divergence of the Q4_K_M bundle against the F16 GGUF: `vishwamai-edge eval F16 BUNDLE` against
  llama-perplexity's two runs (`--kl-divergence-base` on F16, writing its logits file, then
  `--kl-divergence` on Q4_K_M), timed together.
The text (default): the first 90,000 characters of the Python language reference that ships with
CPython (pydoc_data, PSF licence), about 22k tokens. llama-perplexity: `bash .ci/install-llama-tools`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "vishwamai_edge.cli"]


def default_text(path: Path, chars: int = 90_000) -> Path:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:chars], encoding="utf-8")
    return path


def run(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout + proc.stderr


def theirs_number(log: str, label: str) -> float:
    found = re.search(re.escape(label) + r"\s*[:=]\s*(-?[\d.]+)", log)
    return float(found.group(1)) if found else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--f16", type=Path, required=True, help="the unquantized GGUF (build/<recipe>/export/model-f16.gguf)")
    ap.add_argument("--bundle", type=Path, required=True, help="the Q4_K_M bundle folder")
    ap.add_argument("--text", type=Path)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tool = shutil.which("llama-perplexity")
    if tool is None:
        raise SystemExit("llama-perplexity is not on PATH: bash .ci/install-llama-tools")
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    q4 = args.bundle / manifest["llm"]["file"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        text = args.text or default_text(tmp_path / "text.txt")
        common = ["--text", str(text), "--n-ctx", str(args.n_ctx), "--threads", str(args.threads)]
        theirs_common = ["-f", str(text), "-c", str(args.n_ctx), "-t", str(args.threads)]

        ours_ppl_s, _ = run([*CLI, "eval", str(args.bundle), *common, "--out", str(tmp_path / "ppl")])
        ours_ppl = json.loads((tmp_path / "ppl" / "report.json").read_text())
        theirs_ppl_s, log_ppl = run([tool, "-m", str(q4), *theirs_common])

        ours_kld_s, _ = run([*CLI, "eval", str(args.f16), str(args.bundle), *common, "--out", str(tmp_path / "kld")])
        ours_kld = json.loads((tmp_path / "kld" / "report.json").read_text())
        base = tmp_path / "base.kld"
        base_s, _ = run([tool, "-m", str(args.f16), *theirs_common, "--kl-divergence-base", str(base)])
        kld_s, log_kld = run([tool, "-m", str(q4), "-c", str(args.n_ctx), "-t", str(args.threads),
                              "--kl-divergence-base", str(base), "--kl-divergence"])
        logits_file_mb = base.stat().st_size / 1e6

    row = ours_kld["bundles"][1]
    result = {
        "text_tokens": ours_ppl["text"]["tokens"], "windows": ours_ppl["windows"], "n_ctx": args.n_ctx,
        "threads": args.threads,
        "perplexity": {"ours_s": round(ours_ppl_s, 1), "llama_perplexity_s": round(theirs_ppl_s, 1),
                       "ours": ours_ppl["bundles"][0]["perplexity"],
                       "llama_perplexity": theirs_number(log_ppl, "Final estimate: PPL")},
        "kld": {"ours_s": round(ours_kld_s, 1), "llama_perplexity_s": round(base_s + kld_s, 1),
                "llama_perplexity_logits_file_mb": round(logits_file_mb, 1),
                "ours_kld_mean": row["kld_mean"], "llama_perplexity_kld_mean": theirs_number(log_kld, "Mean    KLD")},
    }
    p, k = result["perplexity"], result["kld"]
    print(f"{result['text_tokens']} tokens, {result['windows']} windows of {args.n_ctx}, {args.threads} threads")
    print(f"{'job':<34}{'eval s':>10}{'llama-perplexity s':>20}")
    print(f"{'perplexity of Q4_K_M':<34}{p['ours_s']:>10.1f}{p['llama_perplexity_s']:>20.1f}"
          f"   PPL {p['ours']:.4f} / {p['llama_perplexity']:.4f}")
    print(f"{'KLD of Q4_K_M against F16':<34}{k['ours_s']:>10.1f}{k['llama_perplexity_s']:>20.1f}"
          f"   mean KLD {k['ours_kld_mean']:.5f} / {k['llama_perplexity_kld_mean']:.5f}"
          f"   (its logits file: {k['llama_perplexity_logits_file_mb']:.0f} MB)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
