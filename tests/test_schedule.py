import pytest
from _models import oracle_updates
from hypothesis import given
from hypothesis import strategies as hs

from tbptt import TBPTT, Update

ks = hs.one_of(hs.none(), hs.integers(1, 12))


def as_tuples(updates):
    return [(u.start, u.loss_start, u.stop) for u in updates]


@pytest.mark.parametrize(
    "k1,k2,expected",
    [
        (4, 4, [(0, 0, 4), (4, 4, 8), (8, 8, 10)]),
        (2, 5, [(0, 0, 2), (0, 2, 4), (1, 4, 6), (3, 6, 8), (5, 8, 10)]),
        (3, 7, [(0, 0, 3), (0, 3, 6), (2, 6, 9), (5, 9, 10)]),
        (5, 2, [(3, 3, 5), (8, 8, 10)]),
    ],
)
def test_worked_examples_of_semantics(k1, k2, expected):
    assert as_tuples(TBPTT(k1, k2).updates(10)) == expected


def test_presets_and_names():
    assert str(TBPTT.full()) == "TBPTT(n,n)"
    assert str(TBPTT.williams_peng()) == "TBPTT(1,n)"
    assert str(TBPTT(5, 20)) == "TBPTT(5,20)"
    assert str(TBPTT.chunked(7)) == "TBPTT(7,7)"
    assert TBPTT.full().updates(6) == [Update(0, 0, 6)]
    assert as_tuples(TBPTT.williams_peng().updates(3)) == [(0, 0, 1), (0, 1, 2), (0, 2, 3)]
    assert TBPTT.parse("n,n") == TBPTT.full()
    assert TBPTT.parse("TBPTT(10,40)") == TBPTT(10, 40)


@given(n=hs.integers(0, 60), k1=ks, k2=ks, errors=hs.sampled_from(["new", "window"]))
def test_updates_follow_the_definition(n, k1, k2, errors):
    s = TBPTT(k1, k2, errors)
    assert as_tuples(s.updates(n)) == oracle_updates(n, k1, k2, errors)


@given(n=hs.integers(1, 80), k1=ks, k2=ks)
def test_each_error_is_injected_once_with_new_errors(n, k1, k2):
    ups = TBPTT(k1, k2).updates(n)
    injected = [t for u in ups for t in range(u.loss_start, u.stop)]
    assert len(injected) == len(set(injected))
    # every step is injected unless it lies before the window of its block (k1 > k2)
    if k2 is None or (k1 is not None and k2 >= k1) or k1 is None and k2 >= n:
        assert sorted(injected) == list(range(n))
    for u in ups:
        assert 0 <= u.start <= u.loss_start < u.stop <= n
        if k2 is not None:
            assert u.window <= k2


@given(n=hs.integers(1, 60), k1=hs.integers(1, 10), k2=hs.integers(1, 12))
def test_saved_state_position_is_a_later_window_start(n, k1, k2):
    s = TBPTT(k1, k2)
    starts = {u.start for u in s.updates(n)}
    previous = 0
    while previous < n:
        q = s.saved_state_position(previous)
        later = {u.start for u in s.updates(n) if u.stop > previous + k1}
        needed = {x for x in later if previous <= x < previous + k1 and x > 0}
        if q is not None:
            assert previous <= q < previous + k1
            assert needed <= {q}
        else:
            assert not needed or needed <= {previous}
        previous += k1
    assert all(x >= 0 for x in starts)


def test_cost_matches_semantics():
    c = TBPTT(10, 40).cost(1000)
    assert c["updates"] == 100
    assert c["forward_stored"] == 1000
    assert c["backward"] == sum(u.window for u in TBPTT(10, 40).updates(1000))
    assert 3900 <= c["forward_recompute"] <= 4000
    assert TBPTT(20, 20).cost(1000)["forward_recompute"] == 1000


@pytest.mark.parametrize("bad", [0, -3, 2.5, "5", True])
def test_bad_k_is_named(bad):
    with pytest.raises((ValueError, TypeError), match="k1"):
        TBPTT(bad, 5)
    with pytest.raises((ValueError, TypeError), match="k2"):
        TBPTT(5, bad)


def test_bad_errors_mode():
    with pytest.raises(ValueError, match="errors"):
        TBPTT(2, 2, errors="all")
    with pytest.raises(ValueError, match="configuration"):
        TBPTT.parse("5;20")
