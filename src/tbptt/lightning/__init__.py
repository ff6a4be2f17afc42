"""TBPTT(k1, k2) inside PyTorch Lightning 2.x: ``pip install tbptt[lightning]``, see ``docs/lightning.md``.

``TBPTTModule`` is a ``LightningModule`` that runs the engine under manual optimization, one TBPTT
update after another, inside each ``training_step``; ``segments`` is the loader of consecutive
segments of the B streams it trains and validates on. ``import tbptt`` does not load Lightning; only
``import tbptt.lightning`` does.
"""

from .loader import SegmentBatch as SegmentBatch
from .loader import SegmentLoader as SegmentLoader
from .loader import segments as segments
from .module import TBPTTModule as TBPTTModule

__all__ = ["TBPTTModule", "segments", "SegmentBatch", "SegmentLoader"]
