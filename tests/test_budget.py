"""Budgets: fit stops between two updates (inside an epoch, inside one train_on call) when a budget is
spent, keeps it (backward steps to within half an update, CPU seconds to within 10%), and a resumed
run goes on exactly as one never stopped."""

import time

import pytest
import torch

import tbptt
from tbptt.budget import Budget, BudgetMeter
from _models import make_data, make_model, mse_steps


def new_trainer(k1, k2, strategy, seed=0, dropout=False):
    torch.manual_seed(seed)
    model = make_model("lstm", seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return tbptt.Trainer(model, mse_steps, opt, tbptt.TBPTT(k1, k2), strategy=strategy)


@pytest.mark.parametrize("text,kind,amount", [("epochs:3", "epochs", 3), ("cpu:2.5", "cpu", 2.5),
                                               ("backward:500", "backward", 500), ("seconds:60", "seconds", 60.0)])
def test_budgets_are_read_from_kind_and_amount(text, kind, amount):
    budget = Budget.parse(text)
    assert (budget.kind, budget.amount) == (kind, amount) and Budget.parse(str(budget)) == budget


@pytest.mark.parametrize("text", ["cpu", "cpu:", "gpu:3", "epochs:1.5", "backward:0", "cpu:-1", "cpu:x", 3])
def test_a_bad_budget_names_the_argument_and_the_forms_it_takes(text):
    with pytest.raises(tbptt.InvalidArgument, match=r"budget must be KIND:AMOUNT .*cpu:30") as info:
        Budget.parse(text)
    assert info.value.name == "budget"


def test_the_meter_stops_before_an_update_that_would_overspend_more_than_stopping_leaves():
    spent = {"steps": 0}
    meter = BudgetMeter([Budget("backward", 100)], lambda: spent["steps"])
    meter.start()
    stops = []
    for _ in range(20):
        if meter.should_stop():
            break
        spent["steps"] += 30  # every update costs 30 backward steps
        meter.update_done()
        stops.append(spent["steps"])
    # after 90 the next update would end at 120: 20 over, against 10 left by stopping: stop at 90
    assert stops == [30, 60, 90] and meter.stopped_by == "backward:100"


@pytest.mark.parametrize("k1,k2,strategy", [(3, 6, "recompute"), (3, 6, "stored"), (4, 4, "recompute")])
def test_a_backward_budget_stops_inside_one_call_and_keeps_its_budget(k1, k2, strategy):
    x, y = make_data(0, 2, 60)
    trainer = new_trainer(k1, k2, strategy)
    history = trainer.fit((x, y), budget="backward:100", valid=(x, y))  # the whole split in one call
    spent = trainer.engine.backward_steps
    window = k2
    assert abs(spent - 100) <= window / 2 and history.stopped_by == "backward:100"
    whole_epochs = [not e.get("partial") for e in history.epochs]
    assert whole_epochs == [True] * (len(whole_epochs) - 1) + [False] and trainer.pending


@pytest.mark.parametrize("k1,k2,strategy,segment,every", [
    (3, 6, "recompute", None, None), (3, 6, "stored", None, 4), (3, 8, "stored", 7, None),
    (5, 2, "recompute", None, None), (4, 4, "stored", 9, 2),
])
@pytest.mark.parametrize("first", [70, 115])  # mid-epoch; in the last block of the first epoch
def test_a_run_stopped_by_its_budget_resumes_as_if_never_stopped(tmp_path, k1, k2, strategy, segment, every, first):
    x, y = make_data(1, 2, 40)
    options = dict(valid=(x, y), segment_length=segment, checkpoint_every=every)
    whole = new_trainer(k1, k2, strategy)
    whole.fit((x, y), budget="backward:300", checkpoint=tmp_path / "whole.pt", **options)

    path = tmp_path / "run.pt"
    cut = new_trainer(k1, k2, strategy)
    h_cut = cut.fit((x, y), budget=f"backward:{first}", checkpoint=path, **options)
    assert h_cut.stopped_by == f"backward:{first}" and h_cut.epochs[-1].get("partial")
    resumed = new_trainer(k1, k2, strategy, seed=5)  # other weights: all must come from the checkpoint
    h_resumed = resumed.fit((x, y), budget="backward:300", checkpoint=path, resume=True, **options)
    assert resumed.engine.backward_steps == whole.engine.backward_steps
    assert h_resumed.stopped_by == "backward:300"
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoints_every_n_updates_without_segment_length_resume_after_a_crash(tmp_path):
    x, y = make_data(2, 2, 48)
    whole = new_trainer(2, 5, "stored")
    whole.fit((x, y), epochs=2)

    class Crash(Exception):
        pass

    class CrashAt:
        def __init__(self, at):
            self.at, self.seen = at, 0

        def on_update(self, trainer, record):
            self.seen += 1
            if self.seen == self.at:
                raise Crash()

    path = tmp_path / "run.pt"
    with pytest.raises(Crash):
        new_trainer(2, 5, "stored").fit((x, y), epochs=2, checkpoint=path, checkpoint_every=5,
                                         callbacks=[CrashAt(33)])
    saved = tbptt.checkpoint.load(path)
    assert saved["trainer"]["updates_applied"] == 24 + 5  # saved inside the second epoch's one call
    resumed = new_trainer(2, 5, "stored", seed=3)
    resumed.fit((x, y), epochs=2, checkpoint=path, checkpoint_every=5, resume=True)
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_cpu_budget_is_kept_to_within_ten_percent():
    torch.set_num_threads(1)
    x, y = make_data(3, 4, 400)
    trainer = new_trainer(1, 20, "recompute")  # many small updates in each call
    started = time.process_time()
    history = trainer.fit((x, y), budget="cpu:0.6", segment_length=100)
    used = time.process_time() - started  # measured apart from the meter, around the whole fit
    assert history.stopped_by == "cpu:0.6"
    assert 0.54 <= history.epochs[-1]["train_cpu"] <= 0.66
    assert 0.54 <= used <= 0.66 + 0.1  # the fit's own overhead on top of training


def test_epochs_and_budgets_combine_as_documented():
    x, y = make_data(0, 2, 20)
    trainer = new_trainer(5, 5, "recompute")
    assert len(trainer.fit((x, y), budget="epochs:3").epochs) == 3
    assert len(trainer.fit((x, y)).epochs) == 1  # no epochs and no budget: one epoch
    capped = trainer.fit((x, y), epochs=2, budget="backward:10000")
    assert len(capped.epochs) == 2 and capped.stopped_by == ""  # the epochs ran out first
    with pytest.raises(tbptt.InvalidArgument, match="epochs must be left out or 3 with budget epochs:3"):
        trainer.fit((x, y), epochs=2, budget="epochs:3")


def test_train_on_stops_where_its_budget_says_and_train_pending_finishes_the_call():
    x, y = make_data(4, 2, 30)
    straight = new_trainer(2, 4, "stored")
    straight.train_on(x, y, end_of_stream=True)
    trainer = new_trainer(2, 4, "stored")
    trainer.budget = BudgetMeter([Budget("backward", 20)], lambda: trainer.engine.backward_steps)
    trainer.budget.start()
    first = trainer.train_on(x, y, end_of_stream=True)
    assert len(first) == 5 and trainer.pending  # 5 updates of 4 backward steps each
    with pytest.raises(ValueError, match="ended .* with updates still pending"):
        trainer.train_on(x, y)
    trainer.budget = None
    rest = trainer.train_pending(max_updates=3)
    assert len(rest) == 3 and trainer.pending
    rest += trainer.train_pending()
    assert not trainer.pending and trainer.position == 0  # the streams ended
    assert len(first) + len(rest) == straight.updates_applied
    for a, b in zip(straight.model.state_dict().values(), trainer.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("budget", [None, "epochs:2", "backward:100000"])
def test_training_cpu_is_counted_whatever_the_budget(budget):
    """Every run counts its training CPU time (what equal-cost comparisons and the answer read),
    not only runs whose budget is CPU time: an epochs budget once recorded 0 s."""
    torch.set_num_threads(1)
    x, y = make_data(3, 4, 200)
    trainer = new_trainer(2, 8, "recompute")
    started = time.process_time()
    history = trainer.fit((x, y), epochs=None if budget else 2, budget=budget, segment_length=50)
    used = time.process_time() - started
    spent = [e["train_cpu"] for e in history.epochs]
    assert 0 < spent[0] < spent[-1] <= used  # cumulative, and no more than the whole fit took
