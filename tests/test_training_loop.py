import shutil
import sys

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


# -- memory levers: optimizer, precision, checkpointing, the memory check before step 1 ---------------------------

@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state and refuses another mixed precision in the same process (a stage
    runs in its own): reset around a test that trains under bf16."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_bf16_autocast_trains_fp32_master_weights(tmp_path, fresh_accelerator_state):
    seen = []

    def watching(model, batch, gen):
        seen.append(model(batch[0]).dtype)
        return mse(model, batch, gen)

    p = PARAMS.model_copy(update={"steps": 3})
    result = train(toy_model(), watching, batch_fn, p, tmp_path, seed=0, mixed_precision="bf16")
    assert set(seen) == {torch.bfloat16}  # the loss ran under autocast
    assert {w.dtype for w in result.model.parameters()} == {torch.float32}
    assert all(v == v for v in result.losses)


def test_8bit_adamw_without_bitsandbytes_is_a_user_error_before_anything_is_removed(tmp_path, monkeypatch):
    from sd_distill.errors import UserError

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    train(toy_model(), mse, batch_fn, PARAMS.model_copy(update={"steps": 4}), tmp_path, seed=0)
    p = PARAMS.model_copy(update={"optimizer": "adamw8bit"})
    with pytest.raises(UserError, match=r"^train: train.optimizer is 'adamw8bit', which needs bitsandbytes, and it "
                                        r"is not installed; `pip install bitsandbytes`") as err:
        train(toy_model(), mse, batch_fn, p, tmp_path, seed=0)
    assert err.value.EXIT_CODE == 2
    assert [c.name for c in checkpoints(tmp_path)] == ["step-0000004"]  # the earlier run's checkpoint is kept


def test_a_run_that_would_not_fit_the_gpu_stops_before_step_1(tmp_path, monkeypatch):
    from sd_distill.errors import UserError
    from sd_distill.training import loop

    monkeypatch.setattr(loop, "device_memory", lambda device: 10**9)  # a 1 GB "GPU"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "test GPU")
    calls = []

    def counting(model, batch, gen):
        calls.append(1)
        return mse(model, batch, gen)

    with pytest.raises(UserError, match=r"^prune: needs an estimated 2\.0 GB of GPU memory \(weights 1\.5, "
                                        r"activations 0\.5\), more than the 0\.9 GB usable of test GPU's 1\.0 GB"):
        train(toy_model(), counting, batch_fn, PARAMS, tmp_path, seed=0, name="prune",
              memory=lambda: {"weights": 15 * 10**8, "activations": 5 * 10**8})
    assert calls == [] and checkpoints(tmp_path) == []
    monkeypatch.setattr(loop, "device_memory", lambda device: None)  # not CUDA: nothing is checked
    assert train(toy_model(), mse, batch_fn, PARAMS.model_copy(update={"steps": 1}), tmp_path, seed=0,
                 memory=lambda: {"weights": 10**15}).losses


def small_unet():
    from sd_distill.models import parts
    from sd_distill.params import UnetArch

    torch.manual_seed(0)
    return parts.build_unet(UnetArch(block_out_channels=(8, 16, 16), attention_head_dim=4, norm_num_groups=8), 8, 4,
                            16)


def unet_batch(step, micro, gen):
    return (torch.randn(2, 4, 8, 8, generator=gen), torch.randint(0, 1000, (2,), generator=gen),
            torch.randn(2, 16, 16, generator=gen))


def unet_mse(model, batch, gen):
    z, t, cond = batch
    return torch.nn.functional.mse_loss(model(z, t, cond).sample, z), {}


def test_gradient_checkpointing_trains_the_same_weights_and_resumes_across_the_switch(tmp_path):
    p = PARAMS.model_copy(update={"steps": 2, "ema_decay": 0.0})
    plain = train(small_unet(), unet_mse, unet_batch, p, tmp_path / "a", seed=0)
    ckpt = p.model_copy(update={"gradient_checkpointing": True})
    recomputed = train(small_unet(), unet_mse, unet_batch, ckpt, tmp_path / "b", seed=0)
    a, b = weights(plain.model), weights(recomputed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert recomputed.losses == plain.losses and not recomputed.model.is_gradient_checkpointing
    assert ckpt.fingerprint() == p.fingerprint()  # a checkpoint made without it resumes with it


def test_gradient_checkpointing_on_a_model_without_it_is_refused(tmp_path):
    from sd_distill.errors import UserError

    with pytest.raises(UserError, match="train.gradient_checkpointing is true, but Sequential has no gradient "
                                        "checkpointing"):
        train(toy_model(), mse, batch_fn, PARAMS.model_copy(update={"gradient_checkpointing": True}), tmp_path,
              seed=0)


def test_adam_knobs_reach_the_optimizer():
    from sd_distill.training.loop import build_optimizer

    p = PARAMS.model_copy(update={"adam_beta1": 0.8, "adam_beta2": 0.9, "adam_epsilon": 1e-6, "adam_amsgrad": True,
                                  "weight_decay": 0.01})
    group = build_optimizer(toy_model(), p, "decoder").param_groups[0]
    assert (group["betas"], group["eps"], group["amsgrad"], group["weight_decay"]) == ((0.8, 0.9), 1e-6, True, 0.01)
    default = build_optimizer(toy_model(), PARAMS, "x").param_groups[0]
    reference = torch.optim.AdamW(toy_model().parameters(), lr=PARAMS.learning_rate).param_groups[0]
    keys = ("betas", "eps", "amsgrad")
    assert {k: default[k] for k in keys} == {k: reference[k] for k in keys}  # the tiny profile's optimizer as before


def test_a_halving_round_under_bf16_keeps_a_bf16_teacher_and_an_fp32_student_copied_before_the_cast(
        tmp_path, fresh_accelerator_state):
    from types import SimpleNamespace

    from sd_distill.data.latents import LatentBatches
    from sd_distill.models import parts
    from sd_distill.params import BaseParams, HalveParams, TeacherParams
    from diffusers import UNet2DConditionModel

    from sd_distill.stages import halve, vpred

    config = {k: v for k, v in small_unet().config.items() if not k.startswith("_")}
    teacher = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 8})  # w-conditioned, as halve needs
    fp32 = weights(teacher)
    scheduler = vpred.v_scheduler(parts.build_sampling_scheduler(TeacherParams()).config, False)
    gen = torch.Generator().manual_seed(0)
    posterior = torch.stack([torch.randn(4, 4, 8, 8, generator=gen), torch.full((4, 4, 8, 8), 0.1)], dim=1)
    table = torch.randn(4, 16, 16, generator=gen)
    latents = LatentBatches(4, 2, 0.18215, table[-1],
                            lambda step, micro, idx: {"posterior": posterior[idx], "cond": table[idx]})
    p = HalveParams(train=TrainParams(batch_size=2, learning_rate=1e-12, warmup_steps=0, ema_decay=0.0),
                    round_train_steps={1: 1})
    base = BaseParams(device="cpu", mixed_precision="bf16")
    pipe = halve.distill_round(SimpleNamespace(unet=teacher, scheduler=scheduler), latents, 1, 2, p, base, tmp_path)
    assert {w.dtype for w in teacher.parameters()} == {torch.bfloat16}  # the frozen teacher, cast in place
    student = weights(pipe.unet)
    assert {w.dtype for w in student.values()} == {torch.float32}
    assert all(torch.allclose(student[k], fp32[k], rtol=0, atol=1e-9) for k in fp32)  # lr 1e-12: one tiny step
    rounded = {k: v.to(torch.bfloat16).float() for k, v in fp32.items()}
    assert not all(torch.allclose(student[k], rounded[k], rtol=0, atol=1e-9) for k in fp32)  # not from bf16


def test_a_term_some_steps_lack_is_logged_as_its_mean_over_the_steps_that_had_it(tmp_path):
    """dmd's generator terms come on every update_ratio-th step only: a log every 4 steps must still carry them."""

    def numbered(step, micro, gen):  # the batch carries its step (0-d: the same in every piece)
        return (*batch_fn(step, micro, gen), torch.tensor(step))

    def sparse(model, batch, gen):
        loss, _ = mse(model, batch[:2], gen)
        return loss, ({"always": 1.0, "odd": float(batch[2])} if batch[2] % 2 else {"always": 1.0})

    logged = []
    p = PARAMS.model_copy(update={"grad_accum": 1, "log_every": 4, "ema_decay": 0.0})
    train(toy_model(), sparse, numbered, p, tmp_path, seed=7, on_metrics=lambda m, step: logged.append((step, m)))
    assert [step for step, _ in logged] == [4, 8, 12]
    assert [m["train/odd"] for _, m in logged] == [2.0, 6.0, 10.0]  # steps 1, 3 / 5, 7 / 9, 11 (0-based)
    assert all(m["train/always"] == 1.0 for _, m in logged)
