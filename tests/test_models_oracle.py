"""The built-in scan models through the brute-force float64 oracles of truncated_gradients, the
Trainer (both strategies) and resets with masks, under each canonical configuration of SEMANTICS.md:
TBPTT(n, n), (1, n), (k, k), (k1 < k2), (k1 > k2), (k1, 1). The oracles call the model one step at a
time, so a segment's scan is checked against single steps of the same model. Cases: 144 of
truncated_gradients (4 models x 6 configurations x 2 errors modes x 3), 96 of the Trainer (x 2
strategies x 2), 40 with resets and masks."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as hs

import tbptt
from _model_loops import SCAN_MODELS, make_scan_model, one_thread
from _models import make_data, mse_steps, oracle_updates
from test_engine import brute_force
from test_resets import assert_resets_equal_brute_force
from test_trainer import assert_same_weights, naive_recompute, naive_stored, train

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)

CONFIGURATIONS = ("n,n", "1,n", "k,k", "k1<k2", "k1>k2", "k1,1")


@hs.composite
def schedule_ks(draw, configuration):
    """(k1, k2) of one canonical configuration, with the k drawn."""
    if configuration == "n,n":
        return None, None
    if configuration == "1,n":
        return 1, None
    if configuration == "k,k":
        k = draw(hs.integers(2, 5))
        return k, k
    if configuration == "k1<k2":
        k1 = draw(hs.integers(1, 4))
        return k1, k1 + draw(hs.integers(1, 4))
    if configuration == "k1>k2":
        k2 = draw(hs.integers(2, 3))
        return k2 + draw(hs.integers(1, 3)), k2
    return draw(hs.integers(2, 5)), 1


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])


@pytest.mark.parametrize("errors", ["new", "window"])
@pytest.mark.parametrize("configuration", CONFIGURATIONS)
@pytest.mark.parametrize("name", SCAN_MODELS)
@settings(max_examples=3, **SETTINGS)
@given(data=hs.data(), n=hs.integers(1, 11), batch=hs.integers(1, 3), layers=hs.integers(1, 2),
       seed=hs.integers(0, 9999))
def test_truncated_gradients_equal_brute_force(name, configuration, data, n, errors, batch, layers, seed):
    k1, k2 = data.draw(schedule_ks(configuration))
    model = make_scan_model(name, seed, layers)
    x, y = make_data(seed, batch, n)
    got = tbptt.truncated_gradients(model, mse_steps, x, y, tbptt.TBPTT(k1, k2, errors))
    want = brute_force(model, x, y, k1, k2, errors)
    assert len(got) == len(want) == len(oracle_updates(n, k1, k2, errors))
    for g, w in zip(got, want):
        for gv, wv in zip(g.values(), w):
            torch.testing.assert_close(gv, wv, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("strategy", ["recompute", "stored"])
@pytest.mark.parametrize("configuration", CONFIGURATIONS)
@pytest.mark.parametrize("name", SCAN_MODELS)
@settings(max_examples=2, **SETTINGS)
@given(data=hs.data(), n=hs.integers(1, 11), errors=hs.sampled_from(["new", "window"]), seed=hs.integers(0, 999))
def test_trainer_equals_the_naive_training_loop(name, configuration, data, n, errors, strategy, seed):
    k1, k2 = data.draw(schedule_ks(configuration))
    x, y = make_data(seed, 2, n)
    naive = naive_recompute if strategy == "recompute" else naive_stored
    want = naive(make_scan_model(name, seed), x, y, k1, k2, errors)
    got, records = train(make_scan_model(name, seed), x, y, tbptt.TBPTT(k1, k2, errors), strategy)
    assert [(r.start, r.loss_start, r.stop) for r in records] == oracle_updates(n, k1, k2, errors)
    assert_same_weights(got, want)


@pytest.mark.parametrize("name", SCAN_MODELS)
@settings(max_examples=10, **SETTINGS)
@given(n=hs.integers(2, 10), k1=hs.one_of(hs.none(), hs.integers(1, 5)), k2=hs.one_of(hs.none(), hs.integers(1, 5)),
       masked=hs.booleans(), seed=hs.integers(0, 999))
def test_resets_and_masks_equal_each_sequence_trained_on_its_own(name, n, k1, k2, masked, seed):
    assert_resets_equal_brute_force(make_scan_model(name, seed, layers=2), n, k1, k2, seed, masked)
