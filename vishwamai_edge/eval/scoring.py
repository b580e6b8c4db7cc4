"""The numbers of `eval`, as llama.cpp's llama-perplexity computes them (tools/perplexity/perplexity.cpp).

The text is tokenized once (BOS first) and cut into windows of `n_ctx` tokens, whole windows only; each
window's first token is replaced by BOS, the window is evaluated from an empty cache, and only its second
half is scored (each position from n_ctx/2 on has at least n_ctx/2 tokens of context): the logits at
position j score token j+1, for j in [n_ctx/2, n_ctx - 2]. Perplexity is exp(mean negative log-likelihood).
Against a reference: per scored token the KL divergence sum_v p_ref(v) (log p_ref(v) - log p(v)), whether
the top token is the same, and Delta-p, the change of the probability of the token that came next.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError


def windows(tokens: list[int], n_ctx: int, bos: int | None) -> list[list[int]]:
    """Whole windows of `n_ctx` tokens, each starting with BOS (when the model has one)."""
    n = len(tokens) // n_ctx
    if n < 1:
        raise InputError(f"the text is {len(tokens)} tokens, shorter than one window of {n_ctx}; give a longer "
                         "text or a smaller --n-ctx")
    out = [list(tokens[i * n_ctx:(i + 1) * n_ctx]) for i in range(n)]
    if bos is not None:
        for w in out:
            w[0] = bos
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class Scores:
    """Per scored token, over every window so far."""

    nll: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)
    delta_p: list[np.ndarray] = field(default_factory=list)

    def add(self, logits: np.ndarray, targets: np.ndarray, reference: np.ndarray | None = None) -> None:
        """`logits` (n, vocab) at the scored positions, `targets` (n,) the tokens that came next,
        `reference` the reference's log-probabilities at the same positions (or None)."""
        logp = log_softmax(logits)
        rows = np.arange(len(targets))
        self.nll.append(-logp[rows, targets])
        if reference is not None:
            p_ref = np.exp(reference)
            self.kld.append(np.maximum((p_ref * (reference - logp)).sum(-1), 0.0))
            self.same_top.append(logp.argmax(-1) == reference.argmax(-1))
            self.delta_p.append(np.exp(logp[rows, targets]) - p_ref[rows, targets])

    def summary(self) -> dict[str, float]:
        nll = np.concatenate(self.nll)
        out = {"tokens": int(nll.size), "perplexity": float(np.exp(nll.mean())),
               "perplexity_error": float(np.exp(nll.mean()) * nll.std() / np.sqrt(max(nll.size - 1, 1)))}
        if self.kld:
            kld, dp = np.concatenate(self.kld), np.concatenate(self.delta_p)
            out.update({
                "kld_mean": float(kld.mean()), "kld_median": float(np.median(kld)),
                "kld_p99": float(np.percentile(kld, 99)), "kld_max": float(kld.max()),
                "same_top": float(np.concatenate(self.same_top).mean()),
                "delta_p_mean": float(dp.mean()), "delta_p_rms": float(np.sqrt((dp ** 2).mean())),
                "delta_p_p1": float(np.percentile(dp, 1)), "delta_p_p99": float(np.percentile(dp, 99)),
                "delta_p_min": float(dp.min()), "delta_p_max": float(dp.max()),
            })
        return out

    def kld_values(self) -> np.ndarray:
        return np.concatenate(self.kld) if self.kld else np.zeros(0)
