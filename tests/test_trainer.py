"""Trainer against naive reference training loops written step by step from SEMANTICS.md."""

import gc

import pytest
import torch
from _models import make_data, make_model, mse_steps, oracle_updates
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from torch.func import functional_call

import tbptt

ks = hs.one_of(hs.none(), hs.integers(1, 6))


def sgd(model, lr=0.05):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5)


def naive_recompute(model, x, y, k1, k2, errors="new"):
    """The exact strategy: each window re-run step by step from its entering state with the
    current weights; a block's new steps are computed inside its window (SEMANTICS cost model)."""
    opt = sgd(model)
    trajectory = {0: None}  # state entering step t, kept when step t-1 was first computed
    previous = 0
    for start, loss_start, stop in oracle_updates(x.shape[1], k1, k2, errors):
        if start > previous:  # steps before the window of a k1 > k2 block only advance the state
            with torch.no_grad():
                h = trajectory[previous]
                for t in range(previous, start):
                    _, h = model(x[:, t : t + 1], h)
                    trajectory[t + 1] = h
        h = tbptt.detach(trajectory[start])
        losses = []
        for t in range(start, stop):
            o, h = model(x[:, t : t + 1], h)
            if t >= previous:
                trajectory[t + 1] = tbptt.detach(h)
            if t >= loss_start:
                losses.append(mse_steps(o, y[:, t : t + 1]))
        loss = torch.cat(losses, dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        previous = stop
    return model


def naive_stored(model, x, y, k1, k2, errors="new"):
    """Williams & Peng's BPTT(h; h'): every step computed once with the weights of its time and
    backpropagated as it was. Re-running a window with each step's own historical weights
    reproduces those stored activations exactly, so the gradient is summed over those copies."""
    opt = sgd(model)
    trajectory = {0: None}
    step_weights = {}
    previous = 0
    for start, loss_start, stop in oracle_updates(x.shape[1], k1, k2, errors):
        snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            h = trajectory[previous]
            for t in range(previous, stop):
                _, h = model(x[:, t : t + 1], h)
                trajectory[t + 1] = h
                step_weights[t] = snapshot
        copies = {}
        h = tbptt.detach(trajectory[start])
        losses = []
        for t in range(start, stop):
            key = id(step_weights[t])
            if key not in copies:
                copies[key] = {n: w.clone().requires_grad_(True) for n, w in step_weights[t].items()}
            o, h = functional_call(model, copies[key], (x[:, t : t + 1], h))
            if t >= loss_start:
                losses.append(mse_steps(o, y[:, t : t + 1]))
        loss = torch.cat(losses, dim=1).mean()
        total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        leaves = [w for c in copies.values() for w in c.values()]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        i = 0
        for c in copies.values():
            for n in c:
                if grads[i] is not None:
                    total[n] += grads[i]
                i += 1
        opt.zero_grad()
        for n, p in model.named_parameters():
            p.grad = total[n]
        opt.step()
        previous = stop
    return model


def train(model, x, y, schedule, strategy, pieces=None):
    trainer = tbptt.Trainer(model, mse_steps, sgd(model), schedule, strategy=strategy)
    n = x.shape[1]
    cuts = [0] + sorted(pieces or []) + [n]
    records = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        records += trainer.train_on(x[:, a:b], y[:, a:b])
    records += trainer.reset_state()
    return model, records


def assert_same_weights(a, b, tol=1e-10):
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        torch.testing.assert_close(pa, pb, atol=tol, rtol=tol)


SETTINGS = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(**SETTINGS)
@given(kind=hs.sampled_from(["lstm", "grucell", "dict"]), n=hs.integers(1, 14), k1=ks, k2=ks,
       errors=hs.sampled_from(["new", "window"]), seed=hs.integers(0, 999))
def test_recompute_equals_naive_training_loop(kind, n, k1, k2, errors, seed):
    x, y = make_data(seed, 2, n)
    ref = naive_recompute(make_model(kind, seed), x, y, k1, k2, errors)
    got, records = train(make_model(kind, seed), x, y, tbptt.TBPTT(k1, k2, errors), "recompute")
    assert [(r.start, r.loss_start, r.stop) for r in records] == oracle_updates(n, k1, k2, errors)
    assert_same_weights(got, ref)


@settings(**SETTINGS)
@given(kind=hs.sampled_from(["lstm", "grucell", "dict"]), n=hs.integers(1, 14), k1=ks, k2=ks,
       errors=hs.sampled_from(["new", "window"]), seed=hs.integers(0, 999))
def test_stored_equals_naive_williams_peng(kind, n, k1, k2, errors, seed):
    x, y = make_data(seed, 2, n)
    ref = naive_stored(make_model(kind, seed), x, y, k1, k2, errors)
    got, _ = train(make_model(kind, seed), x, y, tbptt.TBPTT(k1, k2, errors), "stored")
    assert_same_weights(got, ref)


@settings(**SETTINGS)
@given(n=hs.integers(1, 20), k1=hs.integers(1, 7), extra=hs.integers(0, 5), seed=hs.integers(0, 999))
def test_stored_is_recompute_when_k1_at_least_k2(n, k1, extra, seed):
    k2 = max(1, k1 - extra)
    x, y = make_data(seed, 2, n)
    a, _ = train(make_model("lstm", seed), x, y, tbptt.TBPTT(k1, k2), "stored")
    b, _ = train(make_model("lstm", seed), x, y, tbptt.TBPTT(k1, k2), "recompute")
    assert_same_weights(a, b, tol=0)


def test_strategies_differ_when_windows_overlap():
    x, y = make_data(0, 2, 12)
    a, _ = train(make_model("lstm", 0), x, y, tbptt.TBPTT(2, 6), "stored")
    b, _ = train(make_model("lstm", 0), x, y, tbptt.TBPTT(2, 6), "recompute")
    assert not torch.allclose(a.lstm.weight_hh_l0, b.lstm.weight_hh_l0, atol=1e-8)


@settings(**SETTINGS)
@given(n=hs.integers(1, 30), k1=ks, k2=ks, strategy=hs.sampled_from(["recompute", "stored"]),
       cuts=hs.lists(hs.integers(1, 29), max_size=6), seed=hs.integers(0, 999))
def test_stream_cut_into_pieces_gives_the_same_weights(n, k1, k2, strategy, cuts, seed):
    x, y = make_data(seed, 3, n)
    whole, r1 = train(make_model("lstm", seed), x, y, tbptt.TBPTT(k1, k2), strategy)
    pieces, r2 = train(make_model("lstm", seed), x, y, tbptt.TBPTT(k1, k2), strategy,
                       pieces=[c for c in set(cuts) if c < n])
    assert [(r.start, r.stop, r.loss) for r in r1] == [(r.start, r.stop, r.loss) for r in r2]
    assert_same_weights(whole, pieces, tol=0)


class SavedBytes:
    """Bytes of tensors autograd holds for backward, live at once: the activations retained."""

    def __init__(self):
        self.live = 0
        self.peak = 0

    def pack(self, t):
        import weakref

        size = t.numel() * t.element_size()

        class Box:
            pass

        box = Box()
        box.t = t.detach()  # no strong link back to the node that saves it (no cycle)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(box, self._free, size)
        return box

    def _free(self, size):
        self.live -= size

    @staticmethod
    def unpack(box):
        return box.t


@pytest.mark.parametrize("k1,k2,strategy", [(10, 10, "recompute"), (5, 20, "recompute"),
                                            (5, 20, "stored"), (20, 5, "stored"), (1, 8, "stored")])
def test_retained_activations_do_not_grow_with_the_stream(k1, k2, strategy):
    peaks = []
    for n in (120, 480):
        torch.manual_seed(0)
        model = tbptt.models.RecurrentNet(3, 8, 2)
        trainer = tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=0.01),
                                tbptt.TBPTT(k1, k2), strategy=strategy)
        x, y = make_data(0, 4, n, dtype=torch.float32)
        counter = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            for a in range(0, n, 37):
                trainer.train_on(x[:, a : a + 37], y[:, a : a + 37])
            trainer.reset_state()
        peaks.append(counter.peak)
        gc.collect()  # the counting boxes form cycles with the nodes that saved them
        assert counter.live == 0, "activations outlived the streams"
    assert peaks[0] > 0
    assert peaks[1] <= peaks[0] * 1.05, peaks


def test_full_bptt_memory_grows_with_the_stream_as_it_must():
    peaks = []
    for n in (50, 200):
        model = tbptt.models.RecurrentNet(3, 8, 2)
        trainer = tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=0.01),
                                tbptt.TBPTT.full())
        x, y = make_data(0, 4, n, dtype=torch.float32)
        counter = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            trainer.train_on(x, y, end_of_stream=True)
        peaks.append(counter.peak)
    assert peaks[1] > 3 * peaks[0]
