"""Unigram and bigram language models: the baselines a transformer must beat.

Counted on the training token stream, scored on exactly the validation targets the model
is scored on, in bits per byte with the same rule (targets that stand for no bytes, i.e.
end-of-text, are left out; see ltk/training/evaluate.py).

    unigram:  p(y)     = (c(y) + 1) / (N + V)                          add-one (Laplace)
    bigram:   p(y | x) = λ · c(x, y) / c(x) + (1 - λ) · p(y)            Jelinek-Mercer
                         (= p(y) where x never occurred)

λ is chosen on the validation targets themselves from a grid. That flatters the bigram
(it is tuned on the test), which only makes it a harder bar for the model to clear.
Counts are kept sparse (pair code x·V + y, sorted), so any vocabulary size works.
"""
from __future__ import annotations

import math

import numpy as np

LAMBDAS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)


class NGramBaselines:
    def __init__(self, train_tokens: np.ndarray, vocab_size: int):
        t = np.asarray(train_tokens, dtype=np.int64)
        self.V = vocab_size
        self.unigram_counts = np.bincount(t, minlength=vocab_size).astype(np.float64)
        self.p_uni = (self.unigram_counts + 1.0) / (t.size + vocab_size)
        codes = t[:-1] * vocab_size + t[1:]
        self.pair_codes, pair_counts = np.unique(codes, return_counts=True)  # sorted codes
        self.pair_counts = pair_counts.astype(np.float64)
        self.context_counts = np.bincount(t[:-1], minlength=vocab_size).astype(np.float64)

    def _bigram_ml(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Maximum-likelihood c(x, y) / c(x), 0 where the pair or context is unseen."""
        codes = x * self.V + y
        i = np.searchsorted(self.pair_codes, codes)
        i = np.minimum(i, self.pair_codes.size - 1)
        c_xy = np.where(self.pair_codes[i] == codes, self.pair_counts[i], 0.0)
        c_x = self.context_counts[x]
        return np.divide(c_xy, c_x, out=np.zeros_like(c_xy), where=c_x > 0)

    def score(self, x: np.ndarray, y: np.ndarray, token_bytes: np.ndarray) -> dict[str, dict[str, float]]:
        """x, y: contexts and targets (any shape, same shape). Returns, per model, the
        mean nats per target token over all targets and the bits per byte over targets
        that stand for bytes."""
        x = np.asarray(x, dtype=np.int64).ravel()
        y = np.asarray(y, dtype=np.int64).ravel()
        nbytes = token_bytes[y]
        counted = nbytes > 0
        total_bytes = float(nbytes.sum())

        def summarize(logp: np.ndarray, **extra) -> dict[str, float]:
            return {"val_loss": float(-logp.mean()),
                    "val_bpb": float(-logp[counted].sum() / math.log(2) / total_bytes), **extra}

        p_uni = self.p_uni[y]
        out = {"unigram": summarize(np.log(p_uni))}
        ml = self._bigram_ml(x, y)
        seen = self.context_counts[x] > 0
        best = None
        for lam in LAMBDAS:
            p = np.where(seen, lam * ml + (1.0 - lam) * p_uni, p_uni)
            s = summarize(np.log(p), **{"lambda": lam})
            if best is None or s["val_bpb"] < best["val_bpb"]:
                best = s
        out["bigram"] = best
        return out
