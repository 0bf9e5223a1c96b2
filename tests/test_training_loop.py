import shutil

import pytest
import torch

from sd_distill.params import TrainParams
from sd_distill.training.checkpoint import CheckpointMismatch, CorruptCheckpoint, checkpoints
from sd_distill.training.loop import TrainingDiverged, train

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
        loss, _ = mse(model, batch, gen)
        return (loss * float("nan") if nan_at_step_7.step >= 6 else loss), {"mse": float(loss.detach()), "noise": 0.01}

    nan_at_step_7.step = 0

    def counting_batches(step, micro, gen):
        nan_at_step_7.step = step
        return batch_fn(step, micro, gen)

    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 7 of 12 \(micro-batch 0\); loss terms: "
                                               r"mse=0\.\d+, noise=0\.01.*step-0000004") as exc:
        train(toy_model(), nan_at_step_7, counting_batches, PARAMS, tmp_path, seed=0)
    assert exc.value.EXIT_CODE == 3
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


# -- checkpoints that cannot be half-written ----------------------------------------------------------------

def stopped_run(tmp_path):
    """A run that crashed at step 10: complete checkpoints at steps 4 and 8."""
    calls = {"n": 0}

    def crashing(model, batch, gen):
        calls["n"] += 1
        if calls["n"] == 2 * 9 + 1:
            raise RuntimeError("simulated crash")
        return mse(model, batch, gen)

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(toy_model(), crashing, batch_fn, PARAMS, tmp_path, seed=7)
    return checkpoints(tmp_path)


def test_the_completion_marker_holds_every_files_sha256(tmp_path):
    import hashlib
    import json

    last = stopped_run(tmp_path)[-1]
    marker = json.loads((last / "COMPLETE").read_text())
    assert marker["step"] == 8
    files = {str(p.relative_to(last)) for p in last.rglob("*") if p.is_file() and p.name != "COMPLETE"}
    assert set(marker["sha256"]) == files and {"rng_state.json", "loop_state.json", "ema.safetensors"} <= files
    assert not [f for f in files if f.endswith(".pkl")]  # nothing that only pickle could load
    for name, digest in marker["sha256"].items():
        assert hashlib.sha256((last / name).read_bytes()).hexdigest() == digest


def test_a_save_killed_midway_leaves_the_previous_checkpoint_to_resume_from(tmp_path):
    found = stopped_run(tmp_path)
    half = tmp_path / ".tmp-step-0000012"  # what a kill during the next save leaves: no marker, no rename
    shutil.copytree(found[-1], half)
    (half / "COMPLETE").unlink()
    (half / "model.safetensors").write_bytes(b"half-written")
    assert checkpoints(tmp_path) == found
    resumed = train(toy_model(), mse, batch_fn, PARAMS, tmp_path, seed=7, resume=True)
    assert resumed.resumed_from == 8


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "model.safetensors").write_bytes(b"flipped bits"), "model.safetensors does not match"),
    (lambda c: (c / "optimizer.bin").unlink(), "optimizer.bin is missing"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage, message):
    last = stopped_run(tmp_path)[-1]
    damage(last)
    with pytest.raises(CorruptCheckpoint, match=message):
        train(toy_model(), mse, batch_fn, PARAMS, tmp_path, seed=7, resume=True)


def test_a_checkpoint_without_rng_state_is_an_error_not_a_log_line(tmp_path):
    import json

    last = stopped_run(tmp_path)[-1]
    marker = json.loads((last / "COMPLETE").read_text())
    (last / "rng_state.json").unlink()
    del marker["sha256"]["rng_state.json"]
    (last / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(CorruptCheckpoint, match="no RNG state"):
        train(toy_model(), mse, batch_fn, PARAMS, tmp_path, seed=7, resume=True)


# -- out of memory: smaller micro-batches, same global batch ----------------------------------------------------

def plain_mse(model, batch, gen):  # no noise: the same samples give the same gradient however they are cut
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y), {}


def test_out_of_memory_cuts_micro_batches_and_keeps_the_global_batch(tmp_path, caplog):
    def fits_four(model, batch, gen):
        if len(batch[0]) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return plain_mse(model, batch, gen)

    p = PARAMS.model_copy(update={"ema_decay": 0.0})
    whole = train(toy_model(), plain_mse, batch_fn, p, tmp_path / "whole", seed=3)
    with caplog.at_level("WARNING"):
        cut = train(toy_model(), fits_four, batch_fn, p, tmp_path / "cut", seed=3)
    warnings = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 2 and "into 4 pieces of at most 4 (the global batch stays 32)" in warnings[-1]
    for a, b in zip(whole.model.parameters(), cut.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # summation order only
    assert cut.losses == pytest.approx(whole.losses, rel=1e-5)


def test_out_of_memory_at_the_floor_fails_clearly_without_a_step(tmp_path):
    from sd_distill.training.loop import OutOfMemory

    def never_fits(model, batch, gen):
        raise torch.OutOfMemoryError("CUDA out of memory")

    p = PARAMS.model_copy(update={"min_micro_batch": 4})
    with pytest.raises(OutOfMemory, match=r"out of memory at step 1 of 12 and micro-batches are already at 4 "
                                          r"samples \(train.min_micro_batch is 4\)") as exc:
        train(toy_model(), never_fits, batch_fn, p, tmp_path, seed=0)
    assert exc.value.EXIT_CODE == 3 and checkpoints(tmp_path) == []


def test_split_batch_keeps_structure_and_shares():
    from sd_distill.training.loop import split_batch

    x, cond, w = torch.arange(10.0), torch.zeros(10, 3), torch.tensor(2.0)
    pieces = split_batch((x, cond, w), 4)
    assert [len(p[0]) for p, _ in pieces] == [2, 3, 3, 2] and sum(s for _, s in pieces) == pytest.approx(1.0)
    assert torch.equal(torch.cat([p[0] for p, _ in pieces]), x) and all(p[2] is w for p, _ in pieces)
    assert [len(p["x"]) for p, _ in split_batch({"x": x}, 2)] == [5, 5]
