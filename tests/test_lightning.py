"""tbptt.lightning: TBPTT(k1, k2) inside Lightning 2.x, checked against tbptt.Trainer fed the same segments.

The two-process DDP job runs once for the module (forked, gloo on loopback) and writes what the
tests read; everything else runs in this process on tiny models and short streams.
"""

import csv
import datetime
import os
import time
import warnings
from pathlib import Path

import lightning  # the [lightning] extra, which CI installs: a missing install fails here, never skips
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

import tbptt
from tbptt.lightning import TBPTTModule, segments
from tbptt.validate import InvalidArgument
from _models import make_data, make_model, mse_steps
from _ranks import free_port, run_ranks
from test_fit import Dropout
from _model_loops import one_thread

ROWS, STEPS, LENGTH = 4, 23, 5
QUIET = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, logger=False,
             enable_checkpointing=False)
pytestmark = [
    # Lightning's notes on a tiny run (few workers, few batches, no pre-optimisation state for
    # ModelCheckpoint under manual optimization) are not what these tests are about
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec"),  # Lightning 2.6 on torch 2.13's pytree
]


_threads = pytest.fixture(autouse=True)(one_thread)  # tiny models: one thread


def data(seed=3, rows=ROWS, steps=STEPS):
    """Rows with different valid counts and resets at different steps (a row masked from step 9 to 17)."""
    x, y = make_data(seed, rows, steps)
    mask = torch.ones(rows, steps, dtype=torch.bool)
    mask[0, :2] = False
    mask[rows - 1, 9:18] = False
    mask[1, ::4] = False
    resets = torch.zeros(rows, steps, dtype=torch.bool)
    resets[1, 7] = True
    resets[rows - 1, 13] = True
    return tbptt.data.Split(x, y, mask, resets)


def adam(params):
    return torch.optim.Adam(params, lr=0.02)


def module(k1=3, k2=8, strategy="recompute", model=None, schedule=None, **options):
    model = make_model("lstm", 0) if model is None else model
    return TBPTTModule(model, mse_steps, optimizer=adam, schedule=schedule or tbptt.TBPTT(k1, k2), strategy=strategy,
                       **options)


def reference(k1=3, k2=8, strategy="recompute", model=None, schedule=None, **options):
    model = make_model("lstm", 0) if model is None else model
    return tbptt.Trainer(model, mse_steps, adam(model.parameters()), schedule or tbptt.TBPTT(k1, k2),
                         strategy=strategy, **options)


def fit(m, train, valid=None, ckpt_path=None, **trainer_options):
    trainer = lightning.Trainer(**{"max_epochs": 2, **QUIET, **trainer_options})
    trainer.fit(m, train_dataloaders=train, val_dataloaders=valid, ckpt_path=ckpt_path)
    return trainer


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b, tol=1e-12):
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)


# ----------------------------------------------------------------------------------------------
def test_segments_are_consecutive_in_order_and_the_last_ends_the_streams():
    split = data()
    loader = segments(split, segment_length=LENGTH)
    batches = list(loader)
    assert len(loader) == len(batches) == 5
    assert [b.start for b in batches] == [0, 5, 10, 15, 20]
    assert [b.end_of_stream for b in batches] == [False] * 4 + [True]
    assert torch.equal(torch.cat([b.inputs for b in batches], 1), split.inputs)
    assert torch.equal(torch.cat([b.resets for b in batches], 1), split.resets)
    same = segments(split.inputs, split.targets, LENGTH, split.mask, split.resets)
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(batches, same))
    whole = list(segments((split.inputs, split.targets)))
    assert len(whole) == 1 and whole[0].mask is None and whole[0].end_of_stream


def test_the_loader_resumes_at_the_segment_its_state_says():
    loader = segments(data(), segment_length=LENGTH)
    it = iter(loader)
    next(it), next(it)
    saved = loader.state_dict()
    other = segments(data(), segment_length=LENGTH)
    other.load_state_dict(saved)
    assert [b.start for b in other] == [10, 15, 20]
    assert [b.start for b in other] == [0, 5, 10, 15, 20]  # the pass after starts afresh
    with pytest.raises(ValueError, match="segments of 5; this loader cuts 4 streams of 23 steps into segments of 4"):
        segments(data(), segment_length=4).load_state_dict(saved)


def test_segments_reject_bad_arguments():
    split = data()
    with pytest.raises(InvalidArgument, match="segment_length must be a positive int .* got 0"):
        segments(split, segment_length=0)
    with pytest.raises(TypeError, match="needs the targets"):
        segments(split.inputs, segment_length=5)
    with pytest.raises(ValueError, match="takes the mask and resets from the split"):
        segments(split, segment_length=5, mask=split.mask)
    with pytest.raises(ValueError, match=r"Split.targets \[B, T\]"):
        segments(split.inputs, split.targets[:, :3], 5)


# ----------------------------------------------------------------------------------------------
VARIABLE = {"artbp": (tbptt.ARTBP(3, 6), "recompute"),
            "adaptive stored": (tbptt.AdaptiveTBPTT(2, max_k2=20, every=2), "stored")}
"""Schedules that draw or choose their windows."""


@pytest.mark.parametrize("k1,k2,schedule,strategy", [
    *[(k1, k2, None, strategy) for k1, k2 in [(4, 4), (3, 8)] for strategy in ("recompute", "stored")],
    *[(None, None, name, strategy) for name, (_, strategy) in VARIABLE.items()]])
def test_a_lightning_fit_makes_the_updates_of_the_trainer_fed_the_same_segments(k1, k2, schedule, strategy):
    schedule = None if schedule is None else VARIABLE[schedule][0]
    split = data()
    m = module(k1, k2, strategy, clip_grad_norm=0.5, schedule=schedule)
    trainer = fit(m, segments(split, segment_length=LENGTH))
    ref = reference(k1, k2, strategy, clip_grad_norm=0.5, schedule=schedule)
    records = []
    for _ in range(2):
        for a in range(0, STEPS, LENGTH):
            b = min(a + LENGTH, STEPS)
            records += ref.train_on(split.inputs[:, a:b], split.targets[:, a:b], split.mask[:, a:b],
                                    end_of_stream=b == STEPS, resets=split.resets[:, a:b])
    assert_same_weights(weights(m.model), weights(ref.model))
    assert [(r.start, r.loss_start, r.stop, r.skipped, r.k2) for r in m.records] == [
        (r.start, r.loss_start, r.stop, r.skipped, r.k2) for r in records]
    torch.testing.assert_close(torch.tensor([r.loss for r in m.records]), torch.tensor([r.loss for r in records]))
    assert trainer.global_step == m.updates_applied == ref.updates_applied
    assert m.engine.position == 0  # each epoch ended its streams


def test_non_finite_updates_are_skipped_counted_and_logged_as_the_trainer_does():
    split = data()
    targets = split.targets.clone()
    targets[2, 7] = float("nan")  # a valid step: the updates injecting it are non-finite
    split = tbptt.data.Split(split.inputs, targets, split.mask, split.resets)
    m = module(3, 8, "stored")
    trainer = fit(m, segments(split, segment_length=LENGTH), max_epochs=1)
    ref = reference(3, 8, "stored")
    history = ref.fit(split, epochs=1, segment_length=LENGTH, progress=False, keep_updates=True)
    assert m.updates_skipped == ref.updates_skipped == history.epochs[0]["skipped"] == 1
    assert [r.reason for r in m.records] == [r.reason for r in history.updates]
    assert_same_weights(weights(m.model), weights(ref.model))
    assert trainer.callback_metrics["skipped_epoch"] == 1
    assert trainer.callback_metrics["updates_epoch"] == len(history.updates)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    with pytest.raises(tbptt.NonFiniteError, match="non-finite loss at stream step 9"):
        fit(module(3, 8, nonfinite="raise"), segments(split, segment_length=LENGTH), max_epochs=1)


def test_a_subclass_overrides_forward_and_loss_and_validation_carries_state_without_a_graph():
    seen = []

    class Module(TBPTTModule):
        def __init__(self):
            super().__init__(optimizer=adam, schedule=tbptt.TBPTT(3, 8))
            self.net = make_model("lstm", 0)

        def forward(self, inputs, state=None):
            if not self.training:
                seen.append((torch.is_grad_enabled(), state is not None))
            return self.net(inputs, state)

        def step_losses(self, outputs, targets):
            return (outputs - targets).abs().mean(-1)

    split, valid = data(), data(seed=5)
    m = Module()
    trainer = fit(m, segments(split, segment_length=LENGTH), segments(valid, segment_length=4), max_epochs=1,
                  num_sanity_val_steps=0)
    loss_fn = lambda o, t: (o - t).abs().mean(-1)  # noqa: E731
    ref = tbptt.Trainer(m.net, loss_fn, adam(m.net.parameters()), tbptt.TBPTT(3, 8))  # the trained weights
    carried = ref.evaluate(valid, segment_length=4)["loss"]
    pieces = [ref.evaluate(piece) for piece in valid.segments(4)]  # each from a fresh state
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(carried, rel=1e-6)
    assert abs(carried - sum(p["loss"] for p in pieces) / len(pieces)) > 1e-3  # a reset state would differ
    assert seen and all(not grad for grad, _ in seen)
    assert [s for _, s in seen] == [False] + [True] * (len(seen) - 1)  # the state goes on segment after segment


class GradientSeen(Callback):
    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append(float(tbptt.safestep.total_norm([p.grad for p in pl_module.parameters()])))


def test_logged_values_reach_the_csv_logger_and_hooks_see_each_update(tmp_path):
    split = data()
    m = module(5, 5, clip_grad_norm=0.5)  # one update per segment: each logged step is one update
    seen = GradientSeen()
    fit(m, segments(split, segment_length=LENGTH), segments(data(seed=5), segment_length=LENGTH),
        **{**QUIET, "logger": CSVLogger(tmp_path, name="run"), "log_every_n_steps": 1}, callbacks=[seen])
    assert seen.norms == pytest.approx([min(r.grad_norm, 0.5) for r in m.records], rel=1e-5)  # clipped
    (path,) = tmp_path.glob("run/*/metrics.csv")
    rows = list(csv.DictReader(path.open()))
    steps = [r for r in rows if r["train_loss"]]
    epochs = [r for r in rows if r["train_loss_epoch"]]
    assert [float(r["train_loss"]) for r in steps] == pytest.approx([r.loss for r in m.records], rel=1e-6)
    assert [float(r["grad_norm"]) for r in steps] == pytest.approx([r.grad_norm for r in m.records], rel=1e-6)
    assert [float(r["updates"]) for r in steps] == list(range(1, len(m.records) + 1))
    assert [float(r["skipped"]) for r in steps] == [0.0] * len(m.records)
    assert len(epochs) == 2 and [float(r["updates_epoch"]) for r in epochs] == [5, 5]
    first = [r.loss for r in m.records[:5]]
    assert float(epochs[0]["train_loss_epoch"]) == pytest.approx(sum(first) / 5, rel=1e-6)
    assert float(epochs[0]["grad_norm_max_epoch"]) == pytest.approx(max(r.grad_norm for r in m.records[:5]), rel=1e-6)
    assert float(epochs[0]["skipped_epoch"]) == 0
    assert len([r for r in rows if r["val_loss"]]) == 2


@pytest.mark.parametrize("interval", ["epoch", "update", "plateau"])
def test_lr_schedulers_step_per_epoch_or_per_update_as_the_trainer_steps_them(interval):
    makers = {"epoch": lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5),
              "update": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda n: 0.9 ** n),
              "plateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0)}
    split, valid = data(), data(seed=5)
    every = "update" if interval == "update" else "epoch"
    m = module(3, 8, scheduler=makers[interval], scheduler_interval=every)
    trainer = fit(m, segments(split, segment_length=LENGTH), segments(valid, segment_length=LENGTH), max_epochs=3)
    ref = reference(3, 8)
    scheduler = makers[interval](ref.optimizer)
    # fit steps a per-update scheduler after each train_on call: calls of one step put it right
    # after each update, as the module does (the updates do not depend on how the streams are cut)
    ref.fit(split, epochs=3, valid=valid, segment_length=1 if every == "update" else LENGTH, scheduler=scheduler,
            scheduler_interval=every, progress=False)
    assert trainer.optimizers[0].param_groups[0]["lr"] == ref.optimizer.param_groups[0]["lr"] < 0.02
    assert_same_weights(weights(m.model), weights(ref.model))


def test_lightnings_gradient_clipping_setting_clips_each_update():
    split = data()
    m = module(3, 8)
    trainer = fit(m, segments(split, segment_length=LENGTH), gradient_clip_val=0.3)
    ref = reference(3, 8, clip_grad_norm=0.3)
    ref.fit(split, epochs=2, segment_length=LENGTH, progress=False)
    assert_same_weights(weights(m.model), weights(ref.model))
    assert max(r.grad_norm for r in m.records) > 0.3  # clipping had work to do
    assert trainer.gradient_clip_val == 0.3  # lent to the module for the fit, given back


def test_early_stopping_and_model_checkpoint_watch_the_validation_loss(tmp_path):
    split, valid = data(), data(seed=5)
    m = module(3, 8)
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    stop = EarlyStopping(monitor="val_loss", stopping_threshold=1e9)  # stops at the first validation
    trainer = fit(m, segments(split, segment_length=LENGTH), segments(valid, segment_length=LENGTH),
                  **{**QUIET, "enable_checkpointing": True}, max_epochs=4, callbacks=[best, stop])
    assert trainer.current_epoch == 1 and stop.stopped_epoch == 0
    assert best.best_model_score == trainer.callback_metrics["val_loss"]
    saved = torch.load(best.best_model_path, weights_only=False)
    assert saved["tbptt"]["engine"]["position"] == 0 and saved["tbptt"]["trainer"]["updates_applied"] == 8
    again = module(3, 8)
    result = lightning.Trainer(**QUIET).validate(again, segments(valid, segment_length=LENGTH),
                                                 ckpt_path=best.best_model_path, verbose=False)
    assert result[0]["val_loss"] == pytest.approx(best.best_model_score.item(), rel=1e-6)
    fit(again, segments(split, segment_length=LENGTH), max_epochs=1)  # no ckpt_path: fresh streams and counts
    assert again.updates_applied == 8 and again.engine.position == 0


def test_max_steps_stops_at_the_end_of_the_segment_that_reaches_it():
    split = data()
    m = module(3, 8)
    trainer = fit(m, segments(split, segment_length=LENGTH), max_epochs=-1, max_steps=4)
    # segments of 5 steps hold updates at 3 | 6, 9 | 12, 15: the fourth update falls in the third
    assert trainer.global_step == m.updates_applied == 5 and m.engine.position == 15
    ref = reference(3, 8)
    for a in range(0, 15, LENGTH):
        ref.train_on(split.inputs[:, a:a + 5], split.targets[:, a:a + 5], split.mask[:, a:a + 5],
                     resets=split.resets[:, a:a + 5])
    assert_same_weights(weights(m.model), weights(ref.model))


def test_max_time_stops_inside_the_epoch():
    class Slow(TBPTTModule):
        def training_step(self, batch, batch_idx):
            time.sleep(0.3)
            return super().training_step(batch, batch_idx)

    x, y = make_data(0, 2, 200)
    m = Slow(make_model("lstm", 0), mse_steps, optimizer=adam, schedule=tbptt.TBPTT(5, 5))
    trainer = fit(m, segments(x, y, segment_length=5), max_epochs=3, max_time=datetime.timedelta(seconds=1))
    # stopped inside the first epoch (its 40 segments of 0.3 s would take 12 s), streams left open
    assert 0 < m.engine.position < 200
    assert trainer.global_step == len(m.records) == m.engine.position // 5


# ----------------------------------------------------------------------------------------------
class Stop(Exception):
    pass


class KillAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise Stop()


def dropout_module(**options):
    torch.manual_seed(7)
    return module(3, 8, "stored", model=Dropout(), clip_grad_norm=0.5,
                  scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5), **options)


@pytest.mark.parametrize("where", ["epoch boundary", "mid-epoch", "last segment"])
def test_a_resumed_fit_is_bit_exact(tmp_path, where):
    """Stored strategy, dropout, masks, resets, a scheduler, validation: killed after a checkpoint
    (at an epoch's end, inside an epoch, or after an epoch's last segment, before its validation),
    resumed with ckpt_path, it ends with the weights and optimizer of an uninterrupted fit."""
    split, valid = data(), data(seed=5)
    loaders = lambda: (segments(split, segment_length=LENGTH), segments(valid, segment_length=LENGTH))  # noqa: E731
    torch.manual_seed(1)
    whole = dropout_module()
    fit(whole, *loaders(), max_epochs=3)
    checkpoints = {"epoch boundary": ModelCheckpoint(dirpath=tmp_path, save_top_k=-1),
                   "mid-epoch": ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1),
                   "last segment": ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1)}
    torch.manual_seed(1)
    killed = dropout_module()
    with pytest.raises(Stop):
        fit(killed, *loaders(), **{**QUIET, "enable_checkpointing": True}, max_epochs=3,
            callbacks=[checkpoints[where], KillAt(13)])
    (path,) = tmp_path.glob("*.ckpt")  # at step 8 (after epoch 0's last segment, or its end) or 5
    saved = torch.load(path, weights_only=False)["tbptt"]["engine"]
    assert (saved["position"] > 0) == (where == "mid-epoch")
    torch.manual_seed(12345)  # the checkpoint's generators, not these, go on
    resumed = dropout_module()
    trainer = fit(resumed, *loaders(), max_epochs=3, ckpt_path=path)
    for key, value in weights(whole.model).items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert trainer.optimizers[0].param_groups[0]["lr"] == whole.trainer.optimizers[0].param_groups[0]["lr"]
    assert [r.loss for r in resumed.records] == [r.loss for r in whole.records[-len(resumed.records):]]


def test_resume_with_another_schedule_or_a_foreign_checkpoint_says_what_is_wrong(tmp_path):
    split = data()
    m = module(3, 8)
    fit(m, segments(split, segment_length=LENGTH), **{**QUIET, "enable_checkpointing": True},
        max_epochs=1, default_root_dir=tmp_path)
    (path,) = tmp_path.glob("**/*.ckpt")
    with pytest.raises(tbptt.CheckpointError, match=r"schedule 'TBPTT\(3,8\)', this engine uses 'TBPTT\(4,8\)'; resume with the same schedule"):
        fit(module(4, 8), segments(split, segment_length=LENGTH), max_epochs=2, ckpt_path=path)
    with pytest.raises(tbptt.CheckpointError, match="not written by a TBPTTModule"):
        module().on_load_checkpoint({"state_dict": {}})


# ----------------------------------------------------------------------------------------------
class Listed(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pieces(split, rows=None):
    rows = [ROWS] * 5 if rows is None else rows
    return Listed([(split.inputs[:r, a:a + LENGTH], split.targets[:r, a:a + LENGTH])
                   for r, a in zip(rows, range(0, STEPS, LENGTH))])


def test_a_dataloader_of_segment_tuples_trains_as_segments_do():
    split = data()
    plain = tbptt.data.Split(split.inputs, split.targets)
    m = module(3, 8)
    fit(m, DataLoader(pieces(plain), batch_size=None))
    same = module(3, 8)
    fit(same, segments(plain, segment_length=LENGTH))
    assert_same_weights(weights(m.model), weights(same.model), tol=0)


class LightningOneStyle(lightning.pytorch.LightningModule):
    """What Lightning 1.x did with truncated_bptt_steps=k, written with 2.x manual optimization:
    each batch of B sequences cut into chunks of k, one step per chunk, the state carried detached
    from chunk to chunk and fresh at each batch."""

    def __init__(self, k):
        super().__init__()
        self.automatic_optimization = False
        self.net, self.k = make_model("lstm", 0), k

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer, hiddens = self.optimizers(), None
        for a in range(0, x.shape[1], self.k):
            out, hiddens = self.net(x[:, a:a + self.k], hiddens)
            optimizer.zero_grad()
            self.manual_backward(mse_steps(out, y[:, a:a + self.k]).mean())
            optimizer.step()
            hiddens = tuple(h.detach() for h in hiddens)

    def configure_optimizers(self):
        return adam(self.parameters())


def test_the_migration_from_truncated_bptt_steps_makes_the_same_updates():
    x, y = make_data(4, 8, 10)  # 8 sequences of 10 steps, batches of 4, truncated_bptt_steps=5
    old = LightningOneStyle(5)
    fit(old, DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4))
    new = module(5, 5)
    fit(new, segments(tbptt.data.packed_streams(list(x), list(y), batch_size=4), segment_length=5))
    assert_same_weights(weights(old.net), weights(new.model))


class Automatic(TBPTTModule):
    def __init__(self):
        super().__init__(make_model("lstm", 0), mse_steps, optimizer=adam, schedule=tbptt.TBPTT(3, 8))
        self.automatic_optimization = True


@pytest.mark.parametrize("case,match", [
    ("automatic", "Automatic sets automatic_optimization=True, but TBPTTModule applies each TBPTT update itself"),
    ("shuffle", r"the train_dataloaders loader shuffles \(RandomSampler\), but each segment continues"),
    ("sampler", r"the train_dataloaders loader shuffles \(RandomSampler\)"),
    ("distributed", "has a DistributedSampler .* deals segments, steps in time, out to the ranks"),
    ("valid shuffle", r"the val_dataloaders loader shuffles"),
    ("batch size", "segment 2 holds 3 streams but this epoch's streams are 4: each segment must continue the same rows"),
    ("accumulate", r"Trainer\(accumulate_grad_batches=2\) cannot apply to TBPTT: .* raise k1"),
    ("clip by value", r"gradient_clip_algorithm='value'.*use gradient_clip_algorithm='norm'"),
    ("clip twice", r"clip_grad_norm=0.5 and Trainer\(gradient_clip_val=0.2\) disagree"),
    ("scaler", r"Trainer\(precision='16-mixed'\) scales the loss with a GradScaler"),
    ("no len", "the train loader has no len"),
])
def test_bad_setups_are_refused_with_what_to_do(case, match):
    split = data()
    plain = tbptt.data.Split(split.inputs, split.targets)
    train, valid, options, m = segments(split, segment_length=LENGTH), None, {}, module(3, 8)
    if case == "automatic":
        m = Automatic()
    elif case == "shuffle":
        train = DataLoader(pieces(plain), batch_size=None, shuffle=True)
    elif case == "sampler":
        train = DataLoader(pieces(plain), batch_size=None, sampler=RandomSampler(pieces(plain)))
    elif case == "distributed":
        train = DataLoader(pieces(plain), batch_size=None,
                           sampler=DistributedSampler(pieces(plain), num_replicas=2, rank=0, shuffle=False))
    elif case == "valid shuffle":
        valid = DataLoader(pieces(plain), batch_size=None, shuffle=True)
    elif case == "batch size":
        train = DataLoader(pieces(plain, rows=[4, 4, 3, 3, 3]), batch_size=None)
    elif case == "accumulate":
        options = {"accumulate_grad_batches": 2}
    elif case == "clip by value":
        options = {"gradient_clip_val": 0.2, "gradient_clip_algorithm": "value"}
    elif case == "clip twice":
        m, options = module(3, 8, clip_grad_norm=0.5), {"gradient_clip_val": 0.2}
    elif case == "scaler":
        options = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    elif case == "no len":
        train = (b for b in segments(plain, segment_length=LENGTH))
    with pytest.raises(ValueError, match=match):
        fit(m, train, valid, **options)


def test_bad_arguments_to_the_module_say_what_was_expected():
    model = make_model("lstm", 0)
    with pytest.raises(TypeError, match=r"optimizer must be a function that builds it, e.g. optimizer=lambda params"):
        TBPTTModule(model, mse_steps, optimizer=adam(model.parameters()), schedule=tbptt.TBPTT(3, 8))
    with pytest.raises(TypeError, match=r"schedule must be a tbptt.TBPTT, ARTBP or AdaptiveTBPTT, e.g. schedule=tbptt.TBPTT\(5, 20\); got None"):
        TBPTTModule(model, mse_steps, optimizer=adam)
    with pytest.raises(TypeError, match="needs model="):
        TBPTTModule(None, mse_steps, optimizer=adam, schedule=tbptt.TBPTT(3, 8))
    with pytest.raises(InvalidArgument, match="clip_grad_norm must be a positive number .* got 0"):
        module(clip_grad_norm=0)
    with pytest.raises(InvalidArgument, match="scheduler_interval must be one of 'epoch', 'update'; got 'step'"):
        module(scheduler_interval="step")
    with pytest.raises(ValueError, match="strategy must be one of"):
        module(strategy="exact")
    with pytest.raises(ValueError, match="has no optimizer: pass optimizer=lambda params"):
        fit(TBPTTModule(model, mse_steps, schedule=tbptt.TBPTT(3, 8)), segments(data(), segment_length=LENGTH))


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Inside PyTorch Lightning", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # Lightning writes its checkpoints beside the script
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "600 updates, validation loss" in out
    assert float(out.rsplit(" ", 1)[1]) < 0.1  # it learnt: the signal's variance is about 0.6


# ----------------------------------------------------------------------------------------------
# two DDP ranks (CPU, gloo, loopback), forked so that they start with Lightning already imported
CONFIGS = [(4, 4, "recompute"), (3, 8, "stored")]


def ddp_rank(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", GLOO_SOCKET_IFNAME="lo")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    options = dict(accelerator="cpu", devices=2, strategy="ddp", num_sanity_val_steps=0)
    result = {}
    for k1, k2, strategy in CONFIGS:
        m = module(k1, k2, strategy, clip_grad_norm=0.5)
        trainer = fit(m, segments(data(), segment_length=LENGTH), segments(data(seed=5), segment_length=LENGTH),
                      **options)
        result[(k1, k2, strategy)] = (weights(m.model), float(trainer.callback_metrics["val_loss"]))
    for name, (schedule, strategy) in VARIABLE.items():
        m = module(strategy=strategy, clip_grad_norm=0.5, schedule=schedule)
        fit(m, segments(data(), segment_length=LENGTH), **options)
        result[name] = (weights(m.model), [(r.start, r.k2) for r in m.records])
    # killed after a checkpoint inside the second epoch, resumed by both ranks
    m = module(3, 8, "stored", clip_grad_norm=0.5)
    keep = ModelCheckpoint(dirpath=f"{out}/ckpt", every_n_train_steps=11, save_top_k=-1)
    try:
        fit(m, segments(data(), segment_length=LENGTH), **{**options, "enable_checkpointing": True},
            callbacks=[keep, KillAt(13)])
    except Stop:
        pass
    m = module(3, 8, "stored", clip_grad_norm=0.5)
    fit(m, segments(data(), segment_length=LENGTH), **options, ckpt_path=f"{out}/ckpt/epoch=1-step=11.ckpt")
    result["resumed"] = weights(m.model)
    try:
        list(segments(data(rows=3), segment_length=LENGTH))
    except ValueError as exc:
        result["uneven"] = str(exc)
    torch.save(result, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    assert run_ranks(ddp_rank, (free_port(), str(out)), 2, 120, "fork") == [0, 0]
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_two_ddp_ranks_make_the_updates_of_one_process_with_all_rows(ddp, config):
    k1, k2, strategy = config
    m = module(k1, k2, strategy, clip_grad_norm=0.5)
    trainer = fit(m, segments(data(), segment_length=LENGTH), segments(data(seed=5), segment_length=LENGTH),
                  num_sanity_val_steps=0)
    for rank in (0, 1):
        ranked, val_loss = ddp[1][rank][config]
        assert_same_weights(ranked, weights(m.model), tol=1e-10)
        assert val_loss == pytest.approx(float(trainer.callback_metrics["val_loss"]), rel=1e-6)


@pytest.mark.parametrize("name", list(VARIABLE))
def test_ddp_ranks_give_every_update_the_window_one_process_does(ddp, name):
    """ARTBP's draws from rank 0's generator, the adaptive measurements summed over the ranks."""
    schedule, strategy = VARIABLE[name]
    m = module(strategy=strategy, clip_grad_norm=0.5, schedule=schedule)
    fit(m, segments(data(), segment_length=LENGTH))
    windows = [(r.start, r.k2) for r in m.records]
    assert len({k2 for _, k2 in windows}) > 1
    for rank in (0, 1):
        ranked, their_windows = ddp[1][rank][name]
        assert their_windows == windows
        assert_same_weights(ranked, weights(m.model), tol=1e-10)


def test_ddp_ranks_stay_in_sync_across_a_checkpoint_and_resume(ddp):
    out, (zero, one) = ddp
    uninterrupted = zero[(3, 8, "stored")][0]
    for key in uninterrupted:
        assert torch.equal(zero["resumed"][key], one["resumed"][key]), key
    assert_same_weights(zero["resumed"], uninterrupted, tol=1e-12)
    saved = torch.load(out / "ckpt" / "epoch=1-step=11.ckpt", weights_only=False)["tbptt"]
    assert saved["world_size"] == 2 and saved["engine"]["batch_size"] == ROWS
    assert [e["batch_size"] for e in saved["engine_ranks"]] == [ROWS // 2] * 2
    # one process goes on from the ranks' checkpoint with all rows
    m = module(3, 8, "stored", clip_grad_norm=0.5)
    fit(m, segments(data(), segment_length=LENGTH), ckpt_path=out / "ckpt" / "epoch=1-step=11.ckpt")
    assert_same_weights(weights(m.model), uninterrupted, tol=1e-10)


def test_ddp_segments_share_rows_evenly_or_say_why_not(ddp):
    assert "holds B=3 streams, which 2 processes cannot share evenly" in ddp[1][0]["uneven"]
