"""Speculative decoding on the llama.cpp backend, lossless.

A drafter proposes the next few tokens cheaply; the target model evaluates the last emitted
token and every draft token in one `llama_decode` (logits for all of them) and keeps the longest
prefix it agrees with, plus one token of its own, so each round emits between 1 and k + 1 tokens
for one pass over the target's weights. Two drafters:

- prompt lookup: the last n tokens of the conversation (prompt and reply) looked up earlier in
  it, and the tokens that followed proposed (no second model; quoting and extraction gain most);
- a draft model: a second, smaller GGUF with the same vocabulary, decoding greedily (or sampling
  at the same settings) a few tokens ahead in a context of its own.

Greedy: a draft token is accepted when it is the target's argmax at its position, so the reply
is the target's greedy reply. Sampled: the standard rule (Leviathan et al. 2023, Chen et al.
2023): accept draft token d with probability min(1, p(d) / q(d)), else draw from the normalised
residual max(0, p - q); a lookup draft is a point mass (q(d) = 1), so d is accepted with
probability p(d) and the residual is p without d. p is the target's distribution after the
request's own filters (penalties, top-k, top-p, min-p, temperature: llama.cpp's sampler chain,
applied to the row's logits), so the output has exactly the plain sampler's distribution; the
random draws come from a numpy generator seeded with the request's seed (reproducible, but not
the same draws as llama.cpp's dist sampler).

The KV cache ends as plain decoding leaves it: the cells of rejected drafts are removed
(`llama_memory_seq_rm`), and when the reply ends the positions plain decoding would not have
evaluated yet are removed too. One request at a time (the single-stream path of `ChatSession`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import BundleError, InputError
from .backends import SamplingParams, SupportsRollback, TokenSegment

MODES = ("off", "lookup", "draft")
DEFAULT_MAX_DRAFT = 8  # without a target's (targets.py draft_max)
_EMBEDDING_KEY = -1  # the backend's key for positions filled from embeddings


@dataclass(frozen=True)
class SpeculativeOptions:
    mode: str = "off"  # off | lookup | draft
    draft: Path | None = None  # the draft model's GGUF (mode draft)
    max_draft: int | None = None  # draft tokens per round at most (None: the bundle's target's)
    # lookup: the suffix of the conversation looked up, longest first; shorter matches than 3 tokens
    # were right too seldom to pay for their rows (benchmarks/speculative.py)
    ngram_max: int = 4
    ngram_min: int = 3
    p_min: float = 0.5  # draft model, greedy: stop drafting when its own top probability falls below

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"--speculative must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.mode == "draft" and self.draft is None:
            raise InputError("--speculative draft needs a draft model: --draft PATH.gguf")
        if self.mode != "draft" and self.draft is not None:
            raise InputError("--draft is a draft model for --speculative draft (given: "
                             f"--speculative {self.mode})")
        if self.max_draft is not None and not 1 <= self.max_draft <= 64:
            raise InputError(f"--draft-max must be 1 to 64, got {self.max_draft}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise InputError("the lookup n-gram sizes must satisfy 1 <= ngram_min <= ngram_max")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def resolve_options(mode: str | None, draft: Path | str | None, max_draft: int | None,
                    bundle_default: str | None = None) -> SpeculativeOptions:
    """Command-line choices over the bundle's `runtime.speculative`: --draft alone means draft mode."""
    if mode is None:
        mode = "draft" if draft is not None else (bundle_default or "off")
    extra = {"max_draft": max_draft} if max_draft is not None else {}
    return SpeculativeOptions(mode=mode, draft=Path(draft) if draft is not None else None, **extra)


@dataclass
class SpeculativeCounts:
    rounds: int = 0  # target evaluations that carried draft tokens
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Drafter(Protocol):
    def begin(self) -> None:
        """A reply starts."""

    def draft(self, history: list[int], n: int, sampling: SamplingParams, rng: np.random.Generator
              ) -> tuple[list[int], list[np.ndarray] | None]:
        """Up to `n` tokens to follow `history`, and the dense distribution each was drawn from
        (None: deterministic drafts, a point mass on each)."""

    def close(self) -> None: ...


class LookupDrafter:
    """Prompt lookup: the longest recent suffix (ngram_max down to ngram_min tokens) found earlier in
    the conversation; the tokens after its latest earlier occurrence are the draft."""

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1):
        self.ngram_max, self.ngram_min = ngram_max, ngram_min

    def begin(self) -> None:
        pass

    def draft(self, history: list[int], n: int, sampling: SamplingParams | None = None,
              rng: np.random.Generator | None = None) -> tuple[list[int], None]:
        return lookup(history, n, self.ngram_max, self.ngram_min), None

    def close(self) -> None:
        pass


def lookup(history: list[int], n: int, ngram_max: int = 3, ngram_min: int = 1) -> list[int]:
    h = np.asarray(history, dtype=np.int64)
    size_hi = min(ngram_max, len(h) - 1)
    for size in range(size_hi, ngram_min - 1, -1):
        pattern = h[-size:]
        # ends of earlier occurrences of the pattern's last token, latest first
        ends = np.flatnonzero(h[size - 1 : -1] == pattern[-1])[::-1] + size - 1
        for end in ends:
            if np.array_equal(h[end - size + 1 : end + 1], pattern):
                out = h[end + 1 : end + 1 + n]
                if out.size and (out >= 0).all():
                    return [int(t) for t in out]
                break  # the latest occurrence is followed by an embedding row: try a shorter n-gram
    return []


class ModelDrafter:
    """A draft model in a llama.cpp context of its own, kept in step with the conversation: each
    round it evaluates what it has not seen (the prefix it shares with the history stays)."""

    def __init__(self, backend: Any, p_min: float = 0.5):
        self.llm = backend
        self.p_min = p_min

    def begin(self) -> None:
        # every reply from an empty cache: llama.cpp's logits differ in the last bits with the way a
        # prompt is cut into batches, and a sampled reply depends on q, so a seed must give one reply
        self.llm.reset()

    def draft(self, history: list[int], n: int, sampling: SamplingParams, rng: np.random.Generator
              ) -> tuple[list[int], list[np.ndarray] | None]:
        llm = self.llm
        n = min(n, llm.n_ctx - len(history) - 1)
        if n <= 0 or len(history) >= llm.n_ctx:
            return [], None
        for seg in llm.start([TokenSegment(history)], 0):
            tokens = list(seg.tokens)
            for off in range(0, len(tokens), llm.n_batch):
                chunk = tokens[off : off + llm.n_batch]
                llm.decode([(0, chunk, off + len(chunk) == len(tokens))])
        greedy = sampling.temperature <= 0
        chain = None if greedy else llm.sampler(_without_penalties(sampling), 0, final=False)
        out: list[int] = []
        dists: list[np.ndarray] = []
        try:
            for i in range(n):
                if greedy:
                    logits = llm.logits()
                    tok = int(np.argmax(logits))
                    z = np.exp(logits.astype(np.float64) - logits[tok])
                    if i > 0 and 1.0 / z.sum() < self.p_min:
                        break  # an unsure guess costs a target row and is likely rejected
                else:
                    ids, probs = llm.distribution(chain)
                    q = np.zeros(llm.n_vocab)
                    q[ids] = probs
                    tok = int(rng.choice(ids, p=probs))
                    dists.append(q)
                if llm.is_eog(tok):
                    dists = dists[: len(out)]
                    break
                out.append(tok)
                if i < n - 1:
                    llm.decode([(0, [tok], True)])
        finally:
            if chain is not None:
                llm.free_sampler(chain)
        return out, (None if greedy else dists)

    def close(self) -> None:
        self.llm.close()


def _without_penalties(s: SamplingParams) -> SamplingParams:
    """The draft model samples with the request's filters; any q is lossless, penalties would need
    its own history of accepted tokens for nothing."""
    return SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, seed=s.seed)


def load_draft(path: Path, target: Any, n_ctx: int, n_threads: int | None) -> ModelDrafter:
    """The draft model at `path`, refused in one line unless its vocabulary is the target's
    (checked on the vocabulary alone, before its weights load)."""
    from .backends.llamacpp import LlamaCppBackend, vocab_fingerprint_of

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"draft model {path} does not exist")
    try:
        theirs = vocab_fingerprint_of(path)
    except BundleError as exc:
        raise BundleError(f"draft model: {exc}") from None
    differs = target.vocab_fingerprint().mismatch(theirs)
    if differs:
        raise BundleError(f"draft model {path} has another vocabulary than the model it drafts for "
                          f"({differs}); a draft model must share the target's tokenizer")
    try:
        backend = LlamaCppBackend.load(path, n_ctx=n_ctx, n_threads=n_threads)
    except BundleError as exc:
        raise BundleError(f"draft model: {exc}") from None
    return ModelDrafter(backend)


PROBE_TEXT = ("The river runs past the old mill and under the stone bridge, where the town keeps its market "
              "on Saturdays; farmers bring apples, cheese, bread and honey, and children watch the boats.")


def exact_verify_rows(llm: Any, n: int) -> tuple[int, float]:
    """The largest batch of b <= n positions of one sequence whose logits equal one-token decoding's
    bit for bit (1 if none does), and the largest difference a batch of n gave.

    Why: llama.cpp picks its matrix kernels by batch size. On an AVX-512 CPU a Q4_K_M model's rows
    come out up to about 1.5 logits off in batches of 4 or more with the repacked kernels (8 or more
    without them), a Q4_1 model's are exact in any batch; GPU kernels differ between one row and
    several too. A verify
    batch that is not exact could change a greedy reply, so the draft length is kept below it."""
    ids = llm.tokenize(PROBE_TEXT, add_special=True)
    while len(ids) < n + 8:
        ids = ids + ids
    head, rest = ids[:8], ids[8 : 8 + n]
    llm.reset()
    llm.prefill([TokenSegment(head)])
    one = []
    for tok in rest:
        llm.decode([(0, [tok], True)])
        one.append(llm.logits())
    worst = 0.0
    try:
        for b in range(n, 1, -1):
            llm.reset()
            llm.prefill([TokenSegment(head)])
            rows = llm.decode([(0, rest[:b], "all")])[0]
            diff = max(float(np.abs(llm.logits(r) - one[i]).max()) for i, r in enumerate(rows))
            worst = diff if b == n else worst
            if diff == 0.0:
                return b, worst
        return 1, worst
    finally:
        llm.reset()


class Speculator:
    """One drafter and the verification loop; `stream` replaces the backend's `stream`."""

    def __init__(self, options: SpeculativeOptions, drafter: Drafter):
        self.options = options
        self.drafter = drafter
        self.max_draft = options.max_draft or DEFAULT_MAX_DRAFT
        self.note: str | None = None  # what the load-time check changed or found, for the front ends

    def check_rows(self, llm: Any) -> None:
        """Keep verify batches to the size whose rows are exact (`exact_verify_rows`); if even two
        rows are not, speculate anyway at the asked length, and say that replies may differ."""
        exact, worst = exact_verify_rows(llm, self.max_draft + 1)
        if exact >= 2 and exact < self.max_draft + 1:
            self.note = (f"speculative: at most {exact - 1} draft tokens a step instead of {self.max_draft}: this "
                         f"model's logits differ in llama.cpp batches of {exact + 1} or more rows (by up to "
                         f"{worst:.2g}), and replies must equal plain decoding")
            self.max_draft = exact - 1
        elif exact < 2:
            self.note = (f"speculative: this model's logits differ between one-row and batched decoding by up to "
                         f"{worst:.2g} in this llama.cpp build, so replies may differ slightly from plain decoding")

    @classmethod
    def load(cls, options: SpeculativeOptions, target: Any, n_threads: int | None = None) -> Speculator | None:
        if not options.enabled:
            return None
        if not isinstance(target, SupportsRollback):
            raise InputError("speculative decoding needs the llama.cpp backend; use --speculative off")
        if options.mode == "lookup":
            spec = cls(options, LookupDrafter(options.ngram_max, options.ngram_min))
        else:
            assert options.draft is not None
            drafter = load_draft(options.draft, target, target.n_ctx, n_threads)
            drafter.p_min = options.p_min
            spec = cls(options, drafter)
        try:
            spec.check_rows(target)
        except BaseException:
            spec.close()
            raise
        return spec

    def close(self) -> None:
        self.drafter.close()

    def stream(self, llm: Any, sampling: SamplingParams, max_tokens: int,
               counts: SpeculativeCounts | None = None, seq: int = 0) -> Iterator[int]:
        """Tokens of the reply to the prompt just prefilled in sequence `seq`, as `llm.stream`
        yields them (the same tokens when greedy), several per target evaluation."""
        counts = counts if counts is not None else SpeculativeCounts()
        greedy = sampling.temperature <= 0
        chain = llm.sampler(sampling, seq, final=greedy)
        rng = np.random.default_rng(sampling.seed)
        base = llm.n_past_of(seq)
        history = [t for t in llm.keys(seq) if t != _EMBEDDING_KEY]
        emitted = 0
        self.drafter.begin()
        complete = False  # ended as plain decoding ends (EOG, budget, context): every emitted token evaluated
        try:
            if base >= llm.n_ctx:
                return
            tok = self._pick(llm, chain, -1, greedy, rng)
            if llm.is_eog(tok):
                complete = True
                return
            emitted += 1
            history.append(tok)
            yield tok
            while True:
                pos = base + emitted - 1  # where `tok` goes
                room = min(self.max_draft, max_tokens - emitted - 1, llm.n_ctx - pos - 1, llm.n_batch - 1)
                drafts, dists = self.drafter.draft(history, room, sampling, rng) if room > 0 else ([], None)
                rows = llm.decode([(seq, [tok, *drafts], "all")])[seq]
                if drafts:
                    counts.rounds += 1
                    counts.drafted += len(drafts)
                if emitted >= max_tokens or pos + 1 >= llm.n_ctx:
                    complete = True  # plain decoding evaluates its last token, then stops
                    return
                for i, row in enumerate(rows):
                    if pos + 1 + i >= llm.n_ctx:
                        complete = True
                        return
                    if i < len(drafts):
                        x, took = self._verify(llm, chain, row, drafts[i], None if dists is None else dists[i],
                                               greedy, rng)
                    else:
                        x, took = self._pick(llm, chain, row, greedy, rng), False
                    if llm.is_eog(x):
                        complete = True
                        return
                    counts.accepted += took
                    emitted += 1
                    history.append(x)
                    yield x
                    if not took:
                        break
                    if emitted >= max_tokens:
                        complete = True  # the accepted drafts up to here are evaluated, as plain would
                        return
                # cells past the last emitted token: drafts after the first rejected one
                llm.rollback(base + emitted - 1, seq)
                tok = x
        finally:
            llm.free_sampler(chain)
            # what plain decoding holds now: the prompt and every emitted token but the last (that
            # one too when the reply ended by itself)
            llm.rollback(base + max(emitted - (0 if complete else 1), 0), seq)

    def _pick(self, llm: Any, chain: Any, row: int, greedy: bool, rng: np.random.Generator) -> int:
        if greedy:
            return llm.sample(chain, row)  # the chain's greedy step records the token itself
        ids, probs = llm.distribution(chain, row)
        tok = int(rng.choice(ids, p=probs))
        llm.accept(chain, tok)
        return tok

    def _verify(self, llm: Any, chain: Any, row: int, draft: int, q: np.ndarray | None, greedy: bool,
                rng: np.random.Generator) -> tuple[int, bool]:
        """The token emitted at `row` where `draft` was proposed, and whether it is the draft."""
        if greedy:
            tok = llm.sample(chain, row)
            return tok, tok == draft
        ids, probs = llm.distribution(chain, row)
        p = np.zeros(llm.n_vocab)
        p[ids] = probs
        q_d = 1.0 if q is None else float(q[draft])
        if q_d > 0 and rng.random() < min(1.0, p[draft] / q_d):
            llm.accept(chain, draft)
            return draft, True
        if q is None:
            residual = p.copy()
            residual[draft] = 0.0
        else:
            residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        if total <= 0:  # p == q: any draw from p is right
            residual, total = p, p.sum()
        tok = int(rng.choice(llm.n_vocab, p=residual / total))
        llm.accept(chain, tok)
        return tok, False
