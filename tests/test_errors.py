"""Every bad input named in the core issue raises a clear error; non-finite updates never land."""

import pytest
import torch
from _models import make_data, make_model, mse_steps

import tbptt


def trainer_for(model=None, schedule=None, **kw):
    model = model or make_model("lstm", 0)
    return tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=0.1),
                         schedule or tbptt.TBPTT(2, 2), **kw)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="strategy.*'fast'"):
        trainer_for(strategy="fast")


def test_inputs_and_targets_disagree():
    x, y = make_data(0, 2, 6)
    with pytest.raises(ValueError, match=r"batch and time.*\(2, 6\).*\(3, 6\)"):
        trainer_for().train_on(x, torch.cat([y, y[:1]]))
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        trainer_for().train_on(x, y[:, :5])
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        trainer_for().train_on(x.numpy(), y)


def test_model_output_length_differs():
    class Drops(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make_model("lstm", 0)

        def forward(self, x, state):
            out, state = self.inner(x, state)
            return out[:, :-1], state

    x, y = make_data(0, 2, 6)
    with pytest.raises(ValueError, match="one output per input step"):
        trainer_for(Drops()).train_on(x, y)


def test_model_must_return_a_pair():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make_model("lstm", 0)

        def forward(self, x, state):
            return self.inner(x, state)[0]

    x, y = make_data(0, 2, 6)
    with pytest.raises(TypeError, match=r"\(outputs\[B, T, \.\.\.\], new_state\)"):
        trainer_for(Bare()).train_on(x, y)


@pytest.mark.parametrize("bad", [lambda o, t: ((o - t) ** 2).mean(), lambda o, t: (o - t) ** 2])
def test_loss_fn_must_return_per_step_losses(bad):
    model = make_model("lstm", 0)
    trainer = tbptt.Trainer(model, bad, torch.optim.SGD(model.parameters(), lr=0.1), tbptt.TBPTT(2, 2))
    x, y = make_data(0, 2, 6)
    with pytest.raises(ValueError, match=r"per-step losses \[B, T\]"):
        trainer.train_on(x, y)


def test_batch_size_change_between_calls():
    trainer = trainer_for(schedule=tbptt.TBPTT(4, 4))
    x, y = make_data(0, 3, 6)
    trainer.train_on(x, y)
    with pytest.raises(ValueError, match="batch size 2 but the open streams have 3"):
        trainer.train_on(x[:2], y[:2])
    trainer.reset_state()
    trainer.train_on(x[:2], y[:2])  # fresh streams may have another size


def test_state_changing_shape_is_named():
    class Grows(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2).double()

        def forward(self, x, state):
            n = 1 if state is None else state.shape[1] + 1
            return self.lin(x), torch.zeros(x.shape[0], n, dtype=x.dtype)

    x, y = make_data(0, 2, 6)
    with pytest.raises(ValueError, match="changed shape"):
        trainer_for(Grows()).train_on(x, y)


def test_bad_trainer_arguments():
    model = make_model("lstm", 0)
    with pytest.raises(TypeError, match="optimizer"):
        tbptt.Trainer(model, mse_steps, "adam", tbptt.TBPTT(2, 2))
    with pytest.raises(TypeError, match="schedule"):
        tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=1), (2, 2))
    with pytest.raises(ValueError, match="clip_grad_norm"):
        trainer_for(clip_grad_norm=-1)
    with pytest.raises(ValueError, match="nonfinite"):
        trainer_for(nonfinite="ignore")


def test_non_finite_update_is_skipped_and_recorded():
    model = make_model("lstm", 0)
    trainer = trainer_for(model, tbptt.TBPTT(3, 3))
    x, y = make_data(0, 2, 9)
    y[:, 4] = float("nan")  # poisons the second update only
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = trainer.train_on(x[:, :3], y[:, :3])
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    assert not records[0].skipped
    assert any(not torch.equal(before[k], after_first[k]) for k in before)
    records = trainer.train_on(x[:, 3:6], y[:, 3:6])
    assert records[0].skipped and "non-finite loss" in records[0].reason
    for k, v in model.state_dict().items():
        assert torch.equal(v, after_first[k]) and torch.isfinite(v).all()
    assert trainer.updates_skipped == 1


def test_non_finite_gradient_can_stop_training_naming_the_step():
    model = make_model("lstm", 0)
    trainer = trainer_for(model, tbptt.TBPTT(3, 3), nonfinite="raise")
    x, y = make_data(0, 2, 9)
    x[:, 7] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train_on(x[:, :6], y[:, :6])
    mid = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(before[k], mid[k]) for k in before)
    with pytest.raises(tbptt.NonFiniteError, match="stream step 9"):
        trainer.train_on(x[:, 6:], y[:, 6:])
    for k, v in model.state_dict().items():
        assert torch.equal(v, mid[k])


def test_clipping_bounds_the_applied_gradient():
    model = make_model("lstm", 0)
    ref = make_model("lstm", 0)
    trainer = trainer_for(model, tbptt.TBPTT(4, 4), clip_grad_norm=1e-3)
    x, y = make_data(0, 2, 4)
    (record,) = trainer.train_on(x, y)
    assert record.grad_norm > 1e-3
    step = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), ref.parameters())))
    assert step.item() == pytest.approx(0.1 * 1e-3, rel=1e-4)  # lr * clipped norm


def test_a_state_the_engine_cannot_see_into_is_named():
    from dataclasses import dataclass

    @dataclass
    class Carry:
        h: torch.Tensor

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make_model("lstm", 0)

        def forward(self, x, state):
            out, (h, c) = self.inner(x, None)
            return out, Carry(h)

    x, y = make_data(0, 2, 6)
    with pytest.raises(TypeError, match="state holds a Carry"):
        trainer_for(Model()).train_on(x, y)


def test_a_refilled_input_buffer_does_not_change_training():
    x, y = make_data(0, 2, 12)
    fresh, reused = make_model("lstm", 0), make_model("lstm", 0)
    a, b = trainer_for(fresh, tbptt.TBPTT(4, 4)), trainer_for(reused, tbptt.TBPTT(4, 4))
    bx, by = torch.empty(2, 3, 3, dtype=x.dtype), torch.empty(2, 3, 2, dtype=y.dtype)
    for t in range(0, 12, 3):
        a.train_on(x[:, t : t + 3].clone(), y[:, t : t + 3].clone())
        bx.copy_(x[:, t : t + 3])
        by.copy_(y[:, t : t + 3])
        b.train_on(bx, by)  # the same tensors, refilled: buffered steps must not change with them
    for p, q in zip(fresh.parameters(), reused.parameters()):
        assert torch.equal(p, q)


def test_checkpointing_a_stored_strategy_is_refused():
    model = make_model("lstm", 0)
    with pytest.raises(ValueError, match="strategy='recompute' to checkpoint"):
        tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=0.1), tbptt.TBPTT(2, 6),
                      strategy="stored", checkpoint_segments=2)


def test_non_finite_error_carries_the_records_applied_before_it():
    model = make_model("lstm", 0)
    trainer = trainer_for(model, tbptt.TBPTT(2, 2), nonfinite="raise")
    x, y = make_data(0, 2, 8)
    y[:, 5] = float("nan")
    with pytest.raises(tbptt.NonFiniteError) as info:
        trainer.train_on(x, y)
    assert [r.stop for r in info.value.records] == [2, 4]
