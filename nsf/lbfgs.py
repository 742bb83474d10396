"""Batched L-BFGS on image pixels, with no host synchronisation per step.

Same iteration as ``torch.optim.LBFGS(lr, history_size=m, line_search_fn=None)`` called with
``max_iter=1`` per step (what nsf used before), but:

- batched: each image of a ``(B, ...)`` tensor is its own problem with its own history, so a
  batch of requests optimizes exactly as each would alone;
- the history lives in fixed-size ring buffers on the tensor's device and the two-loop recursion
  is replaced by the compact representation of the inverse Hessian (Byrd, Nocedal & Schnabel
  1994; Nocedal & Wright eq. 7.24): a step is a few batched matrix products and a small
  triangular solve, with no ``.item()``. torch's loop makes 2m tiny launches and m host syncs
  per step, which dominate the step time on a GPU.

Pure tensor math: no IO, no device choice.
"""

from __future__ import annotations

import torch
from torch import Tensor

# torch.optim.LBFGS skips a curvature pair when y.s <= 1e-10; the same rule keeps results comparable.
CURVATURE_EPS = 1e-10


class LBFGS:
    """``step(x, grad)`` moves ``x`` (in place, ``(B, ...)``) one L-BFGS step per image.

    ``grad`` is the gradient of the sum of per-image losses, i.e. each image's own gradient.
    """

    def __init__(self, x: Tensor, lr: float = 1.0, history_size: int = 100):
        if history_size < 1:
            raise ValueError(f"history_size={history_size}; allowed: an integer >= 1")
        b, n, m = x.shape[0], x[0].numel(), history_size
        dev, dt = x.device, torch.promote_types(x.dtype, torch.float32)
        self.lr, self.m = float(lr), m
        self.S = torch.zeros(b, m, n, device=dev, dtype=dt)  # steps s_i, one row per slot
        self.Y = torch.zeros(b, m, n, device=dev, dtype=dt)  # gradient changes y_i
        self.SY = torch.zeros(b, m, m, device=dev, dtype=dt)  # s_i . y_j, slot order
        self.YY = torch.zeros(b, m, m, device=dev, dtype=dt)  # y_i . y_j
        self.age = torch.full((b, m), float("inf"), device=dev, dtype=dt)  # insertion number per slot; inf = empty
        self.count = torch.zeros(b, dtype=torch.long, device=dev)  # pairs accepted so far
        self.gamma = torch.ones(b, device=dev, dtype=dt)  # H0 = gamma * I, from the latest pair
        self.prev_g = torch.zeros(b, n, device=dev, dtype=dt)
        self.prev_s = torch.zeros(b, n, device=dev, dtype=dt)
        # every tensor above is updated in place, so a captured CUDA graph of step() replays correctly
        self.steps = 0

    @torch.no_grad()
    def step(self, x: Tensor, grad: Tensor) -> None:
        b = x.shape[0]
        g = grad.reshape(b, -1).to(self.S.dtype)
        if self.steps > 0:
            self._remember(g - self.prev_g, self.prev_s)
        d = self.direction(g)
        if self.steps == 0:  # torch's first step: t = min(1, 1/|g|_1) * lr
            t = (1.0 / g.abs().sum(1).clamp_min(1e-30)).clamp(max=1.0) * self.lr
        else:
            t = torch.full_like(self.gamma, self.lr)
        # torch.optim.LBFGS stops (moves nothing) when d is not a descent direction; so does this, per image
        t = torch.where((g * d).sum(1) <= 0, t, torch.zeros_like(t))
        s = d * t[:, None]
        x.add_(s.view_as(x).to(x.dtype))
        self.prev_g.copy_(g)
        self.prev_s.copy_(s)
        self.steps += 1

    def _remember(self, y: Tensor, s: Tensor) -> None:
        ys = (y * s).sum(1)
        accept = ys > CURVATURE_EPS
        slot = (self.count % self.m).view(-1, 1, 1)  # (B, 1, 1): next slot to write, per image
        rows = slot.expand(-1, 1, s.shape[1])
        keep_s = torch.where(accept[:, None], s, self.S.gather(1, rows).squeeze(1))
        keep_y = torch.where(accept[:, None], y, self.Y.gather(1, rows).squeeze(1))
        self.S.scatter_(1, rows, keep_s.unsqueeze(1))
        self.Y.scatter_(1, rows, keep_y.unsqueeze(1))
        # the new row and column of S^T Y and Y^T Y (recomputed from the slot's contents, so a
        # rejected pair leaves them as they were)
        s_dot_y = torch.bmm(self.Y, keep_s.unsqueeze(2)).squeeze(2)  # s_k . y_j
        y_dot_s = torch.bmm(self.S, keep_y.unsqueeze(2)).squeeze(2)  # s_i . y_k
        y_dot_y = torch.bmm(self.Y, keep_y.unsqueeze(2)).squeeze(2)  # y_i . y_k
        m = self.m
        self.SY.scatter_(1, slot.expand(-1, 1, m), s_dot_y.unsqueeze(1))
        self.SY.scatter_(2, slot.view(-1, 1, 1).expand(-1, m, 1), y_dot_s.unsqueeze(2))
        self.YY.scatter_(1, slot.expand(-1, 1, m), y_dot_y.unsqueeze(1))
        self.YY.scatter_(2, slot.view(-1, 1, 1).expand(-1, m, 1), y_dot_y.unsqueeze(2))
        new_age = torch.where(accept, self.count.float(), self.age.gather(1, slot.view(-1, 1)).squeeze(1))
        self.age.scatter_(1, slot.view(-1, 1), new_age.unsqueeze(1))
        yy = (keep_y * keep_y).sum(1)
        self.gamma.copy_(torch.where(accept, ys / yy.clamp_min(1e-30), self.gamma))
        self.count.add_(accept.long())

    def direction(self, g: Tensor) -> Tensor:
        """``-H g`` per image, H the L-BFGS inverse-Hessian approximation (compact form)."""
        m = self.m
        order = torch.argsort(self.age, dim=1)  # chronological, empty slots last
        filled = torch.isfinite(self.age.gather(1, order)).float()  # (B, m)
        pick = order.unsqueeze(2)
        sy = self.SY.gather(1, pick.expand(-1, -1, m)).gather(2, order.unsqueeze(1).expand(-1, m, -1))
        yy = self.YY.gather(1, pick.expand(-1, -1, m)).gather(2, order.unsqueeze(1).expand(-1, m, -1))
        # R: upper triangle of S^T Y; empty slots get 1 on the diagonal, so R = diag(R_used, I)
        r = torch.triu(sy) + torch.diag_embed(1.0 - filled)
        dmat = torch.diag_embed(torch.diagonal(sy, dim1=1, dim2=2) * filled)
        sg = torch.bmm(self.S, g.unsqueeze(2)).gather(1, pick)  # (B, m, 1), chronological
        yg = torch.bmm(self.Y, g.unsqueeze(2)).gather(1, pick)
        gamma = self.gamma.view(-1, 1, 1)
        p = torch.linalg.solve_triangular(r, sg, upper=True)  # R^-1 S^T g
        u = torch.linalg.solve_triangular(r.transpose(1, 2), torch.bmm(dmat + gamma * yy, p) - gamma * yg,
                                          upper=False)  # R^-T ((D + gamma Y^T Y) R^-1 S^T g - gamma Y^T g)
        v = -gamma * p
        # back to slot order, then H g = gamma g + S^T u + Y^T v
        u_slot = torch.zeros_like(u).scatter_(1, pick, u)
        v_slot = torch.zeros_like(v).scatter_(1, pick, v)
        hg = gamma.view(-1, 1) * g + torch.bmm(u_slot.transpose(1, 2), self.S).squeeze(1) \
            + torch.bmm(v_slot.transpose(1, 2), self.Y).squeeze(1)
        return -hg
