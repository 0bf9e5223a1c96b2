"""The ``dmd`` stage (DMD2): its losses at pinned values, the update schedule, the critic's shapes and gradients,
the stage's output as a stock one-step pipeline, and an exact resume."""

import copy
import json
import math
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from sd_distill import diffusion
from sd_distill.data.shards import sha256_file
from sd_distill.errors import UserError
from sd_distill.losses import Denoising, DiscriminatorGAN, DistributionMatching, GeneratorGAN
from sd_distill.models import bk
from sd_distill.models.critic import Head, check_plain_unet, deepest_geometry, encoder_features
from sd_distill.params import DMDParams, ParamsError, resolve
from sd_distill.stages.dmd import Nets, Objective, UpdateSchedule, draw

from tests.conftest import write_params

SD15_UNET = {"sample_size": 64, "block_out_channels": [320, 640, 1280, 1280]}  # runwayml/stable-diffusion-v1-5


# --------------------------------------------------------------------------- losses at pinned values
def test_distribution_matching_gradient_is_zero_when_fake_equals_real():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=gen, requires_grad=True)
    real = torch.randn(3, 4, 8, 8, generator=gen)
    loss = DistributionMatching()(x, real, real.clone())
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.count_nonzero(x.grad) == 0


def test_distribution_matching_gradient_is_dmd2s_normalised_score_difference():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True)
    real, fake = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    DistributionMatching()(x, real, fake).backward()
    scale = (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (fake - real) / (scale + 1e-6) / x.numel()  # d/dx 0.5 * MSE(x, sg(x - g)) = g / numel
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-9)


def test_gan_losses_are_log2_and_2log2_at_zero_logits():
    zero = torch.zeros(5, 1)
    assert float(GeneratorGAN()(zero)) == pytest.approx(math.log(2), abs=1e-7)
    assert float(DiscriminatorGAN()(zero, zero)) == pytest.approx(2 * math.log(2), abs=1e-7)
    # confident and right: the discriminator's loss falls toward 0, the generator's rises
    assert float(DiscriminatorGAN()(-20 * torch.ones(5, 1), 20 * torch.ones(5, 1))) < 1e-8
    assert float(GeneratorGAN()(-20 * torch.ones(5, 1))) == pytest.approx(20, abs=1e-6)


def test_denoising_is_float32_mse():
    pred = torch.ones(2, 3, dtype=torch.bfloat16)
    assert Denoising()(pred, torch.zeros(2, 3)).dtype == torch.float32
    assert float(Denoising()(pred, torch.zeros(2, 3))) == 1.0


# --------------------------------------------------------------------------- the two time-scale schedule
def test_generator_updates_exactly_on_the_intended_steps():
    schedule = UpdateSchedule(warmup=3, ratio=2)
    assert [s for s in range(10) if schedule.generator_step(s)] == [3, 5, 7, 9]
    p = DMDParams(fake_warmup=3, update_ratio=2, train={"steps": 10})
    assert p.generator_updates() == 4
    assert [s for s in range(12) if UpdateSchedule(0, 10).generator_step(s)] == [0, 10]  # DMD2 SD v1.5: step % 10


def test_a_warmup_that_leaves_no_generator_update_is_refused_by_name():
    with pytest.raises(ValueError, match="fake_warmup \\(10\\) leaves no generator update"):
        DMDParams(fake_warmup=10, train={"steps": 10})
    with pytest.raises(ParamsError, match="dmd: .*dm_t_max \\(10\\) must be >= dm_t_min"):
        resolve("no-such-params.yaml", ["dmd.dm_t_max=10", "dmd.dm_t_min=20"], profile="smoke")


# --------------------------------------------------------------------------- the critic
def small_unet(mid: bool = True, w_dim: int | None = 8) -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16),
                                layers_per_block=2, cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                time_cond_proj_dim=w_dim)
    if not mid:
        small = UNet2DConditionModel.from_config(bk.compact_config(dict(unet.config), "small"))
        bk.copy_kept_weights(small, unet, "small")
        unet = small
    return unet.eval()


@pytest.mark.parametrize("mid", [True, False], ids=["mid block", "BK-small, no mid block"])
def test_encoder_features_are_the_full_forwards_deepest_feature(mid):
    unet = small_unet(mid)
    assert (unet.mid_block is not None) == mid
    gen = torch.Generator().manual_seed(2)
    z, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 16, generator=gen)
    t, w = torch.tensor([10, 900]), torch.tensor([0.0, 3.0])
    w_emb = diffusion.guidance_embedding(w, 8)
    seen = {}
    where = unet.mid_block if mid else unet.down_blocks[-1]
    def keep(module, args, out):
        seen["h"] = out[0] if isinstance(out, tuple) else out

    hook = where.register_forward_hook(keep)
    with torch.no_grad():
        unet(z, t, encoder_hidden_states=cond, timestep_cond=w_emb)
        mine = encoder_features(unet, z, t, cond, w_emb)
    hook.remove()
    torch.testing.assert_close(mine, seen["h"], rtol=0, atol=0)
    assert tuple(mine.shape[1:]) == (16, *(2 * [deepest_geometry(unet.config)[1]]))


def test_head_gives_one_logit_per_sample_for_the_tiny_and_the_sd15_unet():
    channels, side = deepest_geometry(small_unet(False).config)
    assert (channels, side) == (16, 2)
    assert Head(channels, side)(torch.zeros(3, channels, side, side)).shape == (3, 1)
    assert deepest_geometry(SD15_UNET) == (1280, 8)  # DMD2: 1280 x 8 x 8 at 64 x 64 latents
    with torch.device("meta"):
        head = Head(1280, 8)
        assert head(torch.zeros(2, 1280, 8, 8)).shape == (2, 1)
    convs = [m for m in head.net if isinstance(m, torch.nn.Conv2d)]  # DMD2's cls_pred_branch for SD v1.5
    assert [(c.kernel_size, c.stride) for c in convs] == [((4, 4), (2, 2)), ((4, 4), (4, 4)), ((1, 1), (1, 1))]


def test_critic_refuses_sdxl_style_conditions_by_key():
    unet = small_unet()
    unet.register_to_config(addition_embed_type="text_time")
    with pytest.raises(UserError, match="addition_embed_type='text_time'"):
        check_plain_unet(unet, "dmd")


# --------------------------------------------------------------------------- one step of the objective
class Rows:
    """Latent batches from memory (the ``LatentBatches.draw`` interface)."""

    uncond = torch.zeros(5, 16)

    def draw(self, step, micro, gen):
        return torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 5, 16, generator=gen), None


def objective_and_nets(**changes):
    p = DMDParams(**{"fake_warmup": 0, "update_ratio": 1, "train": {"steps": 2}, **changes})
    schedule = diffusion.Schedule(torch.linspace(0.999, 0.01, 1000, dtype=torch.float64), 1.0)
    real = diffusion.unet_denoiser(small_unet(w_dim=None).requires_grad_(False), schedule, "v_prediction")
    nets = Nets(small_unet(), small_unet(False), Head(*deepest_geometry(small_unet(False).config)))
    return p, Objective(p, schedule, 999, -1, real, Rows.uncond), nets


def grads(module):
    return [q.grad for q in module.parameters()]


def test_the_generators_gan_gradient_does_not_train_the_critic():
    p, objective, nets = objective_and_nets(objective="gan", disc_gan_weight=0.0)
    batch = draw(Rows(), p, 1000, 0, 0, torch.Generator().manual_seed(0))
    loss, terms = objective(nets, batch, None)
    loss.backward()
    assert terms["gen_gan"] > 0 and terms["disc"] > 0
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads(nets.head))  # only 0 x disc reached it
    assert any(g is not None and torch.count_nonzero(g) for g in grads(nets.generator))


def test_fake_only_steps_leave_the_generator_without_gradients():
    p, objective, nets = objective_and_nets(fake_warmup=1, train={"steps": 3})
    objective.updates = UpdateSchedule(1, 1)
    batch = draw(Rows(), p, 1000, 0, 0, torch.Generator().manual_seed(0))
    loss, terms = objective(nets, batch, None)
    loss.backward()
    assert "dm" not in terms and "gen_gan" not in terms
    assert all(g is None for g in grads(nets.generator))  # AdamW skips them: no update, no weight decay
    for trained in (nets.fake, nets.head):
        assert any(g is not None and torch.count_nonzero(g) for g in grads(trained))


def test_pinned_objective_values_on_cpu():
    p, objective, nets = objective_and_nets()
    batch = draw(Rows(), p, 1000, 0, 0, torch.Generator().manual_seed(0))
    loss, terms = objective(copy.deepcopy(nets), batch, None)
    assert {k: round(v, 4) for k, v in terms.items() if k in ("dm", "gen_gan", "fake", "disc")} == PINNED
    assert float(loss) == pytest.approx(terms["dm"] + terms["fake"] + 1e-2 * (terms["gen_gan"] + terms["disc"]),
                                        rel=1e-6)


PINNED = {"dm": 0.2336, "gen_gan": 0.9585, "fake": 0.4302, "disc": 1.4537}  # CPU, float32, seeds above


def test_the_generator_steps_at_its_own_rate_and_the_fake_and_head_at_the_loops():
    from sd_distill.params import TrainParams
    from sd_distill.training.loop import build_optimizer

    _, _, nets = objective_and_nets()
    nets.generator_lr = 1e-6
    groups = build_optimizer(nets, TrainParams(learning_rate=1e-4), "dmd").param_groups
    assert [g["lr"] for g in groups] == [1e-6, 1e-4]
    ids = [{id(q) for q in g["params"]} for g in groups]
    assert ids[0] == {id(q) for q in nets.generator.parameters()}
    assert ids[1] == {id(q) for m in (nets.fake, nets.head) for q in m.parameters()}
    nets.generator_lr = None  # the default: one rate for all three
    assert [g["lr"] for g in build_optimizer(nets, TrainParams(learning_rate=1e-4), "dmd").param_groups] == [1e-4] * 2


# --------------------------------------------------------------------------- the stage
def test_dmd_output_is_a_stock_one_step_pipeline(smoke_project):
    out = smoke_project / "models" / "dmd"
    card = json.loads((out / "distill.json").read_text())
    assert card["num_inference_steps"] == 1 and card["method"] == "dmd2" and card["generator_updates"] == 2
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, local_files_only=True)
    steps1 = UNet2DConditionModel.from_pretrained(smoke_project / "models" / "steps-1" / "unet")
    def plain(config):
        return {k: v for k, v in config.items() if k != "_name_or_path"}

    assert plain(pipe.unet.config) == plain(steps1.config)
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    pipe("3", num_inference_steps=1, guidance_scale=4.0, output_type="np", generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, steps1.state_dict()[k])]
    assert changed  # the generator trained


def test_dmd_resumed_from_a_checkpoint_ends_with_the_uninterrupted_weights(smoke_project, tmp_path):
    from sd_distill.runner import run_stage

    root = tmp_path / "project"
    shutil.copytree(smoke_project, root)
    params = resolve(write_params(root), overrides=["dmd.train.steps=6", "dmd.train.checkpoint_every=2",
                                                    "dmd.train.keep_checkpoints=10"])
    weights = root / "models" / "dmd" / "unet" / "diffusion_pytorch_model.safetensors"
    run_stage("dmd", params, root, force=True)
    straight = sha256_file(weights)
    work = root / "checkpoints" / "dmd"
    for late in ("step-0000006", "step-0000004"):  # as if killed after step 2's checkpoint
        shutil.rmtree(work / late)
    shutil.rmtree(root / "models" / "dmd")
    run_stage("dmd", params, root, resume=True)
    assert sha256_file(weights) == straight
