"""check_model against models that keep the engine's contract and models that break it, each
broken in one known way: every test asserts the diagnosis and where it was found, not just ``not ok``."""

import pytest
import torch
import torch.nn.functional as F
from _models import MODELS, make_data, make_model, mse_steps
from torch import nn

import tbptt
from tbptt.validate import InvalidArgument, InvalidArgumentType

B, T, N_IN = 4, 16, 3


def sample(dtype=torch.float32, batch=B, steps=T, seed=0):
    return torch.randn(batch, steps, N_IN, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def check(model, x=None, state=None, **options):
    torch.manual_seed(1)
    return tbptt.check_model(model, sample() if x is None else x, state, **options)


def one_problem(report, *phrases):
    """The report's only problem, which must contain every phrase."""
    assert not report.ok
    assert len(report.problems) == 1, report
    for phrase in phrases:
        assert phrase in report.problems[0], report
    return report.problems[0]


def has_problem(report, *phrases):
    assert not report.ok
    assert any(all(p in problem for p in phrases) for problem in report.problems), report


def status(report, name):
    return next(c for c in report.checks if c.name == name).status


# ----------------------------------------------------------------------------------------------
# models that keep the contract


class ComplexDiagonal(nn.Module):
    """h_t = lambda * h_{t-1} + W x_t with complex diagonal lambda (|lambda| < 1); y = Re(C h)."""

    def __init__(self, hidden=4, n_out=2):
        super().__init__()
        self.nu = nn.Parameter(torch.rand(hidden) * 0.5 + 0.2)
        self.theta = nn.Parameter(torch.rand(hidden) * 3.0)
        self.inp = nn.Linear(N_IN, hidden)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, x, state=None):
        lam = torch.exp(-self.nu) * torch.exp(1j * self.theta)
        h = torch.zeros(x.shape[0], lam.shape[0], dtype=lam.dtype) if state is None else state
        outs = []
        for t in range(x.shape[1]):
            h = lam * h + self.inp(x[:, t]).to(lam.dtype)
            outs.append(self.out(h.real))
        return torch.stack(outs, 1), h


class Nested(nn.Module):
    """A state {"a": (h1, [h2]), "b": m} with m stored batch-last [H, B]: the batch dim is found, not assumed."""

    def __init__(self, hidden=5):
        super().__init__()
        self.hidden = hidden
        self.c1, self.c2 = nn.GRUCell(N_IN, hidden), nn.GRUCell(hidden, hidden)
        self.head = nn.Linear(2 * hidden, 2)

    def forward(self, x, state=None):
        if state is None:
            z = x.new_zeros(x.shape[0], self.hidden)
            state = {"a": (z, [z]), "b": z.t()}
        h1, (h2,) = state["a"][0], state["a"][1]
        m = state["b"].t()
        outs = []
        for t in range(x.shape[1]):
            h1 = self.c1(x[:, t], h1)
            h2 = self.c2(h1, h2)
            m = 0.8 * m + 0.2 * h2
            outs.append(self.head(torch.cat([h2, m], -1)))
        return torch.stack(outs, 1), {"a": (h1, [h2]), "b": m.t()}


class CausalConv(nn.Module):
    """A depthwise causal convolution of width ``width``, then a GRU. ``carry``: the last width-1
    inputs travel in the state, so pieces equal one call; otherwise each call zero-pads (the
    pitfall of a popular pure-PyTorch Mamba)."""

    def __init__(self, width=4, carry=True, rnn=True):
        super().__init__()
        self.width, self.carry = width, carry
        self.conv = nn.Conv1d(N_IN, N_IN, width, groups=N_IN)
        self.rnn = nn.GRU(N_IN, 5, batch_first=True) if rnn else None
        self.head = nn.Linear(5 if rnn else N_IN, 2)

    def forward(self, x, state=None):
        if self.carry:
            history, h = (None, None) if state is None else state
        else:
            history, h = None, state
        if history is None:
            history = x.new_zeros(x.shape[0], self.width - 1, x.shape[2])
        padded = torch.cat([history, x], dim=1)
        y = self.conv(padded.transpose(1, 2)).transpose(1, 2)
        if self.rnn is not None:
            y, h = self.rnn(y, h)
        return self.head(y), (padded[:, 1 - self.width:], h) if self.carry else h


class PerStep(nn.Module):
    """No memory: each output depends on its own step; state None."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(N_IN, 2)

    def forward(self, x, state=None):
        return self.lin(x), None


class IgnoredState(nn.Module):
    """No memory either, but it returns a state (with a graph) that the next call ignores."""

    def __init__(self):
        super().__init__()
        self.lin, self.summary = nn.Linear(N_IN, 2), nn.Linear(N_IN, 3)

    def forward(self, x, state=None):
        return self.lin(x), torch.tanh(self.summary(x[:, -1]))


class StepCounter(nn.Module):
    """A GRU cell loop whose state also counts the steps per row in an integer tensor."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.GRUCell(N_IN, 4), nn.Linear(4, 2)

    def forward(self, x, state=None):
        h, count = (x.new_zeros(x.shape[0], 4), torch.zeros(x.shape[0], dtype=torch.long)) if state is None else state
        outs = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            outs.append(self.head(h))
        return torch.stack(outs, 1), (h, count + x.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_recurrent_net_passes(cell, dtype):
    torch.manual_seed(0)
    model = tbptt.RecurrentNet(n_inputs=N_IN, hidden=5, n_outputs=2, cell=cell, layers=2).to(dtype)
    report = check(model, sample(dtype))
    assert report.ok, report
    assert report.problems == [] and report.notes == []
    text = str(report)
    assert "keeps the engine's contract" in text
    for name in ("call", "output shape", "finite", "determinism", "cut at 8", "cut at 1", "cut at 15",
                 "pieces 3+1+2+3+1+2+3+1", "batch independence", "state", "gradient to the state",
                 "state passed in", "weights and buffers"):
        assert status(report, name) == "ok", text
    assert "batch dim 1 (= tbptt.state.batch_dim)" in text  # nn.RNN layout [layers, B, H]


def test_recurrent_net_on_tokens_passes():
    torch.manual_seed(0)
    model = tbptt.RecurrentNet(n_inputs=4, hidden=6, n_outputs=7, cell="lstm", vocab=7)
    tokens = torch.randint(0, 7, (3, 12), generator=torch.Generator().manual_seed(0))
    report = check(model, tokens)
    assert report.ok, report


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_test_models_pass(kind, dtype):
    model = make_model(kind, seed=0, dtype=dtype)
    x, _ = make_data(0, B, T, dtype=dtype)
    report = check(model, x)
    assert report.ok, report


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nested_state_with_a_batch_last_leaf_passes(dtype):
    torch.manual_seed(0)
    report = check(Nested().to(dtype), sample(dtype))
    assert report.ok, report
    measured = next(c for c in report.checks if c.name == "state").measured
    assert "state['a'][0] (4, 5)" in measured and "state['a'][1][0] (4, 5)" in measured
    assert "state['b'] (5, 4)" in measured and "batch dim 1 (= tbptt.state.batch_dim)" in measured


def test_complex_state_passes():
    torch.manual_seed(0)
    report = check(ComplexDiagonal().double(), sample(torch.float64))
    assert report.ok, report
    assert "complex128: batch dim 0" in str(report)


def test_one_row_runs_every_check_but_those_of_the_rows():
    torch.manual_seed(0)
    report = check(tbptt.RecurrentNet(n_inputs=N_IN, hidden=5, n_outputs=2), sample(batch=1))
    assert report.ok, report
    assert status(report, "batch independence") == "skip" and status(report, "cut at 8") == "ok"
    assert "batch dim not checked (one row)" in str(report)
    bad = check(CausalConv(carry=False, rnn=False), sample(batch=1))
    one_problem(bad, "cut at 8: the outputs first differ at step 8, row 0", "misses the last 3 steps of history")


def test_a_given_state_passes():
    model = make_model("lstm", seed=0, dtype=torch.float64)
    x, _ = make_data(0, B, T, dtype=torch.float64)
    with torch.no_grad():
        _, state = model(x, None)
    report = check(model, x, state)
    assert report.ok, report
    assert "state given" in str(report)


def test_convolution_with_its_history_in_the_state_passes():
    torch.manual_seed(0)
    assert check(CausalConv(width=4, carry=True)).ok


def test_a_model_without_memory_passes_and_an_ignored_state_is_a_note():
    torch.manual_seed(0)
    stateless = check(PerStep())
    assert stateless.ok and "None: the model keeps no state between calls" in str(stateless)
    ignored = check(IgnoredState())
    assert ignored.ok, ignored
    assert len(ignored.notes) == 1 and "state is ignored" in ignored.notes[0]
    assert "the pieces agree with one call" in ignored.notes[0]


def test_an_integer_state_leaf_is_a_note():
    torch.manual_seed(0)
    report = check(StepCounter())
    assert report.ok, report
    assert report.notes == ["state[1] is int64: the engine detaches, resets (to 0) and saves it, but no gradient "
                            "flows through it."]


# ----------------------------------------------------------------------------------------------
# models that break it, one way each


class TimeFirstGRU(nn.Module):
    """nn.GRU without batch_first=True, fed [B, T, F]: it runs along the batch."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(N_IN, 5), nn.Linear(5, 2)

    def forward(self, x, state=None):
        out, h = self.rnn(x, state)
        return self.head(out), h


def test_time_first_gru_used_batch_first():
    torch.manual_seed(0)
    report = check(TimeFirstGRU())
    has_problem(report, "state (1, 16, 5): dim 1 follows the number of steps (16 after 16 steps, 1 after 1)",
                "no dim follows the rows", "nn.GRU(..., batch_first=True)")
    has_problem(report, "batch independence: row 3's outputs change when it runs with rows [3, 1] only",
                "nn.GRU(..., batch_first=True)")
    has_problem(report, "cut at 1: the model raised RuntimeError", "on the piece [1, 16)", "batch_first=True")
    assert status(report, "batch independence") == "FAIL" and status(report, "state") == "FAIL"


class CellLoop(nn.Module):
    """A GRU cell loop; ``detach_in``/``detach_out`` detach the state it is given / returns;
    ``ignore`` starts from zeros on every call."""

    def __init__(self, detach_in=False, detach_out=False, ignore=False):
        super().__init__()
        self.cell, self.head = nn.GRUCell(N_IN, 5), nn.Linear(5, 2)
        self.detach_in, self.detach_out, self.ignore = detach_in, detach_out, ignore

    def forward(self, x, state=None):
        h = x.new_zeros(x.shape[0], 5) if state is None or self.ignore else state
        h = h.detach() if self.detach_in else h
        outs = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            outs.append(self.head(h))
        return torch.stack(outs, 1), h.detach() if self.detach_out else h


def test_state_detached_inside_forward():
    torch.manual_seed(0)
    report = check(CellLoop(detach_in=True))
    one_problem(report, "state, returned by the piece [0, 8), changes the outputs or state of the next piece",
                "no gradient reaches it through autograd", "forward detaches the state it is given",
                "Do not .detach() the state in forward")
    assert "state none" not in str(report) and "state 0 " not in str(report)  # measured: gradient 0
    assert status(report, "cut at 8") == "ok"  # the values are right; only the gradient is cut


def test_state_returned_detached():
    torch.manual_seed(0)
    report = check(CellLoop(detach_out=True))
    one_problem(report, "state comes out of forward cut from the graph", "it differs after 8 and after 16 steps",
                "Do not .detach() the state in forward")


def test_model_that_ignores_the_state_it_is_given():
    torch.manual_seed(0)
    report = check(CellLoop(ignore=True))
    has_problem(report, "cut at 8: the outputs first differ at step 8", "right after the cut at 8",
                "does not hold all the history", "the given state ignored")
    has_problem(report, "state is ignored", "the pieces differ from one call")


@pytest.mark.parametrize("width", [2, 4, 6])
def test_causal_convolution_whose_history_is_not_carried(width):
    torch.manual_seed(0)
    report = check(CausalConv(width=width, carry=False, rnn=False))
    k = width - 1
    one_problem(report, "cut at 8: the outputs first differ at step 8", "right after the cut at 8",
                f"agree again from step {8 + k} on",
                f"misses the last {k} step{'s' * (k != 1)} of history",
                f"a causal convolution of width {width} zero-padded on every call",
                f"Carry the last conv_width - 1 inputs in the state (here {k})",
                "(Also at: cut at 1, cut at 15, pieces")
    for name in ("cut at 8", "cut at 1", "cut at 15", "pieces 3+1+2+3+1+2+3+1"):
        assert status(report, name) == "FAIL"


def test_convolution_not_carried_before_a_recurrence():
    """The Mamba pitfall: the difference does not fade, since the recurrence carries it on."""
    torch.manual_seed(0)
    report = check(CausalConv(width=4, carry=False, rnn=True))
    one_problem(report, "cut at 8: the outputs first differ at step 8", "right after the cut at 8",
                "and still differ at step 15", "a convolution's history not carried")


class Bidirectional(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(N_IN, 5, batch_first=True, bidirectional=True)
        self.head = nn.Linear(10, 2)

    def forward(self, x, state=None):
        out, h = self.rnn(x, state)
        return self.head(out), h


class ReversedCumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(N_IN, 2)

    def forward(self, x, state=None):
        return self.lin(x).flip(1).cumsum(1).flip(1), None


@pytest.mark.parametrize("model", [Bidirectional, ReversedCumsum])
def test_model_that_looks_ahead(model):
    torch.manual_seed(0)
    report = check(model())
    one_problem(report, "cut at 8: the outputs first differ at step 0", "before the cut at 8",
                "the model looks ahead (it is not causal", "Make each step's output depend only on the steps up to it")


class BatchMean(nn.Module):
    """Normalises over the batch (what BatchNorm does in training), explicitly, since the check runs in eval mode."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(N_IN, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x, state=None):
        out, h = self.rnn(x - x.mean(dim=0, keepdim=True), state)
        return self.head(out), h


def test_statistics_over_the_batch():
    torch.manual_seed(0)
    report = check(BatchMean())
    one_problem(report, "batch independence: row 3's outputs change when it runs with rows [3, 1] only",
                "first at step 0", "tolerance", "statistics over the batch")


class InPlace(nn.Module):
    """Updates the state tensor it is given in place and returns it."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(N_IN, 4), nn.Linear(4, 2)

    def forward(self, x, state=None):
        h = x.new_zeros(x.shape[0], 4) if state is None else state
        outs = []
        for t in range(x.shape[1]):
            h.mul_(0.5).add_(torch.tanh(self.lin(x[:, t])))
            outs.append(self.head(h.clone()))
        return torch.stack(outs, 1), h


class DictInPlace(nn.Module):
    """Writes the new hidden state into the dict it is given and returns that dict."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.GRUCell(N_IN, 4), nn.Linear(4, 2)

    def forward(self, x, state=None):
        state = {"h": x.new_zeros(x.shape[0], 4)} if state is None else state
        outs = []
        for t in range(x.shape[1]):
            state["h"] = self.cell(x[:, t], state["h"])
            outs.append(self.head(state["h"]))
        return torch.stack(outs, 1), state


def test_state_returned_as_given_and_changed_in_place():
    torch.manual_seed(0)
    report = check(InPlace())
    has_problem(report, "forward returned the very state object it was given (cut at 8, the piece [8, 16))")
    has_problem(report, "forward changed the state it was given in place (cut at 8, the piece [8, 16)",
                "not h.mul_(a).add_(b)")
    assert status(report, "state passed in") == "FAIL" and status(report, "cut at 8") == "ok"


def test_dict_state_changed_in_place():
    torch.manual_seed(0)
    report = check(DictInPlace())
    has_problem(report, "forward replaced state['h'] inside the state it was given (cut at 8, the piece [8, 16))",
                "{**state, 'h': h}")
    has_problem(report, "forward returned the very state object it was given")


class Outputs(nn.Module):
    """A GRU whose outputs are cut to the wrong shape by ``shape_of(out)``."""

    def __init__(self, shape_of):
        super().__init__()
        self.rnn, self.head, self.shape_of = nn.GRU(N_IN, 5, batch_first=True), nn.Linear(5, 2), shape_of

    def forward(self, x, state=None):
        out, h = self.rnn(x, state)
        return self.shape_of(self.head(out)), h


@pytest.mark.parametrize("shape_of, phrase", [
    (lambda y: y[:, -1], "returned outputs of shape (4, 2): dim 1 (time) is 2, expected T=16"),
    (lambda y: y[:, -1, 0], "returned outputs of shape (4,), with no time dim (expected [B=4, T=16, ...])"),
    (lambda y: y[:1], "returned outputs of shape (1, 16, 2): dim 0 (batch) is 1, expected B=4"),
    (lambda y: y.transpose(0, 1), "returned outputs of shape (16, 4, 2), time first: batch and time are swapped"),
])
def test_wrong_output_shape(shape_of, phrase):
    torch.manual_seed(0)
    report = check(Outputs(shape_of))
    one_problem(report, phrase)
    assert status(report, "output shape") == "FAIL" and status(report, "other checks") == "skip"


class BufferMemory(nn.Module):
    """Keeps its memory in a buffer, written in forward (Keras-style stateful), invisible to the engine."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(N_IN, 2)
        self.register_buffer("memory", torch.zeros(2))

    def forward(self, x, state=None):
        y = self.lin(x).cumsum(1) + self.memory
        self.memory.copy_(y[0, -1].detach())
        return y, None


def test_memory_kept_in_a_buffer():
    torch.manual_seed(0)
    model = BufferMemory()
    report = check(model)
    has_problem(report, "forward changed memory while the model ran in eval mode", "Return it as part of the state")
    has_problem(report, "a second identical call", "keeps something between calls")
    assert torch.equal(model.memory, torch.zeros(2))  # restored


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(N_IN, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x, state=None):
        out, h = self.rnn(F.dropout(x, 0.5, training=True), state)
        return self.head(out), h


def test_random_in_eval_mode():
    torch.manual_seed(0)
    report = check(Noisy())
    one_problem(report, "the model gives other outputs", "on a second identical call in eval mode",
                "F.dropout(x, training=True)")
    assert status(report, "other checks") == "skip"


def test_outputs_not_finite():
    def poison(y):
        y = y.clone()
        y[2, 5, 1] = float("nan")
        return y

    torch.manual_seed(0)
    one_problem(check(Outputs(poison)), "the outputs after the sample are not finite (1 of 128 values, first at row 2, step 5)")


class NeedsState(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(N_IN, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x, state):
        out, h = self.rnn(x, state[0])
        return self.head(out), (h,)


def test_model_that_raises_on_state_none():
    torch.manual_seed(0)
    one_problem(check(NeedsState()), "the model raised TypeError", "from state=None (how every stream starts)",
                "Create the initial state inside forward when state is None")
    given = check(NeedsState(), state=(torch.zeros(1, B, 5),))
    one_problem(given, "the model raised TypeError", "on one step from state=None, how the Trainer starts every stream")
    assert status(given, "cut at 8") == "ok"


class Returns(nn.Module):
    """A GRU cell loop whose state is turned into ``state_of(h)`` (and read back by ``read``)."""

    def __init__(self, state_of, read=lambda s: s):
        super().__init__()
        self.cell, self.head, self.state_of, self.read = nn.GRUCell(N_IN, 4), nn.Linear(4, 2), state_of, read

    def forward(self, x, state=None):
        h = x.new_zeros(x.shape[0], 4) if state is None else self.read(state)
        outs = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            outs.append(self.head(h))
        return torch.stack(outs, 1), self.state_of(h)


class Opaque:
    def __init__(self, h):
        self.h = h


def test_state_leaf_kinds_the_engine_cannot_handle():
    torch.manual_seed(0)
    scalar = check(Returns(lambda h: (h, 3), read=lambda s: s[0]))
    one_problem(scalar, "state[1] is a Python int (3): one value for all rows", "hold it in a tensor with a batch dim")
    opaque = check(Returns(Opaque, read=lambda s: s.h))
    one_problem(opaque, "state is a Opaque, which the engine cannot see into to detach, reset or save")
    assert status(opaque, "call") == "FAIL" and status(opaque, "other checks") == "skip"


def test_state_leaf_shared_by_all_rows():
    torch.manual_seed(0)
    report = check(Returns(lambda h: (h, h.mean(0)), read=lambda s: s[0]))
    one_problem(report, "state[1] (4,) has no batch dim: its shape is the same for 4 rows and for a sub-batch of 2")


class Heads(nn.Module):
    """A batch-first state [B, heads, H]; with heads == B, tbptt.state.batch_dim reads dim 1."""

    def __init__(self, heads=2):
        super().__init__()
        self.heads, self.lin = heads, nn.Linear(N_IN, heads * 4)

    def forward(self, x, state=None):
        h = x.new_zeros(x.shape[0], self.heads, 4) if state is None else state
        outs = []
        for t in range(x.shape[1]):
            h = 0.9 * h + torch.tanh(self.lin(x[:, t])).view(x.shape[0], self.heads, 4)
            outs.append(h.reshape(x.shape[0], -1))
        return torch.stack(outs, 1), h


def reset_dim0(state, rows):
    return torch.where(rows[:, None, None], torch.zeros_like(state), state)


def reset_dim1(state, rows):
    return torch.where(rows[None, :, None], torch.zeros_like(state), state)


def test_batch_dim_found_by_experiment_and_compared_with_resets():
    torch.manual_seed(0)
    x = sample(batch=2)
    report = check(Heads(), x)
    one_problem(report, "state (2, 2, 4): the batch is dim 0 (its size follows the rows of a sub-batch)",
                "tbptt.state.batch_dim, which resets use, reads dim 1", "give the Trainer a reset_fn that resets dim 0")
    assert check(Heads(heads=3), x).ok  # no ambiguity: batch_dim finds dim 0
    assert check(Heads(), x, reset_fn=reset_dim0).ok
    one_problem(check(Heads(), x, reset_fn=reset_dim1), "reset_fn, asked to reset row 0, changed other rows of state")


def test_tolerance():
    off = Returns(lambda h: h + 1e-6)
    torch.manual_seed(0)
    model = off.double()
    one_problem(check(model, sample(torch.float64)), "cut at 8: the outputs first differ at step 8")
    assert check(model, sample(torch.float64), tolerance=1e-3).ok
    with pytest.raises(InvalidArgument, match="tolerance must be a positive number"):
        check(model, sample(torch.float64), tolerance=0)


def test_bad_arguments():
    model = PerStep()
    with pytest.raises(InvalidArgument, match=r"inputs must be a sample batch \[B, T, ...\] of B >= 1 rows and "
                                              r"T >= 8 steps; got torch.Size\(\[4, 5, 3\]\); .*pass a longer sample"):
        tbptt.check_model(model, torch.zeros(4, 5, 3))
    with pytest.raises(InvalidArgument, match=r"B >= 1 rows .*got torch.Size\(\[0, 16, 3\]\)"):
        tbptt.check_model(model, torch.zeros(0, 16, 3))
    with pytest.raises(InvalidArgumentType, match="inputs must be a tensor"):
        tbptt.check_model(model, [[0.0] * 16] * 4)
    with pytest.raises(InvalidArgumentType, match="model must be a torch.nn.Module; got 'function'"):
        tbptt.check_model(lambda x, s: (x, s), torch.zeros(4, 16, 3))


def test_report_prints_every_check_and_its_measurement():
    torch.manual_seed(0)
    text = str(check(CausalConv(width=4, carry=False, rnn=False)))
    lines = text.splitlines()
    assert lines[0] == "check_model: CausalConv on inputs (4, 16, 3) float32, state None: 1 problem"
    assert any(line.startswith("  FAIL  cut at 8") and "outputs max |Δ|" in line and "tolerance" in line for line in lines)
    assert any(line.startswith("  ok    batch independence") for line in lines)
    assert "problems:" in lines and any(line.startswith("  1. cut at 8: the outputs first differ") for line in lines)
    error = tbptt.ModelContractError(check(CausalConv(carry=False)))
    assert isinstance(error, ValueError) and str(error.report) in str(error)


def test_check_leaves_the_model_and_the_rng_as_they_were():
    torch.manual_seed(0)
    model = Noisy()
    model.train()
    model.head.eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    tbptt.check_model(model, sample())
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and model.rnn.training and not model.head.training
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]) and torch.equal(p.grad, torch.full_like(p, 0.25))
    good = make_model("dict", seed=0)
    x, _ = make_data(0, B, T)
    before = torch.get_rng_state()
    assert tbptt.check_model(good, x).ok and torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for p in good.parameters())


# ----------------------------------------------------------------------------------------------
# Trainer(check_model=True)


class Counting(nn.Module):
    """Counts the calls to ``inner``."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x, state=None):
        self.calls += 1
        return self.inner(x, state)


def trainer(model, checked):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return tbptt.Trainer(model, mse_steps, opt, tbptt.TBPTT(4, 8), check_model=checked)


def test_trainer_refuses_a_bad_model_before_any_update():
    torch.manual_seed(0)
    model = CausalConv(carry=False).double()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = make_data(0, B, T, dtype=torch.float64)
    t = trainer(model, True)
    with pytest.raises(tbptt.ModelContractError) as caught:
        t.train_on(x, y)
    assert not caught.value.report.ok
    assert "cut at 8: the outputs first differ at step 8" in caught.value.report.problems[0]
    assert "check_model: CausalConv" in str(caught.value)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert t.updates_applied == 0 and t.position == 0


def test_trainer_trains_a_good_model_as_without_the_check_and_checks_once():
    runs = {}
    for checked in (False, True):
        model = Counting(make_model("grucell", seed=3))
        t = trainer(model, checked)
        x, y = make_data(1, B, T)
        first = t.train_on(x, y)
        calls_after_first = model.calls
        second = t.train_on(*make_data(2, B, T))
        runs[checked] = (model, [r.loss for r in first + second], calls_after_first, model.calls - calls_after_first)
    (plain, plain_losses, plain_first, plain_second), (checked, losses, first_calls, second_calls) = runs[False], runs[True]
    assert losses == plain_losses  # the check leaves weights and random state as they were
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), checked.parameters()))
    assert first_calls > plain_first  # the check ran on the first call ...
    assert second_calls == plain_second  # ... and only then


def test_trainer_check_model_argument():
    model = PerStep()
    with pytest.raises(InvalidArgument, match="check_model must be one of False, True; got 'yes'"):
        tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=0.1), tbptt.TBPTT(4, 4),
                      check_model="yes")
    short = trainer(make_model("lstm", seed=0), True)
    with pytest.raises(InvalidArgument, match="first train_on call's inputs are the sample"):
        short.train_on(*make_data(0, B, 5))
