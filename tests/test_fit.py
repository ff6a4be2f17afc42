"""fit: epochs, validation, early stopping, logs, checkpoints that survive kills and crashes."""

import csv
import json
from typing import NamedTuple

import pytest
import torch
from _models import make_data, make_model, mse_steps
from test_trainer import SavedBytes

import tbptt
from tbptt import checkpoint as ckpt


class Kill(Exception):
    pass


class KillMidBlock:
    """Kills the run past its first updates, once the last checkpoint on disk fell mid-block."""

    def __init__(self, after, path, k1):
        self.after, self.path, self.k1, self.seen = after, path, k1, 0

    def on_update(self, trainer, record):
        self.seen += 1
        if self.seen > self.after and self.path.exists():
            if ckpt.load(self.path)["engine"]["position"] % self.k1 != 0:
                raise Kill()


def new_trainer(k1, k2, strategy, seed=0):
    model = make_model("lstm", seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    return tbptt.Trainer(model, mse_steps, opt, tbptt.TBPTT(k1, k2), strategy=strategy), sched


class Dropout(torch.nn.Module):
    """An LSTM with dropout on its inputs and outputs: inside the recurrence, so a resume must
    replay stored activations with the random draws they first had."""

    def __init__(self):
        super().__init__()
        self.inner = make_model("lstm", 0)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x, state):
        out, state = self.inner(self.drop(x), state)
        return self.drop(out), state


@pytest.mark.parametrize("k1,k2,strategy,errors", [(5, 5, "recompute", "new"), (3, 8, "recompute", "new"),
                                                   (3, 8, "stored", "new"), (3, 8, "stored", "window"),
                                                   (7, 2, "stored", "new")])
def test_resume_after_a_kill_mid_block_equals_an_uninterrupted_run(tmp_path, k1, k2, strategy, errors):
    x, y = make_data(1, 3, 60)
    data = (x, y)
    options = dict(epochs=3, valid=data, segment_length=k1 + 1, keep_updates=True)  # most calls end mid-block

    def run(kill_at=None, resume=False, path=tmp_path / "run.pt"):
        torch.manual_seed(5)
        model = Dropout().double()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        trainer = tbptt.Trainer(model, mse_steps, opt, tbptt.TBPTT(k1, k2, errors), strategy=strategy)
        callbacks = [KillMidBlock(kill_at, path, k1)] if kill_at else []
        history = trainer.fit(data, scheduler=sched, callbacks=callbacks, checkpoint=path,
                              checkpoint_every=2, resume=resume, **options)
        return model, history

    whole, h_whole = run(path=tmp_path / "whole.pt")
    n_updates = len(h_whole.updates)
    with pytest.raises(Kill):
        run(kill_at=n_updates // 2 + 1)
    assert ckpt.load(tmp_path / "run.pt")["engine"]["chunks"], "the open block travels in the checkpoint"
    resumed, h_resumed = run(resume=True)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert [r.loss for r in h_whole.updates] == [r.loss for r in h_resumed.updates]
    assert [e["valid_loss"] for e in h_whole.epochs] == [e["valid_loss"] for e in h_resumed.epochs]


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    trainer, _ = new_trainer(4, 4, "recompute")
    x, y = make_data(0, 2, 20)
    trainer.fit((x, y), epochs=1, checkpoint=path)
    good = ckpt.load(path)

    def crash(obj, f, *a, **k):
        f.write(b"partial bytes of a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit((x, y), epochs=1, checkpoint=path)
    monkeypatch.undo()
    again = ckpt.load(path)
    assert torch.equal(again["model"]["lstm.weight_hh_l0"], good["model"]["lstm.weight_hh_l0"])
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_corrupt_and_mismatched_checkpoints_say_what_is_wrong(tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(b"\x00not a checkpoint")
    trainer, _ = new_trainer(4, 4, "recompute")
    x, y = make_data(0, 2, 12)
    with pytest.raises(ckpt.CheckpointError, match="not a readable checkpoint.*truncated or corrupt"):
        trainer.fit((x, y), checkpoint=path, resume=True)
    trainer.fit((x, y), checkpoint=path)
    net = tbptt.RecurrentNet(3, 7, 2).double()
    other = tbptt.Trainer(net, mse_steps, torch.optim.SGD(net.parameters(), lr=0.1), tbptt.TBPTT(4, 4))
    with pytest.raises(ckpt.CheckpointError, match="does not fit this model"):
        other.fit((x, y), checkpoint=path, resume=True)
    wrong, _ = new_trainer(2, 6, "recompute")
    with pytest.raises(ckpt.CheckpointError, match="schedule 'TBPTT\\(4,4\\)'"):
        wrong.fit((x, y), checkpoint=path, resume=True)
    torch.save({"hello": 1}, path)
    with pytest.raises(ckpt.CheckpointError, match="not a tbptt checkpoint"):
        ckpt.load(path)


def test_non_finite_weights_are_never_saved(tmp_path):
    model = make_model("lstm", 0)
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match="non-finite"):
        ckpt.save({"model": model.state_dict()}, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()


def test_early_stopping_logs_and_best_weights(tmp_path):
    trainer, _ = new_trainer(5, 5, "recompute")
    x, y = make_data(0, 2, 30)
    vx, vy = make_data(9, 2, 30)
    y = y * 0  # train toward zero while validation wants noise: validation loss gets worse
    history = trainer.fit((x, y), epochs=30, valid=(vx, vy), patience=2, restore_best=True,
                          log=tmp_path / "log.jsonl")
    assert history.stopped_early and history.stopped_by == "patience"
    assert len(history.epochs) < 30
    lines = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == list(range(1, len(history.epochs) + 1))
    best = min(e["valid_loss"] for e in history.epochs)
    assert history.epochs[history.best_epoch - 1]["valid_loss"] == best
    assert trainer.evaluate((vx, vy))["loss"] == pytest.approx(best, rel=1e-12)
    history.write(tmp_path / "log.csv")
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert float(rows[0]["valid_loss"]) == pytest.approx(history.epochs[0]["valid_loss"])


def test_callbacks_scheduler_and_metric():
    trainer, sched = new_trainer(5, 5, "recompute")
    x, y = make_data(0, 2, 20)
    seen = []

    class Stop:
        def on_update(self, trainer, record):
            seen.append(record.stop)

        def on_epoch_end(self, trainer, info):
            return info["epoch"] == 2

    history = trainer.fit((x, y), epochs=5, valid=(x, y), scheduler=sched, callbacks=[Stop()],
                          metric=lambda o, t, m: float((o - t).abs().mean()))
    assert len(history.epochs) == 2 and history.stopped_by == "callback"
    assert seen == [5, 10, 15, 20] * 2
    assert history.epochs[1]["lr"] == pytest.approx(0.01 * 0.7)
    assert history.epochs[0]["valid_metric"] > 0


def test_evaluate_keeps_no_graph_and_leaves_training_streams_alone():
    trainer, _ = new_trainer(4, 4, "recompute")
    x, y = make_data(0, 2, 10)
    trainer.train_on(x[:, :6], y[:, :6])
    position, state = trainer.position, trainer.state
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        result = trainer.evaluate((x, y), segment_length=3)
    assert counter.peak == 0
    assert trainer.position == position and trainer.state is state
    assert result["loss"] > 0


def test_a_diverging_run_stops_and_says_so():
    model = make_model("lstm", 0)
    trainer = tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=1e6), tbptt.TBPTT(2, 2))
    x, y = make_data(0, 2, 40)
    history = trainer.fit((x, y * 1e3), epochs=10, valid=(x, y))
    assert history.diverged and history.stopped_by == "diverged"
    assert len(history.epochs) < 10


def test_fit_rejects_bad_options():
    trainer, _ = new_trainer(4, 4, "recompute")
    x, y = make_data(0, 2, 10)
    with pytest.raises(ValueError, match="epochs"):
        trainer.fit((x, y), epochs=0)
    with pytest.raises(ValueError, match="resume must be given together with checkpoint"):
        trainer.fit((x, y), resume=True)
    with pytest.raises(TypeError, match="must have .inputs and .targets"):
        trainer.fit(x)
    with pytest.raises(ValueError, match="segment_length"):
        trainer.fit((x, y), segment_length=0)


def test_a_run_stopped_by_its_time_budget_resumes_inside_the_epoch(tmp_path):
    x, y = make_data(2, 2, 40)

    def run(**options):
        torch.manual_seed(1)
        trainer, _ = new_trainer(3, 6, "stored")
        history = trainer.fit((x, y), epochs=2, valid=(x, y), segment_length=4, keep_updates=True, **options)
        return trainer, history

    whole, h_whole = run()
    _, h_none = run(max_seconds=0.0)  # spent before the first update: nothing is trained
    assert h_none.stopped_by == "max_seconds" and not h_none.updates and not h_none.epochs
    # wherever a clock stops it (here: somewhere in the first epoch, at most), the run resumes exactly
    _, h_cut = run(max_seconds=1e-3, checkpoint=tmp_path / "c.pt")
    assert h_cut.stopped_by == "max_seconds" and h_cut.epochs[-1]["partial"]
    resumed, h_resumed = run(checkpoint=tmp_path / "c.pt", resume=True)
    assert len(h_resumed.updates) == len(h_whole.updates)
    assert [e["epoch"] for e in h_resumed.epochs] == [1, 2] and not any(e.get("partial") for e in h_resumed.epochs)
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_on_data_cut_differently_is_refused(tmp_path):
    trainer, _ = new_trainer(4, 4, "recompute")
    x, y = make_data(0, 2, 24)
    trainer.fit((x, y), segment_length=5, checkpoint=tmp_path / "c.pt")
    with pytest.raises(ckpt.CheckpointError, match="segment_length 5 and this run has 7"):
        trainer.fit((x, y), segment_length=7, checkpoint=tmp_path / "c.pt", resume=True)
    with pytest.raises(ckpt.CheckpointError, match=r"steps 24 and this run has 20"):
        trainer.fit((x[:, :20], y[:, :20]), segment_length=5, checkpoint=tmp_path / "c.pt", resume=True)


def test_weights_made_non_finite_by_the_optimizer_end_the_run_as_diverged(tmp_path):
    model = make_model("lstm", 0)
    trainer = tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=1e308), tbptt.TBPTT(2, 2))
    x, y = make_data(0, 2, 20)
    history = trainer.fit((x, y), epochs=3, segment_length=2, checkpoint=tmp_path / "c.pt", checkpoint_every=1)
    assert history.diverged and history.stopped_by == "diverged"
    assert not (tmp_path / "c.pt").exists() or ckpt.finite(ckpt.load(tmp_path / "c.pt")["model"])


class Carry(NamedTuple):
    h: torch.Tensor
    c: torch.Tensor


class CarryModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = make_model("lstm", 0)

    def forward(self, x, state):
        out, (h, c) = self.inner(x, None if state is None else (state.h, state.c))
        return out, Carry(h, c)


def test_a_named_tuple_state_is_saved_and_loads_once_allowed(tmp_path):
    model = CarryModel()
    trainer = tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=0.1), tbptt.TBPTT(3, 3))
    x, y = make_data(0, 2, 20)
    trainer.train_on(x[:, :4], y[:, :4])
    ckpt.save(trainer.state_dict(), tmp_path / "c.pt")
    with pytest.raises(ckpt.CheckpointError, match="add_safe_globals"):
        ckpt.load(tmp_path / "c.pt")
    torch.serialization.add_safe_globals([Carry])
    again = CarryModel()
    other = tbptt.Trainer(again, mse_steps, torch.optim.SGD(again.parameters(), lr=0.1), tbptt.TBPTT(3, 3))
    other.load_state_dict(ckpt.load(tmp_path / "c.pt"))
    assert isinstance(other.engine._states[3], Carry) and other.position == 4
