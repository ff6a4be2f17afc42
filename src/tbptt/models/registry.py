"""Models by name, and a user's own model from a ``path/to/file.py:factory`` spec.

A builder takes the keywords ``n_inputs``, ``n_outputs``, ``hidden`` (plus the model's own options)
and returns the ``nn.Module``; a user's factory is called the same way.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from ..validate import InvalidArgument
from .lru import LRU
from .mamba import Mamba
from .minrnn import MinGRU, MinLSTM
from .rnn import RecurrentNet
from .tokens import TokenEmbedding

Builder = Callable[..., nn.Module]
"""``builder(n_inputs=, n_outputs=, hidden=, **options) -> nn.Module``."""


def _recurrent(cell: str) -> Builder:
    def build(n_inputs: int, n_outputs: int, hidden: int, **options) -> nn.Module:
        return RecurrentNet(n_inputs=n_inputs, hidden=hidden, n_outputs=n_outputs, cell=cell, **options)

    build.__doc__ = f"RecurrentNet with a fused nn.{cell.upper()}."
    return build


MODELS: dict[str, Builder] = {
    "lstm": _recurrent("lstm"),
    "gru": _recurrent("gru"),
    "rnn": _recurrent("rnn"),
    "mingru": MinGRU,
    "minlstm": MinLSTM,
    "lru": LRU,
    "mamba": Mamba,
}
"""The built-in models by name."""

_SPEC = "'path/to/file.py:factory'"
_RECURRENT = ("lstm", "gru", "rnn")  # RecurrentNet: its own embedding for token inputs


def model_spec(value: object, name: str = "model") -> str:
    """``value`` if it names a model: a key of ``MODELS`` or a ``path/to/file.py:factory`` spec
    (its form only: the file is read when the model is built)."""
    if (isinstance(value, str) and value in MODELS) or _file_spec(value) is not None:
        return value  # type: ignore[return-value]
    raise InvalidArgument(name, value, "one of " + ", ".join(repr(m) for m in MODELS) + f" or {_SPEC}")


def build_model(name: str, n_inputs: int, n_outputs: int, hidden: int, *, vocab: Optional[int] = None,
                **options) -> nn.Module:
    """The model ``name`` (a key of ``MODELS``, or a ``path/to/file.py:factory`` spec) with these sizes.

    ``options`` go to the model's constructor (``layers=2``, ``state_size=16``, ...). ``vocab``: the
    inputs are ``[B, T]`` integer tokens below ``vocab``, embedded into ``n_inputs`` features
    (``RecurrentNet``'s own embedding for lstm, gru and rnn; a ``TokenEmbedding`` in front of any
    other model, which is built for ``n_inputs`` float features).
    """
    model_spec(name, "name")
    if name in _RECURRENT and vocab is not None:
        return MODELS[name](n_inputs=n_inputs, n_outputs=n_outputs, hidden=hidden, vocab=vocab, **options)
    build = MODELS[name] if name in MODELS else load_factory(name)
    model = build(n_inputs=n_inputs, n_outputs=n_outputs, hidden=hidden, **options)
    return model if vocab is None else TokenEmbedding(vocab, n_inputs, model)


def load_factory(spec: str) -> Builder:
    """The function ``factory`` of the Python file in ``spec = "path/to/file.py:factory"``, as a builder.

    The file is imported (its folder on ``sys.path`` while it is); the builder calls the factory with
    keywords and checks that it returns an ``nn.Module``. Every error names the file and the function.
    """
    parts = _file_spec(spec)
    if parts is None:
        raise InvalidArgument("spec", spec, _SPEC)
    path, function = parts
    file = Path(path)
    if not file.is_file():
        raise InvalidArgument("spec", spec, _SPEC, hint=f"there is no file {path}")
    module = _import_file(file, function)
    factory = getattr(module, function, None)
    if factory is None:
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise InvalidArgument("spec", spec, _SPEC, hint=f"{path} defines no {function!r} (it defines: {', '.join(defined) or 'nothing callable'})")
    if not callable(factory):
        raise TypeError(f"{path}:{function} is a {type(factory).__name__}, not a function that returns the model")
    return _checked(factory, f"{path}:{function}")


def _file_spec(value: object) -> Optional[tuple[str, str]]:
    """(path, function) of a ``path/to/file.py:function`` spec; None for anything else."""
    path, _, function = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    return (path, function) if path.endswith(".py") and function.isidentifier() else None


def _import_file(file: Path, function: str):
    name = f"_tbptt_factory_{abs(hash(str(file.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(name, file)
    if loader_spec is None or loader_spec.loader is None:
        raise ImportError(f"cannot import {file} (for its factory {function!r}): not a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    folder = str(file.resolve().parent)
    sys.path.insert(0, folder)  # the file may import modules beside it
    try:
        loader_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise ImportError(
            f"cannot import {file} (for its factory {function!r}): {type(error).__name__}: {error}"
        ) from error
    finally:
        sys.path.remove(folder)
    return module


def _checked(factory: Callable, where: str) -> Builder:
    def build(**keywords) -> nn.Module:
        try:
            inspect.signature(factory).bind(**keywords)
        except TypeError as error:
            raise TypeError(
                f"{where} must accept the keywords {', '.join(keywords)} ({error})"
            ) from None
        except ValueError:  # a signature inspect cannot read (a builtin): call it and see
            pass
        try:
            model = factory(**keywords)
        except Exception as error:
            raise RuntimeError(f"{where} raised {type(error).__name__}: {error}") from error
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{where} returned a {type(model).__name__}; it must return the model, an nn.Module "
                "whose forward(x[B, T, F], state) returns (outputs[B, T, ...], state)"
            )
        return model

    build.__doc__ = f"The model {where} returns, checked to be an nn.Module."
    return build
