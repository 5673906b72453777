"""The RBF kernel, written once: exp(-gamma |x - y|^2) from squared norms and dot products
(one GEMM or batched GEMM), for Nystroem's map, the SVM's kernel blocks and rows, and
prediction against support vectors."""

from __future__ import annotations

import torch


def from_dots(sq_a, sq_b, dots, gamma: float):
    """exp(-gamma (|a|^2 + |b|^2 - 2 a.b)), the squared distance clamped at 0 (rounding can
    make it slightly negative); ``sq_a``, ``sq_b`` broadcast against ``dots``."""
    return torch.exp(-gamma * torch.clamp(sq_a + sq_b - 2 * dots, min=0))


def rbf(X, Y, gamma: float):
    """Every row of X against every row of Y, from one GEMM."""
    return from_dots((X * X).sum(1)[:, None], (Y * Y).sum(1)[None, :], X @ Y.T, gamma)


def rbf_cross(X, Y, gamma: float, chunk: int = 8192):
    """As :func:`rbf`, X in row chunks (the kernel against many support vectors)."""
    ysq = (Y * Y).sum(1)[None, :]
    out = [from_dots((x * x).sum(1)[:, None], ysq, x @ Y.T, gamma)
           for x in (X[s:s + chunk] for s in range(0, X.shape[0], chunk))]
    return torch.cat(out) if out else X.new_zeros(0, Y.shape[0])


def rbf_blocks(X, rows, sq, gamma: float, chunk_bytes: int = 64 << 20):
    """The kernel within each pair's ``rows`` (P, m) of X: (P, m, m), float32 like libsvm's
    Qfloat; ``sq`` (P, m) are those rows' squared norms. What the build holds beside the
    blocks (feature rows, dot products and the kernel's elementwise temporaries, about four
    r x m arrays for r rows at a time) stays within ``chunk_bytes`` whatever m is: small pairs
    go several at a time (one batched product), a large pair a slab of rows at a time (its
    whole m x m block would need about four blocks' worth of temporaries)."""
    P, m = rows.shape
    d, item = X.shape[1], max(4, X.element_size())
    out = torch.empty(P, m, m, dtype=torch.float32, device=X.device)
    per_row = 4 * m * item + d * X.element_size()  # one row's share of the temporaries
    slab = max(1, min(m, chunk_bytes // per_row))
    if slab == m:  # whole pairs fit: as many together as the budget holds
        step = max(1, chunk_bytes // (m * per_row))
        for s in range(0, P, step):
            Xp, q = X[rows[s:s + step]], sq[s:s + step]
            out[s:s + step] = from_dots(q[:, :, None], q[:, None, :], torch.bmm(Xp, Xp.transpose(1, 2)), gamma)
        return out
    for p in range(P):
        Xp, q = X[rows[p]], sq[p]  # (m, d), (m,)
        for r in range(0, m, slab):
            out[p, r:r + slab] = from_dots(q[r:r + slab, None], q[None, :], Xp[r:r + slab] @ Xp.T, gamma)
        del Xp
    return out


def nystroem_map(components, gamma: float):
    """(components, normalisation): K_mm^(-1/2) as scikit-learn's Nystroem computes it (in
    float64, from the symmetric eigendecomposition K = Q diag(l) Q^T, which gives scikit-learn's
    U S^-1/2 V: Q diag(sign(l) / sqrt(|l|)) Q^T), except for the directions whose eigenvalue is
    below the rounding noise of the kernel values the map will be applied to (|l| <= m * eps *
    max l, eps of the data's dtype): those are dropped, as a pseudo-inverse drops them, where
    scikit-learn clips the eigenvalue at 1e-12 and multiplies rounding noise by up to 1e6. For
    a well-conditioned K (most gamma values) the two are the same; for a wide kernel the
    dropped directions made fits at weak regularisation depend on rounding alone."""
    K = rbf(components.double(), components.double(), gamma)
    # on the CPU, LAPACK's eigensolver and the float64 product round differently with the
    # number of threads: one thread here, so that a fit gives the same map in any process
    # (joblib's, a Dask worker's); on a GPU the kernels do not depend on it
    from featurekit._resources import torch_threads

    with torch_threads(1 if not K.is_cuda else None):
        lam, Q = torch.linalg.eigh(K)
        floor = lam.abs().max() * K.shape[0] * torch.finfo(components.dtype).eps
        kept = lam.abs() > floor
        scale = torch.where(kept, torch.sign(lam) / lam.abs().clamp(min=1e-300).sqrt(),
                            torch.zeros_like(lam))
        normalization = (Q * scale) @ Q.T
    return components, normalization.to(components.dtype)
