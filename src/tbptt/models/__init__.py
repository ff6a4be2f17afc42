"""Recurrent models that follow the engine's contract ``(outputs, state) = model(x, state)``.

Any ``nn.Module`` with that signature works with the engine; these are built in:

- ``RecurrentNet``: a fused nn.LSTM / GRU / RNN with a linear head (``rnn.py``);
- ``MinGRU``, ``MinLSTM`` (Feng et al. 2024), ``LRU`` (Orvieto et al. 2023) and ``Mamba`` (Gu & Dao
  2023): linear recurrences run over a segment by a parallel scan (``scan.py``), each carrying its
  whole state (Mamba's convolution inputs included) so that a stream cut into segments gives the
  outputs of one call;
- ``MODELS`` / ``build_model`` by name, ``load_factory`` for a user's ``file.py:factory``;
  ``TokenEmbedding`` puts an embedding in front of a model for token inputs.
"""

from .lru import LRU as LRU
from .mamba import Mamba as Mamba
from .minrnn import MinGRU as MinGRU, MinLSTM as MinLSTM
from .registry import MODELS as MODELS, Builder as Builder, build_model as build_model, load_factory as load_factory
from .registry import model_spec as model_spec
from .rnn import Cell as Cell, RecurrentNet as RecurrentNet
from .tokens import TokenEmbedding as TokenEmbedding

__all__ = ["RecurrentNet", "Cell", "MinGRU", "MinLSTM", "LRU", "Mamba", "MODELS", "Builder", "build_model", "load_factory",
           "model_spec", "TokenEmbedding"]
