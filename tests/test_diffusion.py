import math

import pytest
import torch
from diffusers import DDIMScheduler

from sd_distill import diffusion
from sd_distill.diffusion import Schedule, ddim_step, halving_target, to_x_eps
from sd_distill.stages.halve import student_timesteps, teacher_path


def toy_schedule():
    # alphas_cumprod 0.9, 0.5, 0.1 at t = 0, 1, 2 ; final (t < 0) = 1
    return Schedule(torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64), 1.0)


def test_two_teacher_ddim_steps_give_reference_target():
    """Hand-computed (Salimans & Ho 2022, Algorithm 2): z_t = 1 at t = 2, a teacher that always says v = 0.5,
    two DDIM steps 2 -> 1 -> 0, then the v one student step 2 -> 0 must predict."""
    sched = toy_schedule()
    z, t, mid, s = torch.ones(1, 1, 1, 1), torch.tensor([2]), torch.tensor([1]), torch.tensor([0])
    v = torch.full_like(z, 0.5)
    z_mid = ddim_step(z, v, t, mid, sched)
    z_s = ddim_step(z_mid, v, mid, s, sched)
    assert z_mid.item() == pytest.approx(0.670820, abs=1e-5)  # sqrt(.5) * (x + eps), x = -0.158114, eps = 1.106797
    assert z_s.item() == pytest.approx(0.376393, abs=1e-5)
    target = halving_target(z, t, z_s, s, sched)
    assert target.item() == pytest.approx(0.279507, abs=1e-5)
    # and one student DDIM step with that v lands exactly where the teacher's two steps did
    assert ddim_step(z, target, t, s, sched).item() == pytest.approx(z_s.item(), abs=1e-6)


def test_target_lands_on_teacher_for_random_inputs_on_the_real_schedule():
    sched_obj = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    sched = Schedule.from_scheduler(sched_obj)
    g = torch.Generator().manual_seed(0)
    z, v1, v2 = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([999, 749, 499, 249])
    mid, s = t - 125, t - 250
    z_s = ddim_step(ddim_step(z, v1, t, mid, sched), v2, mid, s, sched)
    target = halving_target(z, t, z_s, s, sched)
    assert torch.allclose(ddim_step(z, target, t, s, sched), z_s, atol=1e-4)


def test_ddim_step_matches_diffusers_ddim_scheduler():
    sched_obj = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction", rescale_betas_zero_snr=True,
                              timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
    sched = Schedule.from_scheduler(sched_obj)
    sched_obj.set_timesteps(4)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 8, 8, generator=g)
    for t in sched_obj.timesteps:
        v = torch.randn(z.shape, generator=g)
        ours = ddim_step(z, v, t.repeat(2), (t - 250).repeat(2), sched)
        theirs = sched_obj.step(v, t, z).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-5)
        z = theirs


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_prediction_type_conversions_round_trip(kind):
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    alpha, sigma = torch.tensor(0.6).view(1, 1, 1, 1), torch.tensor(0.8).view(1, 1, 1, 1)
    z = alpha * x + sigma * eps
    x2, eps2 = to_x_eps(diffusion.target(x, eps, alpha, sigma, kind), z, alpha, sigma, kind)
    assert torch.allclose(x2, x, atol=1e-5) and torch.allclose(eps2, eps, atol=1e-5)


def test_cfg_wrapper_mixes_cond_and_uncond_in_one_call():
    calls = []

    def D(z, t, cond, w):
        calls.append(len(z))
        return cond.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(z)

    z = torch.zeros(2, 1, 2, 2)
    cond, uncond = torch.full((2, 3, 4), 3.0), torch.full((2, 3, 4), 1.0)
    out = diffusion.cfg(D)(z, torch.tensor([5, 5]), (cond, uncond), torch.tensor([0.0, 6.5]))
    assert calls == [4]
    assert out[0].flatten()[0].item() == pytest.approx(3.0)
    assert out[1].flatten()[0].item() == pytest.approx(7.5 * 3 - 6.5 * 1)


def test_guidance_embedding_is_the_pipelines():
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([0.0, 6.5])
    ours = diffusion.guidance_embedding(w, 16)
    theirs = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=16)
    assert torch.equal(ours, theirs) and ours.shape == (2, 16)
    assert not torch.equal(ours[0], ours[1])


def test_teacher_path_spans_one_student_step():
    T = 1000
    t = torch.tensor([999])
    assert [int(x) for x in teacher_path(t, 32, 64, T)] == [984, 999 - 31]
    direct = teacher_path(t, 1, 64, T)
    assert len(direct) == 64 and int(direct[0]) == 984 and int(direct[-1]) == -1


def test_student_grid_is_what_the_stock_scheduler_visits():
    sched = DDIMScheduler(timestep_spacing="trailing", prediction_type="v_prediction")
    assert student_timesteps(sched, 1).tolist() == [999]
    assert student_timesteps(sched, 4).tolist() == [999, 749, 499, 249]
    assert math.isclose(float(Schedule.from_scheduler(sched).alpha_sigma(torch.tensor([-1]))[1]), 0.0, abs_tol=1e-6)
