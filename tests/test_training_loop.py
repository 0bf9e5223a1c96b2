import pytest
import torch

from sd_distill.params import TrainParams
from sd_distill.training.loop import CheckpointMismatch, TrainingDiverged, checkpoints, train

X = torch.linspace(-1, 1, 256).unsqueeze(1)
Y = torch.sin(3 * X)


def toy_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def batch_fn(step, micro, gen):
    idx = torch.randint(0, len(X), (16,), generator=gen)
    return X[idx], Y[idx]


def mse(model, batch, gen):
    x, y = batch
    noise = 0.01 * torch.randn(y.shape, generator=gen)  # randomness in the loss must replay on resume too
    return torch.nn.functional.mse_loss(model(x), y + noise), {}


PARAMS = TrainParams(steps=12, batch_size=16, grad_accum=2, learning_rate=1e-2, warmup_steps=2,
                     ema_decay=0.9, checkpoint_every=4, keep_checkpoints=2, log_every=4)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_after_crash_gives_same_weights_as_uninterrupted_run(tmp_path):
    straight = train(toy_model(), mse, batch_fn, PARAMS, tmp_path / "a", seed=7)

    calls = {"n": 0}

    def crashing(model, batch, gen):
        calls["n"] += 1
        if calls["n"] == 2 * 9 + 1:  # first micro-batch of step 10, after the checkpoint at step 8
            raise RuntimeError("simulated crash")
        return mse(model, batch, gen)

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(toy_model(), crashing, batch_fn, PARAMS, tmp_path / "b", seed=7)
    assert [p.name for p in checkpoints(tmp_path / "b")] == ["step-0000004", "step-0000008"]

    resumed = train(toy_model(), mse, batch_fn, PARAMS, tmp_path / "b", seed=7, resume=True)
    assert resumed.resumed_from == 8
    a, b = weights(straight.model), weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.losses == straight.losses


def test_other_seed_gives_other_weights(tmp_path):
    a = train(toy_model(), mse, batch_fn, PARAMS, tmp_path / "a", seed=1)
    b = train(toy_model(), mse, batch_fn, PARAMS, tmp_path / "b", seed=2)
    assert not torch.equal(a.model[0].weight, b.model[0].weight)


def test_loss_goes_down_on_a_learnable_task(tmp_path):
    p = PARAMS.model_copy(update={"steps": 150, "checkpoint_every": 1000, "ema_decay": 0.0})
    result = train(toy_model(), mse, batch_fn, p, tmp_path, seed=0)
    assert sum(result.losses[-10:]) / 10 < 0.4 * sum(result.losses[:10]) / 10


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def nan_at_step_7(model, batch, gen):
        loss, extra = mse(model, batch, gen)
        return (loss * float("nan") if nan_at_step_7.step >= 6 else loss), extra

    nan_at_step_7.step = 0

    def counting_batches(step, micro, gen):
        nan_at_step_7.step = step
        return batch_fn(step, micro, gen)

    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 7 .*step-0000004"):
        train(toy_model(), nan_at_step_7, counting_batches, PARAMS, tmp_path, seed=0)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-0000004"]
    resumed = train(toy_model(), mse, batch_fn, PARAMS, tmp_path, seed=0, resume=True)
    assert resumed.resumed_from == 4


def test_resume_refuses_checkpoint_from_other_params(tmp_path):
    train(toy_model(), mse, batch_fn, PARAMS, tmp_path, seed=0)
    other = PARAMS.model_copy(update={"learning_rate": 5e-3})
    with pytest.raises(CheckpointMismatch, match="other training params"):
        train(toy_model(), mse, batch_fn, other, tmp_path, seed=0, resume=True)


def test_fresh_run_clears_old_checkpoints(tmp_path):
    train(toy_model(), mse, batch_fn, PARAMS, tmp_path, seed=0)
    (tmp_path / "step-0000099").mkdir()
    train(toy_model(), mse, batch_fn, PARAMS.model_copy(update={"steps": 4}), tmp_path, seed=0)
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000004"]
