"""nsf.losses: Gram matrices, content/style/TV losses, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from nsf import losses


def _features_2x1x2() -> torch.Tensor:
    # One image, C=2 channels, H=1, W=2: F = [[1, 2], [3, 4]] once flattened.
    return torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])


def test_gram_none_is_plain_f_ft():
    g = losses.gram(_features_2x1x2(), norm="none")
    # F F^T = [[1*1 + 2*2, 1*3 + 2*4], [3*1 + 4*2, 3*3 + 4*4]]
    assert_close(g, torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]))


def test_gram_chw_divides_by_c_h_w():
    g = losses.gram(_features_2x1x2(), norm="chw")
    # C*H*W = 2*1*2 = 4
    assert_close(g, torch.tensor([[[1.25, 2.75], [2.75, 6.25]]]))


def test_gram_default_norm_is_chw():
    f = torch.randn(1, 3, 4, 5)
    assert_close(losses.gram(f), losses.gram(f, "chw"))


def test_gram_hand_values_on_a_larger_map():
    f = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2) / 10
    flat = f.reshape(2, 3, 4)
    expected = torch.stack([flat[i] @ flat[i].T for i in range(2)])
    assert_close(losses.gram(f, "none"), expected)
    assert_close(losses.gram(f, "chw"), expected / (3 * 2 * 2))


def test_batched_gram_equals_per_image_grams():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 4, 5, 6, generator=g)
    batched = losses.gram(f, "chw")
    assert batched.shape == (3, 4, 4)
    for i in range(3):
        assert_close(batched[i : i + 1], losses.gram(f[i : i + 1], "chw"))


def test_gram_is_symmetric_and_size_independent_with_chw():
    # A feature map tiled 2x2 has the same normalized Gram as the original.
    f = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    tiled = f.repeat(1, 1, 2, 2)
    g = losses.gram(f, "chw")
    assert_close(g, g.transpose(1, 2))
    assert_close(losses.gram(tiled, "chw"), g)
    assert_close(losses.gram(tiled, "none"), 4 * losses.gram(f, "none"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gram_upcasts_half_inputs_to_float32(dtype):
    f = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)).to(dtype)
    g = losses.gram(f, "chw")
    assert g.dtype == torch.float32
    # Computed in float32 from the (exactly representable) half values.
    assert_close(g, losses.gram(f.float(), "chw"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the float32-output half product is CUDA's")
def test_gram_of_half_features_on_cuda_is_float32_with_a_correct_gradient():
    f = torch.randn(2, 64, 96, 96, generator=torch.Generator().manual_seed(3)).to("cuda", torch.bfloat16)
    g = losses.gram(f.requires_grad_(True), "chw")
    ref = losses.gram(f.detach().double(), "chw")
    assert g.dtype == torch.float32
    assert float((g.double() - ref).norm() / ref.norm()) < 5e-4  # H100: 5.5e-5 (cuBLAS's float32 accumulation)
    w = torch.randn_like(ref)
    (grad,) = torch.autograd.grad((g * w).sum(), f)
    f64 = f.detach().double().requires_grad_(True)
    (grad64,) = torch.autograd.grad((losses.gram(f64, "chw") * w).sum(), f64)
    assert float((grad.double() - grad64).norm() / grad64.norm()) < 1e-2  # a bf16 gradient, as autocast's


def test_gram_keeps_float64():
    f = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    assert losses.gram(f).dtype == torch.float64


@pytest.mark.parametrize("shape", [(2, 3), (3, 4, 4), (1, 1, 2, 2, 2)])
def test_gram_rejects_non_4d(shape):
    with pytest.raises(ValueError, match="gram expects"):
        losses.gram(torch.zeros(shape))


def test_gram_rejects_unknown_norm():
    with pytest.raises(ValueError, match="'hw'"):
        losses.gram(torch.zeros(1, 2, 2, 2), norm="hw")  # type: ignore[arg-type]


def test_mse_per_image_hand_values():
    x = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])  # (2, 1, 1, 2)
    t = torch.tensor([[[[0.0, 0.0]]], [[[3.0, 1.0]]]])
    # image 0: (1 + 4) / 2 = 2.5; image 1: (9 + 1) / 2 = 5
    assert_close(losses.mse_per_image(x, t), torch.tensor([2.5, 5.0]))


def test_mse_per_image_broadcasts_a_single_target():
    x = torch.tensor([[[[1.0, 3.0]]], [[[2.0, 2.0]]]])
    t = torch.tensor([[[[1.0, 1.0]]]])
    assert_close(losses.mse_per_image(x, t), torch.tensor([2.0, 1.0]))


def test_content_loss_is_per_image_mse():
    g = torch.Generator().manual_seed(3)
    f, t = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    loss = losses.content_loss(f, t)
    assert loss.shape == (3,)
    for i in range(3):
        assert_close(loss[i], ((f[i] - t[i]) ** 2).mean())
    assert_close(losses.content_loss(t, t), torch.zeros(3))


@pytest.mark.parametrize("norm", ["chw", "none"])
def test_style_loss_is_mse_of_grams(norm):
    g = torch.Generator().manual_seed(4)
    f = torch.randn(2, 3, 4, 4, generator=g)
    target = torch.randn(1, 3, 3, generator=g)
    loss = losses.style_loss(f, target, norm)
    assert loss.shape == (2,)
    for i in range(2):
        flat = f[i].reshape(3, 16)
        gram = flat @ flat.T
        if norm == "chw":
            gram = gram / (3 * 4 * 4)
        assert_close(loss[i], ((gram - target[0]) ** 2).mean())


def test_style_loss_is_zero_at_own_gram():
    f = torch.randn(2, 3, 4, 4)
    assert_close(losses.style_loss(f, losses.gram(f)), torch.zeros(2))


def test_tv_of_checkerboard_is_two():
    i, j = torch.meshgrid(torch.arange(6), torch.arange(8), indexing="ij")
    board = ((i + j) % 2).float().expand(2, 3, 6, 8)
    assert_close(losses.tv_loss(board), torch.tensor([2.0, 2.0]))


def test_tv_of_flat_image_is_zero():
    assert_close(losses.tv_loss(torch.full((2, 3, 5, 7), 0.37)), torch.zeros(2))


def test_tv_of_horizontal_ramp():
    # Columns 0, 0.25, 0.5, 0.75, 1: every horizontal step is 0.25, every vertical step 0.
    ramp = torch.linspace(0, 1, 5).expand(1, 3, 4, 5)
    assert_close(losses.tv_loss(ramp), torch.tensor([0.25]))
    # The transposed (vertical) ramp scores the same.
    assert_close(losses.tv_loss(ramp.transpose(-1, -2)), torch.tensor([0.25]))


def test_tv_is_per_image():
    flat = torch.zeros(1, 3, 4, 4)
    i, j = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    board = ((i + j) % 2).float().expand(1, 3, 4, 4)
    assert_close(losses.tv_loss(torch.cat([flat, board])), torch.tensor([0.0, 2.0]))


def test_tv_rejects_non_4d():
    with pytest.raises(ValueError, match="tv_loss expects"):
        losses.tv_loss(torch.zeros(3, 4, 4))


def test_losses_keep_gradients():
    f = torch.randn(1, 2, 3, 3, requires_grad=True)
    (losses.style_loss(f, torch.zeros(1, 2, 2)) + losses.tv_loss(f)).sum().backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()


# --- mean and covariance (Wasserstein-2 between Gaussians) ----------------------------------------------------


def _w2_of_features(f: torch.Tensor, target: losses.Gaussian) -> torch.Tensor:
    c = f.shape[1]
    return losses.w2_gaussian(losses.feature_mean(f), losses.gram(f, "chw") * c, target)


def _target_of(f: torch.Tensor) -> losses.Gaussian:
    return losses.gaussian(losses.feature_mean(f), losses.gram(f, "chw") * f.shape[1])


def test_feature_mean_and_second_moment_by_hand():
    f = _features_2x1x2()  # channels [1, 2] and [3, 4]
    assert_close(losses.feature_mean(f), torch.tensor([[1.5, 3.5]]))
    moment = losses.gram(f, "chw") * 2  # F F^T / N
    cov = losses.covariance(losses.feature_mean(f), moment)
    assert_close(cov, torch.tensor([[[0.25, 0.25], [0.25, 0.25]]]))  # both channels: values +-0.5 about the mean


def test_w2_one_channel_is_mean_and_std_difference():
    """C = 1: W2^2 between N(m1, v1) and N(m2, v2) is (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2 (eps added to both)."""
    x = torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64).view(1, 1, 2, 2)  # mean 4, variance 5
    s = torch.tensor([0.0, 2.0, 0.0, 2.0], dtype=torch.float64).view(1, 1, 2, 2)  # mean 1, variance 1
    target = _target_of(s)
    eps = float(target.eps)
    assert eps == pytest.approx(losses.W2_EPS * 1.0 + 1e-12)
    expected = (4 - 1) ** 2 + (math.sqrt(5 + eps) - math.sqrt(1 + eps)) ** 2
    assert float(_w2_of_features(x, target)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("shape", [(2, 5, 4, 6), (1, 12, 2, 3)], ids=["more positions", "more channels"])
def test_w2_is_zero_at_the_styles_own_features(shape):
    g = torch.Generator().manual_seed(3)
    f = torch.randn(*shape, generator=g, dtype=torch.float64).relu() + 0.1  # relu-like, rank-deficient when C > N
    value = _w2_of_features(f, _target_of(f))
    scale = _w2_of_features(torch.zeros_like(f), _target_of(f))
    assert value.shape == (shape[0],)
    assert float(value.abs().max()) < 1e-10 * float(scale.min())
    # float32 features: the cross term runs in float64 all the same
    f32 = f.float()
    assert float(_w2_of_features(f32, _target_of(f32)).abs().max()) < 1e-4 * float(scale.min())


@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (1, 6, 2, 2)], ids=["more positions", "more channels"])
def test_w2_gradient_matches_float64_finite_differences(shape):
    g = torch.Generator().manual_seed(4)
    style = torch.randn(1, *shape[1:], generator=g, dtype=torch.float64) * 2 + 1
    f = torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)
    target = _target_of(style)
    # central differences of step 1e-5 agree to 3e-8 (1e-6 is roundoff-bound: the loss subtracts traces)
    assert torch.autograd.gradcheck(lambda t: _w2_of_features(t, target), (f,), eps=1e-5, atol=1e-6, rtol=1e-5)


def test_w2_is_batched_per_image():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(3, 4, 5, 5, generator=g)
    target = _target_of(torch.randn(1, 4, 6, 6, generator=g))
    batched = _w2_of_features(f, target)
    assert_close(batched, torch.cat([_w2_of_features(f[i : i + 1], target) for i in range(3)]))


# --- sliced Wasserstein ---------------------------------------------------------------------------------------


def test_directions_are_unit_vectors_and_reproducible():
    d = losses.directions(7, 5, torch.Generator().manual_seed(1))
    assert d.shape == (7, 5)
    assert_close(d.norm(dim=0), torch.ones(5))
    assert torch.equal(d, losses.directions(7, 5, torch.Generator().manual_seed(1)))
    assert not torch.equal(d, losses.directions(7, 5, torch.Generator().manual_seed(2)))


def test_sliced_loss_is_invariant_to_permuting_positions():
    g = torch.Generator().manual_seed(6)
    f = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    dirs = losses.directions(5, 5, g, dtype=torch.float64)
    target = losses.sorted_projections(torch.randn(1, 5, 6, 7, generator=g, dtype=torch.float64), dirs)
    perm = torch.randperm(42, generator=g)
    shuffled = f.flatten(2)[..., perm].reshape(f.shape)
    assert not torch.equal(shuffled, f)
    assert_close(losses.sliced_wasserstein(shuffled, dirs, target), losses.sliced_wasserstein(f, dirs, target),
                 rtol=0, atol=0)
    # a position-wise loss is not: the MSE against the same shuffled map changes
    assert float(losses.mse_per_image(shuffled, f).min()) > 0


def test_sliced_loss_is_zero_at_its_target_and_by_hand():
    f = _features_2x1x2()  # positions (1, 3) and (2, 4)
    dirs = torch.tensor([[1.0], [0.0]])  # project on channel 0: values 1, 2
    assert_close(losses.sorted_projections(f, dirs), torch.tensor([[[1.0, 2.0]]]))
    assert float(losses.sliced_wasserstein(f, dirs, torch.tensor([[[1.0, 2.0]]]))) == 0.0
    # sorted 1, 2 against 0, 4: ((1-0)^2 + (2-4)^2) / 2
    assert float(losses.sliced_wasserstein(f, dirs, torch.tensor([[[0.0, 4.0]]]))) == pytest.approx(2.5)


def test_resampled_quantiles_keep_the_ends_and_the_order():
    v = torch.tensor([[[0.0, 1.0, 3.0, 7.0]]])
    assert torch.equal(losses.resample_sorted(v, 4), v)
    up = losses.resample_sorted(v, 7)
    assert_close(up, torch.tensor([[[0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0]]]))
    down = losses.resample_sorted(v, 2)
    assert_close(down, torch.tensor([[[0.0, 7.0]]]))


# --- masked (regional) statistics ------------------------------------------------------------------------


def test_masked_gram_is_the_mask_weighted_mean_of_outer_products():
    f = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    m = torch.rand(2, 1, 6, 7, dtype=torch.float64)
    want = torch.einsum("bchw,bdhw->bcd", f * m, f) / (5 * m.sum(dim=(1, 2, 3))).view(2, 1, 1)
    assert_close(losses.masked_gram(f, m), want, rtol=1e-12, atol=0)
    assert_close(losses.masked_gram(f, m, "none"), torch.einsum("bchw,bdhw->bcd", f * m, f), rtol=1e-12, atol=0)
    # a mask of ones is the plain Gram, bit for bit; a mask shared by the batch broadcasts
    ones = torch.ones(1, 1, 6, 7, dtype=torch.float64)
    assert torch.equal(losses.masked_gram(f, ones), losses.gram(f))
    assert_close(losses.masked_gram(f, m[:1]), torch.stack([losses.masked_gram(f[i:i + 1], m[:1])[0] for i in (0, 1)]))


def test_masked_gram_gradient_matches_finite_differences():
    """The hand-written backward (recomputing F diag(m)) against float64 finite differences."""
    f = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    m = torch.rand(1, 1, 4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: losses.masked_gram(x, m), (f,))
    assert torch.autograd.gradcheck(lambda x: losses.masked_gram(x, m, positions=torch.tensor([7.0])), (f,))


def test_masked_mean_and_tile_positions():
    f = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    m = torch.rand(1, 1, 6, 6, dtype=torch.float64)
    assert_close(losses.masked_mean(f, m), (f * m).sum(dim=(2, 3)) / m.sum(), rtol=1e-12, atol=0)
    total = m.sum().view(1)  # two halves with the whole mask's sum add up to the whole
    halves = [losses.masked_gram(f[..., :3], m[..., :3], positions=total),
              losses.masked_gram(f[..., 3:], m[..., 3:], positions=total)]
    assert_close(halves[0] + halves[1], losses.masked_gram(f, m), rtol=1e-12, atol=0)
    assert_close(losses.masked_mean(f[..., :3], m[..., :3], total) + losses.masked_mean(f[..., 3:], m[..., 3:], total),
                 losses.masked_mean(f, m), rtol=1e-12, atol=0)


def test_masked_gram_refuses_a_mask_of_another_size():
    with pytest.raises(ValueError, match=r"\(B\|1, 1, H, W\) mask"):
        losses.masked_gram(torch.randn(1, 3, 4, 4), torch.ones(1, 1, 4, 5))


def test_bf16_gram_keeps_the_map_not_its_float32_copy():
    """A bf16 map's Gram is summed in float32 but its backward keeps the bf16 map (which the network keeps anyway),
    not a float32 copy of it; value and gradient are autograd's through the upcast, to float32 rounding."""
    f = torch.randn(2, 8, 12, 10, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    a, b = f.clone().requires_grad_(True), f.clone().requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        g = losses.gram(a)
    assert saved and all(t.dtype == torch.bfloat16 for t in saved)
    flat = b.float().reshape(2, 8, 120)
    plain = torch.bmm(flat, flat.transpose(1, 2)) / (8 * 120)
    torch.testing.assert_close(g, plain, rtol=1e-6, atol=0)
    w = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1))
    (ga,) = torch.autograd.grad((g * w).sum(), a)
    (gb,) = torch.autograd.grad((plain * w).sum(), b)
    assert ga.dtype == torch.bfloat16
    torch.testing.assert_close(ga.float(), gb.float(), rtol=1e-2, atol=1e-6)
