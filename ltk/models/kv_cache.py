"""The key/value cache of autoregressive generation.

Decoding one token at a time, the keys and values of every earlier position are the same
at each step (causal attention: a position never sees the future), so they are computed
once and kept. A step then costs attention over S cached positions for one query instead
of re-running the whole prefix: O(S) work per token instead of O(S²).
"""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of the positions seen so far, for every layer.

    k[l], v[l]: (B, H_kv, max_len, D), preallocated; positions [0, length) are filled.
    `update(layer, k, v)` writes T new positions after them and returns the (B, H_kv,
    length + T, D) views that attention reads; the model calls `advance(T)` once all
    layers are written. Memory: 2 · L · B · H_kv · max_len · D elements, which is why GQA
    (small H_kv) matters for long generations.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {self.length} are used and "
                             f"{k.size(2)} more do not fit")
        self.k[layer][:, :, start:end] = k  # (B, H_kv, T, D) into (B, H_kv, max_len, D)
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, H_kv, end, D)

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0
