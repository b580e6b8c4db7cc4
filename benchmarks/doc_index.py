"""The document index's store against an approximate one, on 10,000 chunks: build rate, peak memory, query latency
(embedding + search) p50/p95, size on disk, and the approximate store's recall against the exact search.

    python benchmarks/doc_index.py --bundle build/smollm2-135m/laptop-cpu [--chunks 10000] [--threads 2]

ours     runtime/doc_index.py: SQLite (standard library) rows with float32 vectors, exact inner product in numpy
usearch  usearch 2.x HNSW (cosine, f32) on the same vectors, saved to one file (pip install usearch)

The chunks are generated maintenance notes of about 180 tokens (four notes of tests/doc_sets.py drawn for each file), one
chunk a file; every file is embedded once by the bundle's model, and both stores get the same vectors.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("build/smollm2-135m/laptop-cpu"))
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from doc_sets import body, notes

    from vishwamai_edge.runtime.doc_index import DocIndex, bundle_embedder, find_documents

    work = Path(tempfile.mkdtemp(prefix="doc-index-bench-"))
    pool = notes(n=400, seed=1)
    docs = work / "docs"
    docs.mkdir()
    draw = np.random.default_rng(1)
    for i in range(args.chunks):
        group = [pool[int(j)] for j in draw.choice(len(pool), 4, replace=False)]
        (docs / f"d{i:05d}.txt").write_text(f"Sheet {i}. " + " ".join(body(n) for n in group))
    embedder = bundle_embedder(args.bundle, args.threads)
    rss0 = rss_mb()

    # ours, end to end: read, chunk, embed, store in one transaction
    index = DocIndex.open(work / "ours.sqlite", embedder, create=True)
    t0 = time.perf_counter()
    report = index.update(find_documents([docs]), 240, 32, root=docs)
    build_s = time.perf_counter() - t0
    assert report.chunks == args.chunks, report.chunks
    rss_build = rss_mb()
    rng = np.random.default_rng(0)
    questions = [pool[int(j)].question for j in rng.integers(0, len(pool), args.queries)]
    embed_ms, ours_ms = [], []
    index.search(questions[0])  # loads the vectors
    for q in questions:
        t = time.perf_counter()
        vec = embedder.embed([q])[0]
        t1 = time.perf_counter()
        scores = index.store._matrix @ vec
        exact = np.argsort(-scores)[:10]
        t2 = time.perf_counter()
        embed_ms.append((t1 - t) * 1000)
        ours_ms.append((t2 - t1) * 1000)
    matrix, ids = index.store._matrix, index.store._ids
    ours_bytes = (work / "ours.sqlite").stat().st_size

    # usearch on the same vectors
    from usearch.index import Index

    t0 = time.perf_counter()
    approx = Index(ndim=matrix.shape[1], metric="cos", dtype="f32")
    approx.add(np.arange(len(ids)), matrix)
    usearch_build_s = time.perf_counter() - t0
    approx.save(str(work / "usearch.index"))
    usearch_bytes = (work / "usearch.index").stat().st_size
    us_ms, recall = [], []
    for q in questions:
        vec = embedder.embed([q])[0]
        t = time.perf_counter()
        found = approx.search(vec, 10).keys
        us_ms.append((time.perf_counter() - t) * 1000)
        exact = set(np.argsort(-(matrix @ vec))[:10].tolist())
        recall.append(len(exact & set(int(k) for k in found)) / 10)

    def pct(xs, p):
        return float(np.percentile(xs, p))

    print(f"\n{args.chunks} chunks of about 180 tokens, {args.threads} threads, {args.queries} questions\n")
    print("| store | build | peak RSS | size on disk | query p50 / p95 (embedding + search) | search alone p50 / p95 | recall@10 |")
    print("|---|---|---|---|---|---|---|")
    emb50, emb95 = pct(embed_ms, 50), pct(embed_ms, 95)
    print(f"| ours (SQLite + exact numpy) | {build_s:.0f} s, {args.chunks / build_s:.0f} chunks/s (embedding included) | "
          f"{rss_build:.0f} MB (model loaded: {rss0:.0f}) | {ours_bytes / 2**20:.1f} MB | "
          f"{pct([a + b for a, b in zip(embed_ms, ours_ms)], 50):.1f} / {pct([a + b for a, b in zip(embed_ms, ours_ms)], 95):.1f} ms | "
          f"{pct(ours_ms, 50):.2f} / {pct(ours_ms, 95):.2f} ms | 1.000 |")
    print(f"| usearch HNSW (vectors only) | {usearch_build_s:.1f} s for the vectors (+ the same embedding) | "
          f"{rss_mb():.0f} MB | {usearch_bytes / 2**20:.1f} MB (+ the chunks' text elsewhere) | "
          f"{pct([a + b for a, b in zip(embed_ms, us_ms)], 50):.1f} / {pct([a + b for a, b in zip(embed_ms, us_ms)], 95):.1f} ms | "
          f"{pct(us_ms, 50):.2f} / {pct(us_ms, 95):.2f} ms | {statistics.mean(recall):.3f} |")
    print(f"\nembedding a question alone: p50 {emb50:.1f} ms, p95 {emb95:.1f} ms")


if __name__ == "__main__":
    main()
