"""Speculative decoding on the embedded model (the shipped SmolLM2-135M Q4_1 GGUF, 1 thread).

Greedy replies with prompt-lookup or draft-model drafts equal plain greedy replies token for
token, and leave the same KV cache behind; drafts really are accepted on quoting prompts; the
sampled acceptance rule draws from the target's distribution; a seeded sampled reply is
reproducible; a draft of another vocabulary, a missing or corrupt draft are one-line errors.

Why equality holds: the target verifies k + 1 positions of one sequence in one batch, and on
the Q4_1 model the batch's logits are bit-identical to one-token decoding's at any batch size
(test_verify_rows_match_one_token_decoding). On Q4_K_M they are not from 4 rows on (llama.cpp's
CPU kernels), and replies did change: the load-time check keeps drafts short enough there.
"""

from __future__ import annotations

import ctypes
import shutil

import numpy as np
import pytest

from vishwamai_edge.profile.speculative import CHAT_PROMPTS, QUOTE_PROMPTS
from vishwamai_edge.runtime.backends import SamplingParams, TokenSegment
from vishwamai_edge.runtime.engine import ChatRequest, Engine, Message
from vishwamai_edge.runtime.options import RuntimeOptions
from vishwamai_edge.runtime.pipeline import Pipeline
from vishwamai_edge.runtime.speculative import (
    SpeculativeCounts,
    SpeculativeOptions,
    Speculator,
    exact_verify_rows,
    lookup,
)
from vishwamai_edge.sources.embedded import embedded_gguf

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GREEDY = SamplingParams()
N = 48


@pytest.fixture(scope="module")
def shipped():
    return embedded_gguf()


@pytest.fixture(scope="module")
def pipeline(shipped):
    p = Pipeline.load(shipped, RuntimeOptions(n_ctx=1024, n_threads=1))
    yield p
    p.close()


def requantize(src, dst, ftype: int) -> None:
    """llama.cpp's own quantizer, from the shipped (already quantized) file."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@pytest.fixture(scope="module")
def q4_0_draft(shipped, tmp_path_factory):
    """The same model requantized to Q4_0: same vocabulary, other weights."""
    out = tmp_path_factory.mktemp("draft") / "smollm2-q4_0.gguf"
    requantize(shipped, out, 2)  # LLAMA_FTYPE_MOSTLY_Q4_0
    return out


def prompt_ids(pipeline, text: str) -> list[int]:
    session = pipeline.session()
    return session.prompt_tokens([*session.messages, {"role": "user", "content": text}])


def plain_tokens(llm, ids, n=N, sampling=GREEDY):
    llm.reset()
    llm.prefill([TokenSegment(ids)])
    return list(llm.stream(sampling, n)), llm.keys(0)


def spec_tokens(spec, llm, ids, n=N, sampling=GREEDY):
    llm.reset()
    llm.prefill([TokenSegment(ids)])
    counts = SpeculativeCounts()
    out = list(spec.stream(llm, sampling, n, counts))
    return out, llm.keys(0), counts


def test_lookup_finds_the_latest_longest_match():
    assert lookup([5, 6, 7, 8, 1, 2, 5, 6], 3) == [7, 8, 1]
    assert lookup([1, 2, 3, 9, 2, 3, 4, 1, 2, 3], 2) == [9, 2]  # 3-gram 1 2 3 first: its latest occurrence
    assert lookup([1, 2, 3], 4) == []
    assert lookup([4, 4], 5) == [4]  # an occurrence overlapping the suffix still drafts


def test_lookup_greedy_equals_plain_token_for_token(pipeline):
    llm = pipeline.llm
    spec = Speculator.load(SpeculativeOptions(mode="lookup"), llm)
    quoted = SpeculativeCounts()
    for text in QUOTE_PROMPTS + CHAT_PROMPTS:
        ids = prompt_ids(pipeline, text)
        plain, plain_keys = plain_tokens(llm, ids)
        fast, fast_keys, counts = spec_tokens(spec, llm, ids)
        assert fast == plain, text
        assert fast_keys == plain_keys  # the rejected drafts' cells are gone
        if text in QUOTE_PROMPTS:
            quoted.drafted += counts.drafted
            quoted.accepted += counts.accepted
    assert quoted.accepted > 0 and quoted.acceptance > 0.3, quoted  # the draft path really ran


def test_verify_rows_match_one_token_decoding(pipeline):
    """On the shipped Q4_1 model a batch of positions of one sequence gives, row for row, the very
    logits of one-token decoding (measured up to 16 rows: max difference 0.0), so drafts of any
    length keep greedy replies; no clamp, no note."""
    assert exact_verify_rows(pipeline.llm, 9) == (9, 0.0)
    spec = Speculator.load(SpeculativeOptions(mode="lookup", max_draft=8), pipeline.llm)
    assert spec.max_draft == 8 and spec.note is None


@pytest.fixture(scope="module")
def q4_k_m(shipped, tmp_path_factory):
    """Q4_K_M, the default bundle type (requantized from the shipped file: same kernels as a build)."""
    out = tmp_path_factory.mktemp("kq") / "smollm2-q4_k_m.gguf"
    requantize(shipped, out, 15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    p = Pipeline.load(out, RuntimeOptions(n_ctx=1024, n_threads=1))
    yield p
    p.close()


def test_q4_k_m_drafts_are_kept_to_exact_batches(q4_k_m):
    """llama.cpp's CPU kernels give a Q4_K_M model other logits in larger batches: with its repacked
    AVX kernels from 4 rows on (by up to about 1.5; at 8 draft tokens 5 of the 8 replies below
    changed), without them (an AMX host, model_params) from 8 rows on. The load-time check keeps
    drafts below the first inexact batch, and then every reply is the plain one."""
    llm = q4_k_m.llm
    exact, worst = exact_verify_rows(llm, 9)
    assert 1 < exact < 9 and worst > 0.01, (exact, worst)
    spec = Speculator.load(SpeculativeOptions(mode="lookup", max_draft=8), llm)
    assert spec.max_draft == exact - 1 and f"at most {exact - 1} draft tokens" in spec.note
    for text in QUOTE_PROMPTS + CHAT_PROMPTS:
        ids = prompt_ids(q4_k_m, text)
        plain, plain_keys = plain_tokens(llm, ids)
        fast, fast_keys, _ = spec_tokens(spec, llm, ids)
        assert fast == plain and fast_keys == plain_keys, text


def test_stop_string_and_budget_as_plain(pipeline):
    spec = Speculator.load(SpeculativeOptions(mode="lookup"), pipeline.llm)
    for stop, max_tokens in ((["1902"], 200), ([], 17), (["Agnes"], 9)):
        results = []
        for speculative in (False, spec):
            session = pipeline.session(max_tokens=max_tokens, stop=stop, speculative=speculative)
            pipeline.llm.reset()
            text = "".join(session.generate([{"role": "user", "content": QUOTE_PROMPTS[0]}]))
            st = session.last_stats
            results.append((text, st.completion_tokens, st.finish_reason, pipeline.llm.keys(0)))
        assert results[0] == results[1], stop
    assert "1902" not in results[0][0]


def same_as_plain(pipeline, spec, texts) -> SpeculativeCounts:
    """Each prompt's speculative greedy reply and KV cache equal plain decoding's; the drafts counted."""
    total = SpeculativeCounts()
    for text in texts:
        ids = prompt_ids(pipeline, text)
        plain, plain_keys = plain_tokens(pipeline.llm, ids)
        fast, fast_keys, counts = spec_tokens(spec, pipeline.llm, ids)
        assert fast == plain and fast_keys == plain_keys
        total.drafted += counts.drafted
        total.accepted += counts.accepted
    return total


def test_draft_model_equal_to_target_accepts_nearly_everything(pipeline, shipped):
    llm = pipeline.llm
    spec = Speculator.load(SpeculativeOptions(mode="draft", draft=shipped), llm, n_threads=1)
    try:
        counts_all = same_as_plain(pipeline, spec, (QUOTE_PROMPTS[2], CHAT_PROMPTS[0]))
        assert counts_all.drafted > 0 and counts_all.acceptance > 0.95, counts_all
    finally:
        spec.close()


def test_a_requantized_draft_model_gives_the_plain_reply(pipeline, q4_0_draft):
    llm = pipeline.llm
    spec = Speculator.load(SpeculativeOptions(mode="draft", draft=q4_0_draft), llm, n_threads=1)
    try:
        total = same_as_plain(pipeline, spec, (QUOTE_PROMPTS[1], CHAT_PROMPTS[1]))
        assert 0 < total.accepted < total.drafted  # another model: some drafts are rejected, most not
    finally:
        spec.close()


def test_seeded_sampled_replies_are_reproducible(pipeline, q4_0_draft):
    llm = pipeline.llm
    hot = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=7)
    ids = prompt_ids(pipeline, QUOTE_PROMPTS[3])
    greedy, _ = plain_tokens(llm, ids)
    lookup_spec = Speculator.load(SpeculativeOptions(mode="lookup"), llm)
    draft_spec = Speculator.load(SpeculativeOptions(mode="draft", draft=q4_0_draft), llm, n_threads=1)
    try:
        for spec in (lookup_spec, draft_spec):
            first, keys, counts = spec_tokens(spec, llm, ids, sampling=hot)
            again, keys_again, _ = spec_tokens(spec, llm, ids, sampling=hot)
            other, _, _ = spec_tokens(spec, llm, ids, sampling=SamplingParams(temperature=0.8, seed=8))
            # a sampled reply may draw the end token before N (42 tokens on an AVX2 host's kernels)
            assert first == again and keys == keys_again and 0 < len(first) <= N
            assert counts.accepted > 0
            assert first != greedy or other != greedy  # it did sample
    finally:
        draft_spec.close()


def _draw_many(pipeline, q: np.ndarray | None, trials: int, draft: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Verify a draft at the row after a fixed prompt `trials` times: `draft` itself when `q` is None
    (a point mass, as lookup drafts), else a token drawn from `q` each time, as a draft model draws.
    Returns (the target's candidate ids, their p, counts of emitted ids)."""
    llm = pipeline.llm
    hot = SamplingParams(temperature=1.0, top_k=8, top_p=1.0, min_p=0.0, seed=3)
    ids = prompt_ids(pipeline, "Name a colour.")
    llm.reset()
    llm.prefill([TokenSegment(ids[:-1])])
    row = llm.decode([(0, [ids[-1]], "all")])[0][0]
    spec = Speculator(SpeculativeOptions(mode="lookup"), None)
    rng = np.random.default_rng(11)
    chain = llm.sampler(hot, 0, final=False)
    try:
        cand, p = llm.distribution(chain, row)
        seen = np.zeros(llm.n_vocab)
        for _ in range(trials):
            d = draft if q is None else int(rng.choice(llm.n_vocab, p=q))
            tok, _ = spec._verify(llm, chain, row, d, q, False, rng)
            seen[tok] += 1
    finally:
        llm.free_sampler(chain)
    return cand, p, seen


@pytest.mark.parametrize("kind", ["point mass (lookup)", "draft distribution"])
def test_sampled_acceptance_rule_draws_from_the_target_distribution(pipeline, kind):
    """Whatever the draft, the emitted token's frequencies are the target's p (top-8 here)."""
    trials = 3000
    llm = pipeline.llm
    cand, p, _ = _draw_many(pipeline, None, 1)
    order = np.argsort(-p)
    q = None
    if kind == "draft distribution":  # a draft model wrong about the shape: flat over the top 5, and a token
        q = np.zeros(llm.n_vocab)    # the target never emits
        q[cand[order[:5]]] = 0.18
        q[int(np.setdiff1d(np.arange(llm.n_vocab), cand)[0])] = 0.1
    cand, p, seen = _draw_many(pipeline, q, trials, draft=int(cand[order[1]]))  # lookup: the 2nd likeliest
    freq = seen[cand] / trials
    assert seen.sum() == seen[cand].sum()  # nothing outside the target's candidates
    # each frequency within 4.5 standard errors of its probability
    assert np.all(np.abs(freq - p) <= 4.5 * np.sqrt(p * (1 - p) / trials) + 1e-9), (freq, p)
    if q is None:
        assert 0 < seen[int(cand[order[1]])] < trials  # the draft was accepted sometimes, not always


def test_engine_with_lookup_runs_one_at_a_time_and_answers_as_plain(shipped):
    request = ChatRequest((Message.text("user", QUOTE_PROMPTS[2]),), max_tokens=40)
    plain = Engine.load(shipped, RuntimeOptions(n_threads=1, parallel=1))
    try:
        expected = plain.submit(request).text()
    finally:
        plain.close()
    engine = Engine.load(shipped, RuntimeOptions(n_threads=1, speculative=SpeculativeOptions(mode="lookup"), parallel=None))
    try:
        assert engine.parallel == 1 and engine.status()["speculative"] == "lookup"
        gen = engine.submit(request)
        assert gen.text() == expected
        assert gen.stats.generation.accepted_tokens > 0
        victim = engine.submit(request)
        next(iter(victim))
        victim.cancel()
        victim.text()
        assert victim.stats.finish_reason == "cancelled"
        assert engine.submit(request).text() == expected  # the engine goes on after a cancel
    finally:
        engine.close()


# -- command line ------------------------------------------------------------------------------
def run_cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", *args], capture_output=True, text=True,
                          timeout=300)


def one_line_error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    return lines[0]


def test_chat_with_lookup_prints_the_plain_reply(shipped):
    args = ["chat", str(shipped), "-p", QUOTE_PROMPTS[1], "--max-tokens", "40", "--threads", "1"]
    plain = run_cli(*args)
    fast = run_cli(*args, "--speculative", "lookup")
    assert plain.returncode == 0 and fast.returncode == 0, fast.stderr
    assert fast.stdout == plain.stdout
    assert "lookup drafts accepted" in " ".join(fast.stderr.split())  # rich wraps at 80 columns


@pytest.fixture(scope="module")
def other_vocab_gguf(tiny_model, tmp_path_factory):
    """A real, loadable model with another tokenizer (the tiny random llama of tests/tiny_models.py)."""
    from vishwamai_edge.export.gguf import convert_hf_to_gguf

    return convert_hf_to_gguf(tiny_model("llama"), tmp_path_factory.mktemp("v") / "tiny.gguf", "f16").path


def test_bad_drafts_are_one_line_errors(shipped, other_vocab_gguf, tmp_path):
    chat = ["chat", str(shipped), "-p", "hi", "--max-tokens", "2", "--threads", "1"]
    line = one_line_error(run_cli(*chat, "--draft", str(other_vocab_gguf)))
    assert "another vocabulary" in line and "tiny.gguf" in line
    assert "does not exist" in one_line_error(run_cli(*chat, "--draft", str(tmp_path / "none.gguf")))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(shipped.read_bytes()[:200_000])
    assert "draft model" in one_line_error(run_cli(*chat, "--draft", str(broken)))
    assert "--draft" in one_line_error(run_cli(*chat, "--speculative", "draft"))
    assert "one of" in one_line_error(run_cli(*chat, "--speculative", "fast"))
    assert "--speculative lookup" in one_line_error(run_cli(*chat, "--speculative", "lookup", "--draft", str(shipped)))


def test_serve_refuses_speculative_with_several_slots(shipped):
    line = one_line_error(run_cli("serve", str(shipped), "--speculative", "lookup", "--parallel", "2",
                                  "--port", "18977"))
    assert "one request at a time" in line


def test_same_file_twice_is_the_same_vocabulary(shipped, tmp_path):
    from vishwamai_edge.runtime.backends.llamacpp import vocab_fingerprint_of

    copy = tmp_path / "copy.gguf"
    shutil.copyfile(shipped, copy)
    assert vocab_fingerprint_of(shipped) == vocab_fingerprint_of(copy)


def test_a_bundle_can_make_lookup_its_default(shipped, tmp_path):
    """`runtime.speculative: lookup` in the manifest (from the recipe) turns it on; the flag wins."""
    import os

    from pydantic import ValidationError

    from vishwamai_edge.recipe import RuntimeSpec
    from vishwamai_edge.runtime.bundle import write_manifest

    assert RuntimeSpec(speculative="lookup").speculative == "lookup"
    with pytest.raises(ValidationError):
        RuntimeSpec(speculative="draft")  # a draft model is named at run time, not shipped
    try:
        os.link(shipped, tmp_path / "model.gguf")
    except OSError:
        shutil.copyfile(shipped, tmp_path / "model.gguf")
    write_manifest(tmp_path, {"name": "spec", "llm": {"file": "model.gguf", "backend": "llamacpp"},
                              "runtime": {"speculative": "lookup"}}, ["model.gguf"])
    p = Pipeline.load(tmp_path, RuntimeOptions(n_ctx=256, n_threads=1, verify=False))
    try:
        assert p.speculative is not None and p.speculative.options.mode == "lookup"
        assert p.speculative.max_draft == 3  # laptop-cpu's draft_max (no target in this manifest)
    finally:
        p.close()
    p = Pipeline.load(tmp_path, RuntimeOptions(n_ctx=256, n_threads=1, verify=False, speculative=SpeculativeOptions()))
    try:
        assert p.speculative is None
    finally:
        p.close()
