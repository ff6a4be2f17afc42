"""The steps of the B streams that the engine has received and a later window can still reach.

Each call's ``inputs[B, T, ...]``, ``targets`` and optional ``mask``/``resets`` ``[B, T]`` flags are
kept as received (no copy) and sliced by stream position; whatever no window can reach is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Steps:
    """Steps ``[start, start + T)`` of the streams, as received or a slice of them."""

    start: int
    inputs: torch.Tensor
    targets: torch.Tensor
    mask: Optional[torch.Tensor] = None
    resets: Optional[torch.Tensor] = None

    @property
    def stop(self) -> int:
        return self.start + self.inputs.shape[1]

    def slice(self, start: int, stop: int) -> "Steps":
        a, b = max(start, self.start) - self.start, min(stop, self.stop) - self.start
        return Steps(
            self.start + a,
            self.inputs[:, a:b],
            self.targets[:, a:b],
            None if self.mask is None else self.mask[:, a:b],
            None if self.resets is None else self.resets[:, a:b],
        )


def check_steps(inputs: object, targets: object, mask: object = None, resets: object = None) -> None:
    """Raise a clear error unless inputs/targets are ``[B, T, ...]`` tensors that agree in B and T
    and the flags are bool ``[B, T]`` tensors."""
    for name, value in (("inputs", inputs), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, T, ...]; got {type(value).__name__}")
        if value.dim() < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions [B, T, ...]; got shape {tuple(value.shape)}"
            )
    assert isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor)
    if inputs.shape[:2] != targets.shape[:2]:
        raise ValueError(
            f"inputs and targets must agree in batch and time [B, T]; got inputs "
            f"{tuple(inputs.shape[:2])} and targets {tuple(targets.shape[:2])}"
        )
    meaning = {"mask": "a valid step", "resets": "a sequence starts here"}
    for name, flags in (("mask", mask), ("resets", resets)):
        if flags is None:
            continue
        if not isinstance(flags, torch.Tensor) or tuple(flags.shape) != tuple(inputs.shape[:2]):
            shape = tuple(flags.shape) if isinstance(flags, torch.Tensor) else type(flags).__name__
            raise ValueError(
                f"{name} must be a [B, T] tensor matching inputs {tuple(inputs.shape[:2])}; got {shape}"
            )
        if flags.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor (True = {meaning[name]}); got {flags.dtype}")


def reset_positions(resets: Optional[torch.Tensor], offset: int = 0) -> list[int]:
    """Positions (plus ``offset``) where any row starts a new sequence; one host sync."""
    if resets is None:
        return []
    return [offset + t for t in torch.nonzero(resets.any(dim=0)).flatten().tolist()]


class StepBuffer:
    """Received steps from some position on, with the positions where any row resets."""

    def __init__(self) -> None:
        self.parts: list[Steps] = []
        self.resets_at: set[int] = set()

    def append(self, steps: Steps) -> None:
        if steps.inputs.shape[1] == 0:
            return
        self.parts.append(steps)
        # found once per call, so that model calls can be split where a row resets
        self.resets_at.update(reset_positions(steps.resets, steps.start))

    def slice(self, start: int, stop: int) -> Steps:
        parts = [p.slice(start, stop) for p in self.parts if p.start < stop and p.stop > start]
        if not parts:
            raise RuntimeError(f"internal: steps [{start}, {stop}) are no longer buffered")
        if len(parts) == 1:
            return parts[0]

        def cat(field: str, fill: bool) -> Optional[torch.Tensor]:
            values = [getattr(p, field) for p in parts]
            if all(v is None for v in values):
                return None
            return torch.cat(
                [v if v is not None else torch.full(p.inputs.shape[:2], fill, dtype=torch.bool, device=p.inputs.device)
                 for v, p in zip(values, parts)],
                dim=1,
            )

        return Steps(start, torch.cat([p.inputs for p in parts], dim=1),
                     torch.cat([p.targets for p in parts], dim=1), cat("mask", True), cat("resets", False))

    def own_from(self, position: int) -> None:
        """Replace the buffered steps from ``position`` on by copies of their own."""
        copy = lambda t: None if t is None else t.clone()  # noqa: E731
        self.parts = [p if p.stop <= position else
                      Steps(p.start, copy(p.inputs), copy(p.targets), copy(p.mask), copy(p.resets))
                      for p in self.parts]

    def resets_between(self, start: int, stop: int) -> list[int]:
        """Positions strictly inside ``(start, stop)`` where a row resets."""
        return sorted(p for p in self.resets_at if start < p < stop)

    def rows_reset_at(self, position: int) -> Optional[torch.Tensor]:
        """The ``[B]`` rows that start a sequence at ``position``, or None if none does."""
        if position not in self.resets_at:
            return None
        resets = self.slice(position, position + 1).resets
        assert resets is not None
        return resets[:, 0]

    def forget_before(self, position: int) -> None:
        self.parts = [p.slice(position, p.stop) if p.start < position else p for p in self.parts if p.stop > position]
        self.resets_at = {p for p in self.resets_at if p >= position}
