"""nsf.lbfgs: the batched, sync-free L-BFGS against torch.optim.LBFGS run image by image."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from nsf.lbfgs import LBFGS


def problem(b: int = 3, n: int = 40, seed: int = 0):
    """Per-image smooth non-quadratic losses: 0.5 x'Ax - c'x + 0.05 sum x^4 (float64)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, n, n, generator=g, dtype=torch.float64)
    a = a @ a.transpose(1, 2) / n + 0.1 * torch.eye(n, dtype=torch.float64)
    c = torch.randn(b, n, generator=g, dtype=torch.float64)
    x0 = torch.randn(b, n, generator=g, dtype=torch.float64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.einsum("bi,bij,bj->b", x, a, x) - (c * x).sum(1) + 0.05 * (x**4).sum(1)

    return f, x0


def run_ours(f, x0: torch.Tensor, steps: int, history: int, lr: float = 1.0) -> torch.Tensor:
    x = x0.clone()
    opt = LBFGS(x, lr=lr, history_size=history)
    for _ in range(steps):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(xr).sum(), xr)
        opt.step(x, g)
    return x


def run_torch(f, x0: torch.Tensor, steps: int, history: int, lr: float = 1.0) -> torch.Tensor:
    out = []
    for b in range(x0.shape[0]):
        xb = x0[b : b + 1].clone().requires_grad_(True)
        opt = torch.optim.LBFGS([xb], lr=lr, max_iter=1, history_size=history, tolerance_grad=0.0,
                                tolerance_change=0.0)

        def closure(xb=xb, b=b, opt=opt):
            opt.zero_grad()
            full = torch.zeros_like(x0)
            full = full.index_copy(0, torch.tensor([b]), xb)
            loss = f(full)[b]
            loss.backward()
            return loss

        for _ in range(steps):
            opt.step(closure)
        out.append(xb.detach())
    return torch.cat(out)


@pytest.mark.parametrize(("steps", "history"), [(1, 5), (4, 5), (30, 5), (25, 100)])
def test_matches_torch_lbfgs_per_image(steps, history):
    f, x0 = problem()
    ours = run_ours(f, x0, steps, history)
    assert_close(ours, run_torch(f, x0, steps, history), rtol=1e-9, atol=1e-10)


def test_lr_scales_like_torch():
    f, x0 = problem(b=2, seed=1)
    assert_close(run_ours(f, x0, 12, 4, lr=0.5), run_torch(f, x0, 12, 4, lr=0.5), rtol=1e-9, atol=1e-10)


def test_converges_and_images_are_independent():
    f, x0 = problem(b=3, seed=2)
    batch = run_ours(f, x0, 60, 10)
    other = x0.clone()
    other[0] += 3.0  # another start for image 0 changes nothing for images 1 and 2
    assert_close(run_ours(f, other, 60, 10)[1:], batch[1:], rtol=0, atol=0)
    xr = batch.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xr).sum(), xr)
    assert float(g.abs().max()) < 1e-5


def test_rejects_pairs_with_negative_curvature():
    opt = LBFGS(torch.zeros(2, 3, dtype=torch.float64), history_size=4)
    opt.step(torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64))
    # image 0: the gradient grows along the step (positive curvature); image 1: it shrinks (y.s < 0)
    x = torch.zeros(2, 3, dtype=torch.float64)
    opt.step(x, torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]], dtype=torch.float64))
    assert opt.count.tolist() == [1, 0]
    assert float(opt.gamma[1]) == 1.0 and float(opt.gamma[0]) != 1.0


def test_first_step_is_scaled_gradient_descent():
    x = torch.zeros(1, 4)
    g = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    LBFGS(x).step(x, g)
    assert_close(x, -g / 10.0)  # t = min(1, 1 / |g|_1) = 0.1


def test_history_size_must_be_positive():
    with pytest.raises(ValueError, match="history_size=0; allowed: an integer >= 1"):
        LBFGS(torch.zeros(1, 3), history_size=0)
