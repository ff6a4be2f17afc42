"""The gradients of every update on one stream at fixed weights, for analysis: the engine run under a
schedule with ``recompute``, its results collected instead of applied."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import state as st
from .checkpointing import Segments
from .contract import LossFn
from .engine import ResetFn, StreamEngine
from .schedules import Schedule


def truncated_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    schedule: Schedule,
    state: st.State = None,
    mask: Optional[torch.Tensor] = None,
    resets: Optional[torch.Tensor] = None,
    reset_fn: Optional[ResetFn] = None,
    checkpoint_segments: Segments = None,
    generator: Optional[torch.Generator] = None,
) -> list[dict[str, torch.Tensor]]:
    """The gradient of every update of ``schedule`` on one stream, all at the model's current weights.

    Returns one ``{parameter_name: gradient}`` per update (for TBPTT, those of
    ``schedule.updates(T)``), in order (zeros for a parameter the update's loss does not reach).
    Neither the weights nor their ``.grad`` are changed. ``state`` is the state entering step 0
    (None: the model's own start); ``mask``/``resets`` as in ``StreamEngine.feed``;
    ``checkpoint_segments`` trades memory for time; ``generator`` draws ARTBP's windows (default:
    one seeded from torch's random generator).
    """
    engine = StreamEngine(model, loss_fn, schedule, "recompute", reset_fn, checkpoint_segments, generator)
    engine.reset(initial_state=state)
    params = dict(engine.named_parameters())
    out = []
    for result in engine.feed(inputs, targets, mask, end_of_stream=True, resets=resets):
        out.append({n: torch.zeros_like(params[n]) if g is None else g for n, g in result.grads.items()})
    return out
