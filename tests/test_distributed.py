"""Data-parallel training on torch.distributed: two gloo ranks on loopback against one process.

The ranks run once for the whole module (process start-up is most of the cost): they train every
configuration, checkpoint, resume, and finally rank 1 dies, all written to files the tests read.
"""

import os
import re
import shutil
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from _models import make_data, make_model, mse_steps
from _ranks import free_port, run_ranks

import tbptt
from tbptt import distributed as tdist
from tbptt.engine import StreamEngine

CONFIGS = [(4, 4, "recompute"), (4, 4, "stored"), (3, 8, "recompute"), (3, 8, "stored")]
# schedules that draw or choose their windows: every rank must give every update the same one
VARIABLE = {"artbp": (tbptt.ARTBP(3, 6), "recompute"),
            "adaptive": (tbptt.AdaptiveTBPTT(3, max_k2=12, every=2), "recompute"),
            "adaptive stored": (tbptt.AdaptiveTBPTT(2, max_k2=20, every=2), "stored")}
ROWS, STEPS, WORLD = 4, 26, 2
TIMEOUT = 20.0  # the process group's: a collective waits at most this long for a rank


class Kill(Exception):
    pass


class Die:
    def on_update(self, trainer, record):
        if record.stop > 6:
            raise RuntimeError("rank 1 fails on purpose")


class KillAfter:
    """Stops the run after ``after`` updates, once the checkpoint on disk was taken mid-block."""

    def __init__(self, after, path, k1):
        self.after, self.path, self.k1, self.seen = after, path, k1, 0

    def on_update(self, trainer, record):
        self.seen += 1
        if self.seen > self.after and os.path.exists(self.path):
            if tbptt.checkpoint.load(self.path)["engine"]["position"] % self.k1 != 0:
                raise Kill()


def data():
    """B=4 rows: different valid counts per row, rank 1's rows all masked on steps 9..17 (it has
    updates with no valid step), resets at different steps in each rank's rows."""
    x, y = make_data(3, ROWS, STEPS)
    mask = torch.ones(ROWS, STEPS, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, 15:] = False
    mask[2:, 9:18] = False
    mask[3, ::3] = False
    resets = torch.zeros(ROWS, STEPS, dtype=torch.bool)
    resets[1, 7] = True
    resets[2, 13] = True
    resets[3, 20] = True
    return tbptt.data.Split(x, y, mask, resets)


def new_trainer(k1, k2, strategy, cls=tbptt.Trainer, schedule=None):
    model = make_model("lstm", 0)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    return cls(model, mse_steps, opt, schedule or tbptt.TBPTT(k1, k2), strategy=strategy, clip_grad_norm=0.5)


def train(k1, k2, strategy, cls=tbptt.Trainer, schedule=None, **options):
    trainer = new_trainer(k1, k2, strategy, cls, schedule)
    split = data() if cls is tbptt.Trainer else trainer.shard(data())
    history = trainer.fit(split, epochs=2, segment_length=5, progress=False, keep_updates=True, **options)
    return trainer, history


def train_variable(schedule, strategy, cls=tbptt.Trainer, seed=100):
    """As ``train``, torch seeded with ``seed`` once the model is made: ARTBP's generator is seeded
    from it, so ranks given different seeds must still share rank 0's draws."""
    model = make_model("lstm", 0)
    torch.manual_seed(seed)
    trainer = cls(model, mse_steps, torch.optim.Adam(model.parameters(), lr=0.02), schedule, strategy=strategy,
                  clip_grad_norm=0.5)
    split = data() if cls is tbptt.Trainer else trainer.shard(data())
    return trainer, trainer.fit(split, epochs=2, segment_length=5, progress=False, keep_updates=True)


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def ranks(rank, port, out):
    """One rank of the job the tests read: every configuration, checkpoint and resume, a death."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT))
    result = {"writes": 0}
    write = tbptt.checkpoint.save

    def counted(*args):
        result["writes"] += 1
        return write(*args)

    tbptt.checkpoint.save = counted
    for k1, k2, strategy in CONFIGS:
        trainer, history = train(k1, k2, strategy, tdist.DistributedTrainer, log=f"{out}/log{rank}.jsonl")
        result[(k1, k2, strategy)] = (weights(trainer), [r.loss for r in history.updates])
    for name, (schedule, strategy) in VARIABLE.items():
        trainer, history = train_variable(schedule, strategy, tdist.DistributedTrainer, seed=100 + rank)
        result[name] = (weights(trainer), [(r.start, r.k2, r.loss) for r in history.updates])
    # one update by hand: 1 valid step on rank 0, 3 on rank 1; rank 0 has no gradient for the
    # head's bias, nobody has one for its weight
    trainer = new_trainer(4, 4, "recompute", tdist.DistributedTrainer)
    grads = {n: torch.full_like(p, rank + 1.0) for n, p in trainer.engine.named_parameters()}
    grads["head.weight"] = None
    if rank == 0:
        grads["head.bias"] = None
    update = tbptt.Update(0, 0, 4)
    count = torch.tensor(1.0 + 2 * rank)
    reduced = trainer.reduce(tbptt.UpdateResult(update, torch.tensor(0.5 + rank, dtype=torch.float64), grads, count))
    result["reduced"] = ({n: None if g is None else g.clone() for n, g in reduced.grads.items()},
                         float(reduced.loss), float(reduced.valid_steps))
    # uninterrupted, killed past a mid-block checkpoint, resumed; and resumed from one process's checkpoint
    options = dict(checkpoint=f"{out}/whole.pt", checkpoint_every=2)
    result["whole"] = weights(train(3, 8, "stored", tdist.DistributedTrainer, **options)[0])
    try:
        train(3, 8, "stored", tdist.DistributedTrainer, checkpoint=f"{out}/run.pt", checkpoint_every=2,
              callbacks=[KillAfter(5, f"{out}/run.pt", 3)])
    except Kill:
        pass
    dist.barrier()
    if rank == 0:
        shutil.copy(f"{out}/run.pt", f"{out}/killed.pt")
    dist.barrier()
    trainer, _ = train(3, 8, "stored", tdist.DistributedTrainer, checkpoint=f"{out}/run.pt", resume=True,
                       checkpoint_every=2)
    trainer.check_consistency()
    result["resumed"] = weights(trainer)
    trainer, _ = train(3, 8, "stored", tdist.DistributedTrainer, checkpoint=f"{out}/single.pt", resume=True)
    result["resumed from one process"] = weights(trainer)
    # rank 1 drifts: the check names the parameter
    if rank == 1:
        with torch.no_grad():
            trainer.model.head.bias.add_(1e-9)
    try:
        trainer.check_consistency()
    except tdist.DistributedError as exc:
        result["drift"] = str(exc)
    # a callback stops rank 1 after its first epoch: rank 0 stops there too, in step, no waiting
    class StopRankOne:
        def on_epoch_end(self, trainer, info):
            return rank == 1 and info["epoch"] == 1

    trainer = new_trainer(4, 4, "recompute", tdist.DistributedTrainer)
    history = trainer.fit(trainer.shard(data()), epochs=3, segment_length=5, progress=False,
                          callbacks=[StopRankOne()])
    result["stopped"] = (len(history.epochs), history.stopped_by)
    # rank 1's budget runs out first, inside a call: both ranks stop before the same update
    trainer = new_trainer(3, 8, "recompute", tdist.DistributedTrainer)
    history = trainer.fit(trainer.shard(data()), budget="backward:1000" if rank == 0 else "backward:60",
                          progress=False)
    result["budget"] = (weights(trainer), trainer.updates_applied, history.stopped_by)
    # ranks that build different models or optimizers are told at construction, naming what differs
    for name, (hidden, lr) in {"hidden": (5 + rank, 0.01), "lr": (5, 0.01 * (1 + rank))}.items():
        torch.manual_seed(0)
        model = tbptt.RecurrentNet(3, hidden, 2).double()
        try:
            tdist.DistributedTrainer(model, mse_steps, torch.optim.Adam(model.parameters(), lr=lr), tbptt.TBPTT(4, 4))
            result[name] = "no error"
        except tdist.DistributedError as exc:
            result[name] = str(exc)
    # one rank's learning rate changed after construction: the weights drift apart, the check stops both
    trainer = new_trainer(4, 4, "recompute", lambda *a, **k: tdist.DistributedTrainer(*a, check_every=2, **k))
    if rank == 1:
        trainer.optimizer.param_groups[0]["lr"] = 0.05
    try:
        trainer.fit(trainer.shard(data()), epochs=1, segment_length=5, progress=False)
        result["drift check"] = ("no error", trainer.updates_applied)
    except tdist.DistributedError as exc:
        result["drift check"] = (str(exc), trainer.updates_applied)
    # rank 1 stalls past a group's timeout: rank 0 stops with an error instead of waiting
    short = dist.new_group([0, 1], timeout=timedelta(seconds=2))
    if rank == 1:
        time.sleep(4)
    started = time.perf_counter()
    try:
        new_trainer(4, 4, "recompute", lambda *a, **k: tdist.DistributedTrainer(*a, group=short, **k))
        result["stall"] = ("no error", 0.0)
    except tdist.DistributedError as exc:
        result["stall"] = (str(exc), time.perf_counter() - started)
    torch.save(result, f"{out}/rank{rank}.pt")
    # rank 1 dies mid-training; rank 0 must stop with an error, not wait
    trainer = new_trainer(3, 8, "stored", tdist.DistributedTrainer)
    callbacks = [Die()] if rank == 1 else []
    started = time.perf_counter()
    try:
        trainer.fit(trainer.shard(data()), epochs=50, segment_length=5, progress=False, callbacks=callbacks)
        message = "no error"
    except tdist.DistributedError as exc:
        message = str(exc)
    torch.save({"error": message, "seconds": time.perf_counter() - started}, f"{out}/failure.pt")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    # one process's run killed past a mid-block checkpoint, for the ranks to resume
    try:
        train(3, 8, "stored", checkpoint=out / "single.pt", checkpoint_every=2,
              callbacks=[KillAfter(5, out / "single.pt", 3)])
    except Kill:
        pass
    return out, run_ranks(ranks, (free_port(), str(out)), WORLD, 150, "spawn")


def results(job, rank=0):
    return torch.load(job[0] / f"rank{rank}.pt", weights_only=False)


@pytest.mark.parametrize("k1,k2,strategy", CONFIGS)
def test_two_ranks_with_half_the_rows_each_reach_the_weights_of_one_process_with_all(job, k1, k2, strategy):
    trainer, history = train(k1, k2, strategy)
    alone = weights(trainer)
    for rank in range(WORLD):
        got, losses = results(job, rank)[(k1, k2, strategy)]
        for name in alone:
            torch.testing.assert_close(got[name], alone[name], rtol=0, atol=1e-10)
        assert losses == pytest.approx([r.loss for r in history.updates], rel=1e-10)
    skipped = [r for r in history.updates if r.skipped]
    assert not skipped, "no update of this data is empty on both ranks"


@pytest.mark.parametrize("name", list(VARIABLE))
def test_ranks_draw_and_choose_the_windows_one_process_does(job, name):
    """ARTBP's L and AdaptiveTBPTT's k2 are the same on both ranks for every update, and those of one
    process with all rows (masks and resets included): the draws start from rank 0's generator (the
    ranks' own were seeded differently), the measurements are summed over the ranks' rows."""
    schedule, strategy = VARIABLE[name]
    trainer, history = train_variable(schedule, strategy)
    alone = weights(trainer)
    windows = [(r.start, r.k2) for r in history.updates]
    assert len({k2 for _, k2 in windows}) > 1
    for rank in range(WORLD):
        got, updates = results(job, rank)[name]
        assert [(start, k2) for start, k2, _ in updates] == windows
        assert [loss for _, _, loss in updates] == pytest.approx([r.loss for r in history.updates], rel=1e-10)
        for key in alone:
            torch.testing.assert_close(got[key], alone[key], rtol=0, atol=1e-10)


def test_an_update_is_weighted_by_valid_steps_and_missing_gradients_count_as_zeros(job):
    for rank in range(WORLD):
        grads, loss, count = results(job, rank)["reduced"]
        assert count == 4 and loss == (1 * 0.5 + 3 * 1.5) / 4
        assert grads["head.weight"] is None
        assert torch.equal(grads["head.bias"], torch.full((2,), (1 * 0.0 + 3 * 2.0) / 4, dtype=torch.float64))
        assert torch.equal(grads["lstm.weight_hh_l0"], torch.full((20, 5), (1 * 1.0 + 3 * 2.0) / 4, dtype=torch.float64))


def test_ranks_stay_in_sync_across_a_checkpoint_and_resume(job):
    zero, one = results(job, 0), results(job, 1)
    for name in zero["whole"]:
        assert torch.equal(zero["resumed"][name], one["resumed"][name])
        assert torch.equal(zero["resumed"][name], zero["whole"][name])


def test_only_rank_zero_writes_checkpoints_and_logs(job):
    assert results(job, 0)["writes"] > 3 and results(job, 1)["writes"] == 0
    assert (job[0] / "log0.jsonl").exists() and not (job[0] / "log1.jsonl").exists()


def test_checkpoints_move_between_one_process_and_two_ranks(job):
    out = job[0]
    whole = results(job)["whole"]
    # the ranks resumed a one-process checkpoint ...
    for name in whole:
        torch.testing.assert_close(results(job)["resumed from one process"][name], whole[name], rtol=0, atol=1e-10)
    # ... and one process resumes the ranks' checkpoint, which holds all rows
    saved = tbptt.checkpoint.load(out / "killed.pt")
    assert saved["engine"]["batch_size"] == ROWS and saved["world_size"] == WORLD
    shutil.copy(out / "killed.pt", out / "again.pt")
    trainer, _ = train(3, 8, "stored", checkpoint=out / "again.pt", resume=True)
    for name, value in weights(trainer).items():
        torch.testing.assert_close(value, whole[name], rtol=0, atol=1e-10)


def test_the_consistency_check_names_what_drifted(job):
    assert "rank 1 holds a different 'head.bias'" in results(job)["drift"]


def test_a_rank_that_stalls_past_the_timeout_stops_the_others_with_a_clear_error(job):
    message, seconds = results(job, 0)["stall"]
    assert "comparing the ranks' settings failed" in message and "within the timeout" in message
    assert seconds < 4


def test_a_rank_that_dies_stops_the_job_with_a_clear_error(job):
    out, exitcodes = job
    failure = torch.load(out / "failure.pt", weights_only=False)
    assert exitcodes[1] != 0 and exitcodes[0] == 0
    assert "another rank has probably stopped or died" in failure["error"]
    assert failure["seconds"] < TIMEOUT + 5


# ----------------------------------------------------------------------------------------------
# Stream states of all rows and the ranks' shares (no process group needed)
def engines(k1, k2, strategy, model, steps):
    split = data()
    whole = StreamEngine(model, mse_steps, tbptt.TBPTT(k1, k2), strategy)
    shares = [StreamEngine(model, mse_steps, tbptt.TBPTT(k1, k2), strategy) for _ in range(WORLD)]
    for engine, part in [(whole, split)] + [(e, split.rows(r, WORLD)) for r, e in enumerate(shares)]:
        for a, b in [(0, 4), (4, 9), (9, steps)]:  # calls that end mid-block
            list(engine.feed(part.inputs[:, a:b], part.targets[:, a:b], part.mask[:, a:b], resets=part.resets[:, a:b]))
    return split, whole, shares


def rest(engine, split, steps):
    grads = [r.grads for r in engine.feed(split.inputs[:, steps:], split.targets[:, steps:], split.mask[:, steps:],
                                          end_of_stream=True, resets=split.resets[:, steps:])]
    return [torch.cat([g[n].reshape(-1) for n in sorted(g)]) for g in grads]


@pytest.mark.parametrize("k1,k2,strategy", [(3, 8, "stored"), (3, 8, "recompute"), (4, 4, "recompute")])
def test_merged_and_split_stream_states_continue_as_the_originals(k1, k2, strategy):
    steps = 22  # inside a block; the reset of row 3 (rank 1) at step 20 is still reachable
    model = make_model("lstm", 0)
    split, whole, shares = engines(k1, k2, strategy, model, steps)
    merged = tdist.merge_streams([e.state_dict() for e in shares], model)
    assert merged["batch_size"] == ROWS and merged["reset_positions"] == [20]
    if strategy == "stored":
        assert [s["start"] for s in merged["segments"]] == [s["start"] for s in whole.state_dict()["segments"]]
    resumed = StreamEngine(model, mse_steps, tbptt.TBPTT(k1, k2), strategy)
    resumed.load_state_dict(merged)
    for a, b in zip(rest(resumed, split, steps), rest(whole, split, steps), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    _, whole, shares = engines(k1, k2, strategy, model, steps)
    for r, share in enumerate(shares):
        part = StreamEngine(model, mse_steps, tbptt.TBPTT(k1, k2), strategy)
        part.load_state_dict(tdist.shard_streams(whole.state_dict(), r, WORLD))
        for a, b in zip(rest(part, split.rows(r, WORLD), steps), rest(share, split.rows(r, WORLD), steps), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_stream_states_that_cannot_be_split_say_why():
    model = make_model("lstm", 0)
    _, whole, _ = engines(4, 4, "recompute", model, 22)
    with pytest.raises(ValueError, match="4 streams, which 3 ranks cannot share evenly"):
        tdist.shard_streams(whole.state_dict(), 0, 3)
    saved = whole.state_dict()
    square = {**saved, "states": {saved["previous"]: torch.zeros(4, 4, 5)}}
    with pytest.raises(ValueError, match="ambiguous"):
        tdist.shard_streams(square, 0, 2)


def test_a_trainer_needs_a_process_group_and_torchrun_env(monkeypatch):
    for key in tdist.TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(tdist.DistributedError, match="missing RANK, WORLD_SIZE.*torchrun --nproc_per_node"):
        tdist.init_from_env()
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        tdist.init_from_env(timeout=0)
    with pytest.raises(tdist.DistributedError, match="needs an initialised process group"):
        new_trainer(4, 4, "recompute", tdist.DistributedTrainer)


def test_a_budget_spent_on_one_rank_stops_both_at_the_same_update(job):
    single = new_trainer(3, 8, "recompute")
    single.fit(data(), budget="backward:60", progress=False)
    zero, one = results(job, 0)["budget"], results(job, 1)["budget"]
    assert zero[1] == one[1] == single.updates_applied
    assert (zero[2], one[2]) == ("another process", "backward:60")
    for name, w in single.model.state_dict().items():
        torch.testing.assert_close(zero[0][name], w, rtol=1e-10, atol=1e-12)
        assert torch.equal(zero[0][name], one[0][name])


def test_ranks_that_build_different_models_or_optimizers_are_told_at_construction(job):
    for rank in range(WORLD):
        hidden, lr = results(job, rank)["hidden"], results(job, rank)["lr"]
        assert re.search(r"ranks disagree on parameter rnn\.weight_ih_l0: 'shape \(20, 3\), torch.float64' on "
                         r"rank 0; 'shape \(24, 3\), torch.float64' on rank 1", hidden), hidden
        assert "ranks disagree on optimizer group 0 lr: 0.01 on rank 0; 0.02 on rank 1" in lr, lr


def test_weights_that_drift_apart_stop_the_run_within_check_every_updates(job):
    for rank in range(WORLD):
        message, applied = results(job, rank)["drift check"]
        assert "rank 1 holds a different 'lstm.weight_ih_l0' than rank 0" in message and applied == 2


def test_a_rank_that_stops_stops_them_all_at_the_same_epoch(job):
    assert results(job, 1)["stopped"] == (1, "callback")
    assert results(job, 0)["stopped"] == (1, "another process")
