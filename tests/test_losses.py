"""nsf.losses: Gram matrices, content/style/TV losses, checked against hand-computed values."""

from __future__ import annotations

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
