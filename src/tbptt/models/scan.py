"""Parallel scans of the linear recurrence ``h_t = a_t * h_{t-1} + b_t`` over a segment.

Both functions take coefficients ``[B, T, ...]`` (time in dimension 1), a carried ``h0[B, ...]``
(None for zeros) and return every ``h_t`` as ``[B, T, ...]``, without a Python loop over steps: the
number of tensor operations grows as ``log T``.

- ``linear_scan`` works on the coefficients themselves (real or complex, any sign): an associative
  scan (Brent & Kung 1982; Blelloch 1990) in which every number is a product of the same factors
  ``a_t`` and sums of the same terms as in the per-step loop, only associated differently. With
  ``|a_t| <= 1`` nothing can overflow, and a decay that underflows is one the loop also sees as 0.
  Its backward pass is the same scan run backwards on the adjoint recurrence.
- ``log_scan`` is the log-space scan of Feng et al. (2024, "Were RNNs All We Needed?", after
  Heinsen 2023) for positive terms ``b_t``: ``log h_t = a*_t + logcumsumexp(log b - a*)_t`` with
  ``a*`` the cumulative sum of ``log a``. Here it runs in chunks: ``a*`` restarts at every chunk, so
  the cancellation in ``a*_t - a*_s`` (an absolute error of about ``eps * |a*_t|``) is bounded by a
  chunk's decay rather than the whole segment's, and the chunks are joined by ``linear_scan``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Every ``h_t = a_t * h_{t-1} + b_t`` for ``t < T``, from ``h_{-1} = h0`` (zeros if None).

    Args:
        a: decays, broadcastable to ``b`` (real or complex).
        b: inputs ``[B, T, ...]``.
        h0: the state entering the segment, ``[B, ...]`` (``b`` without its time dimension).

    Returns:
        ``h[B, T, ...]``, differentiable (once) with respect to ``a``, ``b`` and ``h0``.
    """
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = torch.broadcast_tensors(a.to(dtype), b.to(dtype))
    if h0 is not None:
        if tuple(h0.shape) != (b.shape[0],) + tuple(b.shape[2:]):
            raise ValueError(f"h0 must be [B, ...] = {(b.shape[0],) + tuple(b.shape[2:])} for inputs {tuple(b.shape)}; "
                             f"got {tuple(h0.shape)}")
        h0 = h0.to(dtype)
    return _LinearScan.apply(a, b, h0)


class _LinearScan(torch.autograd.Function):
    """The scan without autograd inside, and its adjoint: for ``h_t = a_t h_{t-1} + b_t`` the
    gradient ``g_t`` of the loss with respect to ``h_t`` flows back as ``l_t = g_t + conj(a_{t+1}) l_{t+1}``,
    itself a linear recurrence, run backwards through the same scan; then ``dL/db_t = l_t``,
    ``dL/da_t = l_t conj(h_{t-1})`` and ``dL/dh0 = l_0 conj(a_0)``. Only ``a`` and ``h`` are kept
    for the backward pass (the scan's intermediate levels are not)."""

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor]) -> torch.Tensor:
        h = b.clone(memory_format=torch.contiguous_format)
        if h0 is not None:
            h[:, 0].addcmul_(a[:, 0], h0)
        _scan_in_place(a.clone(memory_format=torch.contiguous_format), h)
        return h

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        a, _, h0 = inputs
        ctx.save_for_backward(a, output, h0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, h, h0 = ctx.saved_tensors
        adjoint = grad.clone(memory_format=torch.contiguous_format)
        decay = torch.empty_like(h)
        decay[:, :-1] = a[:, 1:].conj()
        decay[:, -1] = 0
        _scan_in_place(decay, adjoint, reverse=True)
        grad_a = torch.empty_like(h)
        torch.mul(adjoint[:, 1:], h[:, :-1].conj(), out=grad_a[:, 1:])
        grad_a[:, 0] = 0 if h0 is None else adjoint[:, 0] * h0.conj()
        grad_h0 = None if h0 is None else adjoint[:, 0] * a[:, 0].conj()
        return grad_a, adjoint, grad_h0


def _scan_in_place(a: torch.Tensor, h: torch.Tensor, reverse: bool = False) -> None:
    """``h_t <- a_t * h_{t-1} + h_t`` for every t in turn (``h_{t+1}`` when ``reverse``), computed
    in place as a Brent-Kung scan (an up-sweep that combines pairs at strides 1, 2, 4, ..., then a
    down-sweep that completes the steps in between); ``a`` is overwritten. About 2 log2(T) strided
    tensor operations, each step combined at most twice per sweep."""
    steps = h.shape[1]

    def pairs(x: torch.Tensor, first: int, stride: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        # the steps first, first + stride, ... and the steps `shift` before each (after, reversed)
        last = first + (steps - 1 - first) // stride * stride
        if reverse:
            return x[:, steps - 1 - last : steps - first : stride], x[:, steps - 1 - last + shift : steps - first + shift : stride]
        return x[:, first : last + 1 : stride], x[:, first - shift : last + 1 - shift : stride]

    span = 1
    while 2 * span <= steps:  # up-sweep: step i then sums the span ending at it
        (h_to, h_from), (a_to, a_from) = pairs(h, 2 * span - 1, 2 * span, span), pairs(a, 2 * span - 1, 2 * span, span)
        h_to.addcmul_(a_to, h_from)
        a_to.mul_(a_from)
        span *= 2
    while span > 1:  # down-sweep: the step half a span past a completed one
        span //= 2
        if 3 * span <= steps:
            (h_to, h_from), (a_to, _) = pairs(h, 3 * span - 1, 2 * span, span), pairs(a, 3 * span - 1, 2 * span, span)
            h_to.addcmul_(a_to, h_from)


def log_scan(
    log_a: torch.Tensor, log_b: torch.Tensor, h0: Optional[torch.Tensor] = None, chunk: int = 16
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
