"""The stages' losses as objects (``sd_distill.losses``), by hand on small tensors. The DMD2 terms are in
tests/test_dmd.py; each stage's pinned first losses (tests/test_teacher.py, test_distill.py, test_compress.py,
test_decoder.py) hold the stages to these objects bit for bit."""

import pytest
import torch

from sd_distill.losses import (BKDistillation, DecoderDistillation, Denoising, MinSNRDenoising,
                               SnapFusionDistillation, VAELoss)


def test_min_snr_denoising_weights_each_sample_by_min_snr_over_snr_plus_one_for_v():
    # alphas_cumprod 0.8 -> SNR 4, 0.5 -> SNR 1; gamma 2: v weights min(4, 2) / 5 = 0.4 and min(1, 2) / 2 = 0.5
    objective = MinSNRDenoising(torch.tensor([0.8, 0.5]), 2.0, "v_prediction")
    pred = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([[[[1.0, 1.0]]], [[[2.0, 2.0]]]])  # per-sample MSE 1 and 4
    loss, mse = objective(pred, target, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx((0.4 * 1 + 0.5 * 4) / 2)
    assert mse.item() == pytest.approx(2.5)
    unweighted, _ = MinSNRDenoising(torch.tensor([0.8, 0.5]), None, "v_prediction")(pred, target, torch.tensor([0, 1]))
    assert unweighted.item() == pytest.approx(2.5)  # gamma None: plain MSE
    eps, _ = MinSNRDenoising(torch.tensor([0.8, 0.5]), 2.0, "epsilon")(pred, target, torch.tensor([0, 1]))
    assert eps.item() == pytest.approx((0.5 * 1 + 1.0 * 4) / 2)  # epsilon: min(SNR, 2) / SNR


def test_denoising_is_float32_mse_whatever_the_inputs_dtype():
    pred = torch.full((2, 3), 1.0, dtype=torch.bfloat16)
    loss = Denoising()(pred, torch.full((2, 3), 3.0, dtype=torch.bfloat16))
    assert loss.dtype == torch.float32 and loss.item() == 4.0


class _Posterior:
    def __init__(self, kl):
        self._kl = kl

    def kl(self):
        return self._kl


def test_vae_loss_adds_the_weighted_mean_kl_to_the_reconstruction_mse():
    loss, mse, kl = VAELoss(1e-2)(torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), _Posterior(torch.tensor([2.0, 4.0])))
    assert (mse.item(), kl.item()) == (1.0, 3.0) and loss.item() == pytest.approx(1.03)


def test_bk_distillation_sums_the_three_weighted_terms_and_omits_the_task_without_its_rows():
    pred, goal = torch.zeros(2, 4), torch.ones(2, 4)  # out_kd 1
    features = [(torch.zeros(3), torch.full((3,), 2.0)), (torch.zeros(1), torch.full((1,), 3.0))]  # 4 + 9
    objective = BKDistillation(task_weight=0.5, out_kd_weight=2.0, feat_kd_weight=0.1)
    loss, terms = objective(pred, goal, features, pred[:1], torch.full((1, 4), 4.0))  # task 16
    assert {k: v.item() for k, v in terms.items()} == {"task": 16.0, "out_kd": 1.0, "feat_kd": 13.0}
    assert loss.item() == pytest.approx(0.5 * 16 + 2.0 * 1 + 0.1 * 13)
    loss, terms = objective(pred, goal, features)
    assert terms["task"].item() == 0.0 and loss.item() == pytest.approx(2.0 + 1.3)


def test_decoder_distillation_weighs_the_encoder_term():
    loss, dec, enc = DecoderDistillation(0.25)(torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2),
                                               torch.full((1, 2), 2.0))
    assert (dec.item(), enc.item()) == (1.0, 4.0) and loss.item() == pytest.approx(2.0)


def test_snapfusion_adds_l_ori_at_the_distillation_loss_size_and_keeps_its_gradient_direction():
    g = torch.Generator().manual_seed(0)
    pred, goal, data_v = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    cond = pred.clone().requires_grad_(True)
    loss, terms = SnapFusionDistillation(ori_weight=0.5)(cond, goal, cond, data_v)
    dstl, ori = ((cond - goal) ** 2).mean(), ((cond - data_v) ** 2).mean()
    assert torch.allclose(terms["dstl"], dstl) and torch.allclose(terms["ori"], ori)
    assert torch.allclose(loss, 1.5 * dstl)  # gamma * L_ori = 0.5 * L_dstl in value
    loss.backward()
    expected = 2 * (cond - goal) / cond.numel() + 0.5 * float(dstl / ori) * 2 * (cond - data_v) / cond.numel()
    assert torch.allclose(cond.grad, expected.detach(), atol=1e-7)
    off, terms = SnapFusionDistillation(ori_weight=0.0)(pred, goal, pred, data_v)
    assert torch.equal(off, Denoising()(pred, goal)) and float(terms["ori"]) == 0.0
