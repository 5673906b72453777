"""Batched L-BFGS in torch: many independent, smooth, convex problems that share their data
advance together, one GEMM for all of them per step.

Written by hand because no well-kept library solves a *batch* of problems with a convergence
test per member: ``torch.optim.LBFGS`` optimises one parameter set with one line search, and
scipy's L-BFGS-B (scikit-learn's solver) is one problem at a time on the CPU. The method is
the standard one (Nocedal & Wright, Algorithm 7.4/7.5; history 10 as scipy's default), with a
backtracking Armijo line search per member (up to 50 trials, scikit-learn's ``maxls``), and
scikit-learn's stopping rule per member: ``max |gradient| <= tol`` (scipy's ``gtol``), or a
relative decrease of the objective below ``ftol`` (64 machine epsilons, as scikit-learn passes
to scipy), or ``max_iter`` iterations (then it has not converged).

Members that stop are taken out of the batch, so the work shrinks as they converge. On a GPU
an iteration asks the host nothing in the common case (a full step accepted): stopped members
are masked and taken out every ``CHECK_EVERY`` iterations, and the line search looks once per
extra trial.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch

# f(theta[active], active) -> (objective (A,) in float64, gradient (A, P)) for the members
# ``active``
Objective = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class Result:
    theta: torch.Tensor  # (S, P) solutions
    n_iter: torch.Tensor  # (S,) iterations each member ran
    converged: torch.Tensor  # (S,) bool: stopped by the gradient or objective test
    objective: torch.Tensor  # (S,) final objective


def minimize(fun: Objective, theta0: torch.Tensor, *, max_iter: int = 1000, tol: float = 1e-4,
             ftol: float | None = None, history: int = 10, max_ls: int = 50,
             on_stop: Callable[[int], None] | None = None) -> Result:
    """Minimise every member of ``theta0`` (S, P) independently; ``on_stop(k)`` is told each
    time k more members stop (for progress bars)."""
    S, P = theta0.shape
    dtype, device = theta0.dtype, theta0.device
    ftol = 64 * torch.finfo(torch.float64).eps if ftol is None else ftol
    if dtype == torch.float32:  # float32 objectives cannot resolve float64's epsilon
        ftol = max(ftol, 64 * torch.finfo(torch.float32).eps)
    theta = theta0.clone()
    n_iter = torch.zeros(S, dtype=torch.long, device=device)
    converged = torch.zeros(S, dtype=torch.bool, device=device)
    final_f = torch.empty(S, dtype=torch.float64, device=device)  # objectives come in float64
    # history per member (circular, one slot index for all); rho = 0 marks an empty slot,
    # which then has no effect in the two-loop recursion
    s_hist = torch.zeros(S, history, P, dtype=dtype, device=device)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros(S, history, dtype=dtype, device=device)
    slot, filled = 0, 0  # next slot to write; slots written so far (the others are empty)
    active = torch.arange(S, device=device)
    f, g = fun(theta, active)
    flat = torch.zeros(S, dtype=torch.bool, device=device)  # last step decreased f by < ftol
    failed = torch.zeros(S, dtype=torch.bool, device=device)  # last line search found no step
    halted = torch.zeros(S, dtype=torch.bool, device=device)  # stopped, not yet taken out
    every = _check_every(device)
    for it in itertools.count(1):
        small = g.abs().amax(1) <= tol
        stop = ~halted & (small | flat | failed | (n_iter[active] >= max_iter))
        converged[active] = torch.where(stop, small | flat, converged[active])
        final_f[active] = torch.where(halted, final_f[active], f)
        halted = halted | stop
        if it % every == 0 or it == 1:  # the host's look: take stopped members out
            done = int(halted.sum())
            if done:
                if on_stop is not None:
                    on_stop(done)
                go = (~halted).nonzero()[:, 0]  # one look for all of them
                active, f, g, halted = active[go], f[go], g[go], halted[go]
                flat, failed = flat[go], failed[go]
            if not active.numel():
                break
        every_member = active.numel() == S  # no member taken out: views, not copies
        direction = _two_loop(g, s_hist if every_member else s_hist[active],
                              y_hist if every_member else y_hist[active],
                              rho if every_member else rho[active], slot, filled)
        gd = (g * direction).sum(1)
        uphill = gd >= 0  # numerical trouble: forget the history, follow the gradient
        direction = torch.where(uphill[:, None], -g, direction)
        gd = torch.where(uphill, -(g * g).sum(1), gd)
        rho[active] = torch.where(uphill[:, None], torch.zeros_like(rho[active]), rho[active])
        fresh = rho[active].abs().sum(1) == 0  # no curvature yet: scipy's first step, 1/||d||
        step = torch.where(fresh, torch.clamp(1.0 / direction.norm(dim=1), max=1.0),
                           torch.ones(f.shape, dtype=dtype, device=device))
        theta_a = theta[active]
        new_theta, new_f, new_g, ok = _line_search(fun, active, theta_a, f, gd, direction, step,
                                                   max_ls, halted)
        ok = ok & ~halted  # a stopped member waiting to be taken out changes nothing
        s, yv = new_theta - theta_a, new_g - g
        sy = (s * yv).sum(1)
        keep = ok & (sy > torch.finfo(dtype).eps * (yv * yv).sum(1))  # curvature condition
        s_hist[active, slot] = torch.where(keep[:, None], s, torch.zeros_like(s))
        y_hist[active, slot] = torch.where(keep[:, None], yv, torch.zeros_like(yv))
        rho[active, slot] = torch.where(keep, 1.0 / torch.where(keep, sy, torch.ones_like(sy)),
                                        torch.zeros_like(sy))
        slot, filled = (slot + 1) % history, min(filled + 1, history)
        theta[active] = torch.where(ok[:, None], new_theta, theta_a)
        n_iter[active] += (~halted).long()
        rel = (f - new_f) / torch.clamp(torch.maximum(f.abs(), new_f.abs()), min=1.0)
        flat, failed = ok & (rel <= ftol), ~ok & ~halted
        f = torch.where(ok, new_f, f)
        g = torch.where(ok[:, None], new_g, g)
    return Result(theta=theta, n_iter=n_iter, converged=converged, objective=final_f)


CHECK_EVERY = 8  # iterations between the host's looks at a batch on a GPU (each is a sync)


def _check_every(device) -> int:
    """``CHECK_EVERY`` on a GPU; every iteration on the CPU, where a look costs nothing."""
    return CHECK_EVERY if torch.device(device).type == "cuda" else 1


def _two_loop(g, s_hist, y_hist, rho, slot: int, filled: int) -> torch.Tensor:
    """-H g for each member, from its (s, y) history, newest first (slots a member skipped
    have rho = 0 and no effect; never-written slots are not visited)."""
    if not filled:
        return -g
    history = s_hist.shape[1]
    q = g.clone()
    alpha = torch.zeros(g.shape[0], history, dtype=g.dtype, device=g.device)
    order = [(slot - 1 - i) % history for i in range(filled)]  # newest to oldest
    for j in order:
        a = rho[:, j] * (s_hist[:, j] * q).sum(1)
        alpha[:, j] = a
        q -= a[:, None] * y_hist[:, j]
    newest = order[0]
    yy = (y_hist[:, newest] * y_hist[:, newest]).sum(1)
    sy = (s_hist[:, newest] * y_hist[:, newest]).sum(1)
    gamma = torch.where(rho[:, newest] != 0, sy / torch.where(yy > 0, yy, torch.ones_like(yy)),
                        torch.ones_like(yy))
    r = gamma[:, None] * q
    for j in reversed(order):
        b = rho[:, j] * (y_hist[:, j] * r).sum(1)
        r += (alpha[:, j] - b)[:, None] * s_hist[:, j]
    return -r


def _line_search(fun: Objective, active, theta, f, gd, direction, step, max_ls: int,
                 halted=None):
    """Backtracking with the Armijo condition (c1 = 1e-4), each member its own step; members
    that find no step in ``max_ls`` trials stay where they are (ok = False). The first trial
    is every member's (``halted`` ones too: their result is not used), so the common case, a
    full step accepted, asks nothing of the host; later trials evaluate only the members still
    searching."""
    trial = theta + step[:, None] * direction
    tf, tg = fun(trial, active)
    good = torch.isfinite(tf) & (tf <= f + 1e-4 * (step * gd).double())
    if halted is not None:
        good = good | halted
    ok = good.clone()
    new_theta = torch.where(good[:, None], trial, theta)
    new_f = torch.where(good, tf, f)
    new_g = torch.where(good[:, None], tg, torch.zeros_like(theta))
    todo = (~good).nonzero()[:, 0]  # one look per trial
    for _ in range(max_ls - 1):  # each further trial evaluates only the members still searching
        if not todo.numel():
            break
        step[todo] *= 0.5
        trial = theta[todo] + step[todo, None] * direction[todo]
        tf, tg = fun(trial, active[todo])
        good = torch.isfinite(tf) & (tf <= f[todo] + 1e-4 * (step[todo] * gd[todo]).double())
        hit = todo[good]
        new_theta[hit], new_f[hit], new_g[hit] = trial[good], tf[good], tg[good]
        ok[hit] = True
        todo = todo[~good]
    if halted is not None:
        ok = ok & ~halted
    return new_theta, new_f, new_g, ok
