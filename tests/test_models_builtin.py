"""The built-in scan models (MinGRU, MinLSTM, LRU, Mamba): one call against a plain per-step loop,
a stream cut into segments against one call, their state's batch dimension, resets, and errors."""

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as hs

import tbptt
from _model_loops import SCAN_MODELS, make_scan_model, one_thread, step_by_step

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)

models = hs.sampled_from(SCAN_MODELS)


def random_state(model, batch, seed):
    """A state as a stream would have it mid-way: the model run over a few random steps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _, state = model(torch.randn(batch, 5, model.n_inputs, generator=g, dtype=torch.float64))
    return state


def assert_states_close(a, b, tol):
    la, lb = tbptt.state.tensors(a), tbptt.state.tensors(b)
    assert [x.shape for x in la] == [y.shape for y in lb]
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


@settings(max_examples=16, deadline=None)
@given(name=models, steps=hs.integers(1, 90), layers=hs.integers(1, 2), carried=hs.booleans(),
       seed=hs.integers(0, 999))
def test_one_call_equals_the_per_step_loop_in_float64(name, steps, layers, carried, seed):
    model = make_scan_model(name, seed, layers)
    x = torch.randn(3, steps, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    state = random_state(model, 3, seed) if carried else None
    y, s = model(x, state)
    y_loop, s_loop = step_by_step(model, x, state)
    torch.testing.assert_close(y, y_loop, atol=1e-12, rtol=1e-12)
    assert_states_close(s, s_loop, 1e-12)
    # and the gradients of every weight
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    params = list(model.parameters())
    g1 = torch.autograd.grad((y * weights).sum(), params, allow_unused=True)
    g2 = torch.autograd.grad((y_loop * weights).sum(), params, allow_unused=True)
    for p, a, b in zip(params, g1, g2):
        torch.testing.assert_close(a if a is not None else torch.zeros_like(p),
                                   b if b is not None else torch.zeros_like(p), atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("name", SCAN_MODELS)
def test_float32_at_2048_steps_is_as_accurate_as_the_float32_loop(name):
    """The float32 scan against the float64 loop: within a few times the float32 loop's own error."""
    model = make_scan_model(name, 0, layers=2, dtype=torch.float32, hidden=8)
    x = torch.randn(2, 2048, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y32, _ = model(x)
        loop32, _ = step_by_step(model, x)
        loop64, _ = step_by_step(copy.deepcopy(model).double(), x.double())
    scan_error = (y32.double() - loop64).abs().max().item()
    loop_error = (loop32.double() - loop64).abs().max().item()
    assert scan_error < 5 * loop_error + 2e-6, (scan_error, loop_error)


@settings(max_examples=24, deadline=None)
@given(name=models, steps=hs.integers(2, 140), layers=hs.integers(1, 2),
       cuts=hs.lists(hs.integers(1, 139), min_size=1, max_size=8), seed=hs.integers(0, 999))
def test_a_stream_cut_into_segments_equals_one_call(name, steps, layers, cuts, seed):
    model = make_scan_model(name, seed, layers)
    x = torch.randn(2, steps, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    whole, final = model(x)
    bounds = [0] + sorted({c for c in cuts if c < steps}) + [steps]
    state, pieces = None, []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out, state = model(x[:, a:b], state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-12, rtol=1e-12)
    assert_states_close(state, final, 1e-12)


def test_mamba_carries_its_convolution_inputs():
    """The convolution's last W - 1 inputs are part of the state: a segment shorter than the
    convolution continues from the ones before it (zero padding there would change the outputs)."""
    model = make_scan_model("mamba", 0, conv_width=4)
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    whole, _ = model(x)
    state, pieces = None, []
    for t in range(9):
        out, state = model(x[:, t : t + 1], state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-13, rtol=1e-13)
    history = state[0][0].reshape(2, 3, -1)  # [B, W - 1, E]
    inner = model.blocks[0].in_proj(model.norms[0](model.encoder(x)))[..., : model.blocks[0].channels]
    torch.testing.assert_close(history, inner[:, -3:], atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("name", SCAN_MODELS)
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 6, 8, 24])
def test_every_state_leaf_is_batch_first_whatever_the_batch_size(name, batch):
    """Batch sizes equal to the hidden size (4), the state size (3), conv_width - 1 (2), the
    channels (8) and a leaf's width (24: Mamba's E * N): the batch is dimension 0 of every leaf."""
    model = make_scan_model(name, 0, layers=2)
    _, state = model(torch.randn(batch, 3, 3, dtype=torch.float64))
    leaves = tbptt.state.tensors(state)
    assert leaves and all(leaf.dim() == 2 and leaf.shape[0] == batch for leaf in leaves)
    assert all(tbptt.state.batch_dim(leaf, batch) == 0 for leaf in leaves)


@settings(max_examples=16, deadline=None)
@given(name=models, batch=hs.integers(1, 8), seed=hs.integers(0, 999))
def test_a_reset_row_restarts_as_a_fresh_stream_and_the_others_carry_on(name, batch, seed):
    model = make_scan_model(name, seed, layers=2)
    g = torch.Generator().manual_seed(seed)
    first, second = torch.randn(2, batch, 6, 3, generator=g, dtype=torch.float64)
    rows = torch.rand(batch, generator=g) < 0.5
    _, state = model(first)
    got, _ = model(second, tbptt.reset_rows(state, rows))
    fresh, _ = model(second)
    carried, _ = model(second, state)
    want = torch.where(rows[:, None, None], fresh, carried)
    torch.testing.assert_close(got, want, atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("name", SCAN_MODELS)
def test_rows_are_independent(name):
    model = make_scan_model(name, 0, layers=2)
    x = torch.randn(5, 20, 3, dtype=torch.float64)
    y, _ = model(x)
    torch.testing.assert_close(model(x[1:3])[0], y[1:3], atol=1e-13, rtol=1e-13)


def test_lru_runs_in_complex128_after_double():
    model = make_scan_model("lru", 0)
    assert model.blocks[0].eigenvalues().dtype == torch.complex128
    assert model.float().blocks[0].eigenvalues().dtype == torch.complex64


def test_lru_eigenvalues_start_in_the_ring():
    torch.manual_seed(0)
    model = tbptt.LRU(n_inputs=2, hidden=8, n_outputs=1, state_size=4000, r_min=0.5, r_max=0.8, max_phase=0.3)
    block = model.blocks[0]
    modulus = block.eigenvalues().abs()
    assert 0.5 <= modulus.min() and modulus.max() <= 0.8
    # uniform in area: |lambda|^2 uniform on [r_min^2, r_max^2], so its mean is the midpoint
    assert abs((modulus**2).mean().item() - (0.25 + 0.64) / 2) < 0.01
    assert 0 < block.eigenvalues().angle().min() and block.eigenvalues().angle().max() <= 0.3
    torch.testing.assert_close(torch.exp(block.gamma_log), torch.sqrt(1 - modulus**2))


@pytest.mark.parametrize("cls", [tbptt.MinGRU, tbptt.MinLSTM, tbptt.LRU, tbptt.Mamba])
def test_bad_sizes_and_inputs_are_named(cls):
    with pytest.raises(ValueError, match="layers must be a positive int; got 0"):
        cls(n_inputs=3, hidden=4, n_outputs=2, layers=0)
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        cls(n_inputs=3, hidden=-1, n_outputs=2)
    model = cls(n_inputs=3, hidden=4, n_outputs=2)
    with pytest.raises(ValueError, match=r"inputs must be a tensor \[B, T, 3\]"):
        model(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match=r"inputs must be a tensor \[B, T, 3\]"):
        model(torch.randn(5, 3))
    _, state = model(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="state must be the state this .* returned for 3 streams"):
        model(torch.randn(3, 5, 3), state)


def test_bad_model_options_are_named():
    with pytest.raises(ValueError, match="scan must be one of 'log', 'linear'"):
        tbptt.MinGRU(n_inputs=3, hidden=4, n_outputs=2, scan="fft")
    with pytest.raises(ValueError, match=r"r_max must be a number in \[0, 1\)"):
        tbptt.LRU(n_inputs=3, hidden=4, n_outputs=2, r_max=1.0)
    with pytest.raises(ValueError, match="r_max must be greater than r_min"):
        tbptt.LRU(n_inputs=3, hidden=4, n_outputs=2, r_min=0.9, r_max=0.5)
    with pytest.raises(ValueError, match="conv_width must be a positive int"):
        tbptt.Mamba(n_inputs=3, hidden=4, n_outputs=2, conv_width=0)
    with pytest.raises(ValueError, match="dt_max must be at least dt_min"):
        tbptt.Mamba(n_inputs=3, hidden=4, n_outputs=2, dt_min=0.1, dt_max=0.01)


def test_mamba_with_a_convolution_of_width_one_has_no_history():
    model = make_scan_model("mamba", 0, conv_width=1)
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    whole, state = model(x)
    assert state[0][0].shape == (2, 0)
    a, s = model(x[:, :3])
    b, _ = model(x[:, 3:], s)
    torch.testing.assert_close(torch.cat([a, b], dim=1), whole, atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("name", SCAN_MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_check_model_passes(name, dtype):
    model = make_scan_model(name, 0, layers=2, dtype=dtype)
    inputs = torch.randn(3, 12, 3, generator=torch.Generator().manual_seed(0)).to(dtype)  # B = 3 = state_size
    report = tbptt.check_model(model, inputs)
    assert report.ok, str(report)
    _, state = model(inputs[:, :4])
    assert tbptt.check_model(model, inputs, state=state).ok
