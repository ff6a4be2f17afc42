"""Models by name (MODELS, build_model) and a user's factory file (load_factory)."""

import textwrap

import pytest
import torch
from torch import nn

import tbptt
from tbptt.models import MODELS, build_model, load_factory


def test_every_name_builds_a_model_with_the_sizes_asked_for():
    assert set(MODELS) == {"lstm", "gru", "rnn", "mingru", "minlstm", "lru", "mamba"}
    for name in MODELS:
        model = build_model(name, n_inputs=3, n_outputs=2, hidden=6, layers=2)
        y, state = model(torch.randn(4, 5, 3))
        assert y.shape == (4, 5, 2), name
        assert state is not None
    assert isinstance(build_model("gru", 3, 2, 6), tbptt.RecurrentNet)
    assert build_model("gru", 3, 2, 6).rnn.mode == "GRU"
    assert isinstance(build_model("mamba", 3, 2, 6, state_size=4, conv_width=2), tbptt.Mamba)


def test_an_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"name must be one of 'lstm', .*'mamba' or 'path/to/file.py:factory'; got 'transformer'"):
        build_model("transformer", 3, 2, 6)


def write(tmp_path, text, name="mymodel.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_factory_from_a_file_builds_the_users_model(tmp_path):
    write(tmp_path, """
        from torch import nn
        HIDDEN = {}
        class Net(nn.Module):
            def __init__(self, n_inputs, n_outputs, hidden):
                super().__init__()
                self.rnn = nn.GRU(n_inputs, hidden, batch_first=True)
                self.head = nn.Linear(hidden, n_outputs)
            def forward(self, x, state=None):
                out, state = self.rnn(x, state)
                return self.head(out), state
        def factory(n_inputs, n_outputs, hidden):
            return Net(n_inputs, n_outputs, hidden)
    """, "helper.py")
    path = write(tmp_path, """
        from helper import factory as make  # a module beside the file
        def factory(n_inputs, n_outputs, hidden, layers=1):
            return make(n_inputs=n_inputs, n_outputs=n_outputs, hidden=hidden * layers)
    """)
    model = load_factory(f"{path}:factory")(n_inputs=3, n_outputs=2, hidden=5)
    assert model.rnn.hidden_size == 5
    assert build_model(f"{path}:factory", 3, 2, 5, layers=2).rnn.hidden_size == 10
    y, _ = model(torch.randn(2, 4, 3))
    assert y.shape == (2, 4, 2)


def test_factory_errors_name_the_file_and_the_function(tmp_path):
    with pytest.raises(ValueError, match=r"spec must be 'path/to/file.py:factory'; got 'model.py'"):
        load_factory("model.py")
    missing = tmp_path / "nothere.py"
    with pytest.raises(ValueError, match=f"there is no file {missing}"):
        load_factory(f"{missing}:factory")
    broken = write(tmp_path, "import not_a_module_anywhere\n", "broken.py")
    with pytest.raises(ImportError, match=f"cannot import {broken} \\(for its factory 'factory'\\): ModuleNotFoundError"):
        load_factory(f"{broken}:factory")
    path = write(tmp_path, """
        import torch
        def make(n_inputs, n_outputs, hidden):
            return torch.zeros(3)
        def narrow(size):
            return torch.nn.Linear(size, size)
        NOT_A_FUNCTION = 3
    """)
    with pytest.raises(ValueError, match=r"defines no 'factory' \(it defines: make, narrow\)"):
        load_factory(f"{path}:factory")
    with pytest.raises(TypeError, match=f"{path}:NOT_A_FUNCTION is a int, not a function"):
        load_factory(f"{path}:NOT_A_FUNCTION")
    with pytest.raises(TypeError, match=f"{path}:make returned a Tensor; it must return the model, an nn.Module"):
        load_factory(f"{path}:make")(n_inputs=3, n_outputs=2, hidden=5)
    with pytest.raises(TypeError, match=f"{path}:narrow must accept the keywords n_inputs, n_outputs, hidden"):
        load_factory(f"{path}:narrow")(n_inputs=3, n_outputs=2, hidden=5)


def test_the_factory_module_is_importable_by_name_while_it_runs(tmp_path):
    """dataclasses look their module up in sys.modules while the class is made."""
    path = write(tmp_path, """
        import dataclasses
        from torch import nn
        @dataclasses.dataclass
        class Sizes:
            hidden: int
        def factory(n_inputs, n_outputs, hidden):
            return nn.Linear(n_inputs, Sizes(hidden).hidden)
    """)
    assert isinstance(load_factory(f"{path}:factory")(n_inputs=2, n_outputs=1, hidden=3), nn.Linear)


def test_errors_inside_a_factory_name_it(tmp_path):
    path = write(tmp_path, """
        def factory(n_inputs, n_outputs, hidden):
            raise KeyError("no such size")
    """)
    with pytest.raises(RuntimeError, match=f"{path}:factory raised KeyError: 'no such size'"):
        build_model(f"{path}:factory", 3, 2, 5)


def test_token_inputs_get_an_embedding_in_front_of_any_model_but_recurrent_net(tmp_path):
    path = write(tmp_path, """
        from torch import nn
        SEEN = []
        class Net(nn.Module):
            def __init__(self, n_inputs, n_outputs):
                super().__init__()
                self.head = nn.Linear(n_inputs, n_outputs)
            def forward(self, x, state=None):
                return self.head(x), state
        def factory(n_inputs, n_outputs, hidden):
            SEEN.append(n_inputs)
            return Net(n_inputs, n_outputs)
    """)
    tokens = torch.randint(7, (3, 9))
    gru = build_model("gru", n_inputs=4, n_outputs=7, hidden=5, vocab=7)
    assert isinstance(gru, tbptt.RecurrentNet) and gru.embedding.num_embeddings == 7
    for name in ("mingru", "minlstm", "lru", "mamba", f"{path}:factory"):
        model = build_model(name, n_inputs=4, n_outputs=7, hidden=6, vocab=7)
        assert isinstance(model, tbptt.models.TokenEmbedding), name
        assert (model.embedding.num_embeddings, model.embedding.embedding_dim) == (7, 4)
        y, _ = model(tokens)
        assert y.shape == (3, 9, 7), name
        # the embedding is trained with the model
        y.sum().backward()
        assert model.embedding.weight.grad is not None and model.embedding.weight.grad.abs().sum() > 0
        assert tbptt.check_model(model, tokens).ok, name
    assert isinstance(build_model("lru", 4, 7, 6), tbptt.LRU)  # float inputs: no embedding


def test_a_task_builds_any_model_for_its_inputs():
    task = tbptt.data.load_task("echo", steps=20, eval_steps=10, batch_size=2)
    assert isinstance(task.model(hidden=5, name="mamba"), tbptt.models.TokenEmbedding)
    assert task.model(hidden=5, cell="gru").rnn.mode == "GRU"  # cell: the former keyword
    assert task.model(8, "gru", 2).rnn.num_layers == 2
    with pytest.raises(ValueError, match="give the model once"):
        task.model(hidden=5, name="lru", cell="gru")
    adding = tbptt.data.load_task("adding", sequences=8, eval_sequences=4, batch_size=2)
    assert isinstance(adding.model(hidden=5, name="lru", layers=2), tbptt.LRU)


def test_model_spec_checks_the_form_only():
    assert tbptt.models.model_spec("lru") == "lru"
    assert tbptt.models.model_spec("not/there.py:make") == "not/there.py:make"
    for bad in ("transformer", "model.py", "model.py:", "model.py:1x", 3):
        with pytest.raises(ValueError, match="model must be one of 'lstm'"):
            tbptt.models.model_spec(bad)
