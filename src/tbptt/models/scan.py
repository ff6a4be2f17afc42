"""Parallel scans of the linear recurrence ``h_t = a_t * h_{t-1} + b_t`` over a segment.

Both functions take coefficients ``[B, T, ...]`` (time in dimension 1), a carried ``h0[B, ...]``
(None for zeros) and return every ``h_t`` as ``[B, T, ...]``, without a Python loop over steps: the
number of tensor operations grows as ``log T``.

- ``linear_scan`` works on the coefficients themselves (real or complex, any sign): a recursive
  odd/even associative scan (Blelloch 1990) in which every number is a product of the same factors
  ``a_t`` and sums of the same terms as in the per-step loop, only associated differently. With
  ``|a_t| <= 1`` nothing can overflow, and a decay that underflows is one the loop also sees as 0.
- ``log_scan`` is the log-space scan of Feng et al. (2024, "Were RNNs All We Needed?", after
  Heinsen 2023) for positive terms ``b_t``: ``log h_t = a*_t + logcumsumexp(log b - a*)_t`` with
  ``a*`` the cumulative sum of ``log a``. Here it runs in chunks: ``a*`` restarts at every chunk, so
  the cancellation in ``a*_t - a*_s`` (an absolute error of about ``eps * |a*_t|``) is bounded by a
  chunk's decay rather than the whole segment's, and the chunks are joined by ``linear_scan``.
"""

from __future__ import annotations

from typing import Optional

import torch


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Every ``h_t = a_t * h_{t-1} + b_t`` for ``t < T``, from ``h_{-1} = h0`` (zeros if None).

    Args:
        a: decays, broadcastable to ``b`` (real or complex).
        b: inputs ``[B, T, ...]``.
        h0: the state entering the segment, ``[B, ...]`` (``b`` without its time dimension).

    Returns:
        ``h[B, T, ...]``, differentiable with respect to ``a``, ``b`` and ``h0``.
    """
    a, b = torch.broadcast_tensors(a, b)
    if h0 is not None:
        # the carried state enters as part of the first step's input: b_0 + a_0 * h0
        b = torch.cat([b[:, :1] + a[:, :1] * h0.unsqueeze(1), b[:, 1:]], dim=1)
    return _scan_from_zero(a, b)


def _scan_from_zero(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``linear_scan`` from a zero state: steps (2k, 2k+1) are paired into one step of the same
    recurrence on half as many steps, solved recursively; that gives h at every odd step, and each
    even step is one step on from the odd step before it."""
    steps = b.shape[1]
    if steps == 1:
        return b
    pairs = steps // 2
    a_even, b_even = a[:, 0::2], b[:, 0::2]
    a_odd, b_odd = a[:, 1::2], b[:, 1::2]
    h_odd = _scan_from_zero(a_odd * a_even[:, :pairs], a_odd * b_even[:, :pairs] + b_odd)
    h_even = torch.cat([b_even[:, :1], a_even[:, 1:] * h_odd[:, : a_even.shape[1] - 1] + b_even[:, 1:]], dim=1)
    h = torch.stack([h_even[:, :pairs], h_odd], dim=2).flatten(1, 2)
    return torch.cat([h, h_even[:, pairs:]], dim=1) if steps % 2 else h


def log_scan(
    log_a: torch.Tensor, log_b: torch.Tensor, h0: Optional[torch.Tensor] = None, chunk: int = 64
) -> torch.Tensor:
    """Every ``h_t = exp(log_a_t) * h_{t-1} + exp(log_b_t)``, from ``h_{-1} = h0`` (zeros if None).

    The log-space parallel scan of Feng et al. (2024) for positive inputs, in chunks of ``chunk``
    steps joined by ``linear_scan``. ``h0`` enters linearly (it is never logged), so it may be zero
    or negative and its gradient is finite.

    Args:
        log_a: log decays ``[B, T, ...]`` (real, ``<= 0`` for a stable recurrence).
        log_b: log inputs, broadcastable with ``log_a``.
        h0: the state entering the segment, ``[B, ...]``.
        chunk: steps per chunk within which the cumulative sum of ``log_a`` runs.

    Returns:
        ``h[B, T, ...]``.
    """
    log_a, log_b = torch.broadcast_tensors(log_a, log_b)
    batch, steps, rest = log_a.shape[0], log_a.shape[1], log_a.shape[2:]
    size = min(chunk, steps)
    chunks = -(-steps // size)
    pad = chunks * size - steps
    if pad:  # finite padding (a = 1, b = 1) past the end: its outputs are dropped, so it gets no gradient
        filler = log_a.new_zeros((batch, pad) + rest)
        log_a, log_b = torch.cat([log_a, filler], dim=1), torch.cat([log_b, filler], dim=1)
    shape = (batch, chunks, size) + rest
    cum = log_a.reshape(shape).cumsum(dim=2)  # log of the decay from the chunk's start through step t
    local = torch.exp(cum + torch.logcumsumexp(log_b.reshape(shape) - cum, dim=2))  # from a zero start
    decay = torch.exp(cum)
    ends = linear_scan(decay[:, :, -1], local[:, :, -1], h0)  # the state after each chunk
    first = torch.zeros_like(ends[:, 0]) if h0 is None else h0
    starts = torch.cat([first.unsqueeze(1), ends[:, :-1]], dim=1)
    h = local + decay * starts.unsqueeze(2)
    return h.reshape((batch, chunks * size) + rest)[:, :steps]
