"""The closed-form update of one layer, kept apart from the model plumbing so that each rule can be
tested against its equation: MEMIT (paper eq. 14) and AlphaEdit's null-space-projected update."""

from __future__ import annotations

import torch


def solve_layer_update(keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor,
                       mom2_update_weight: float, preserved: torch.Tensor | None = None,
                       pull: torch.Tensor | None = None) -> torch.Tensor:
    """The update of one down-projection, in float64:

        Delta = (R K^T + R_p K_p^T) (lambda C + K_p K_p^T + K K^T)^-1

    keys K [d_ff, n] (one column per edit), residuals R [d_model, n], cov C [d_ff, d_ff] = E[k k^T]
    over the corpus, lambda = `mom2_update_weight`, and K_p K_p^T (`preserved`, None for none) the
    summed outer products of keys that must keep their outputs: MEMIT's memory term holds every key
    whose value should stay, so earlier edits and --preserve prompts join it; R_p K_p^T (`pull`, [d_model,
    d_ff], None for none) asks their outputs to move by R_p instead of staying (HParams.preserve_restore).
    Returns Delta [d_model, d_ff]. Solved with
    `torch.linalg.solve` (A = lambda C + K K^T is symmetric, so (A^-1 K)^T = K^T A^-1), never an
    explicit inverse: it is more accurate and as fast.
    """
    K, R = keys.double(), residuals.double()
    A = (K @ K.T).add_(cov.to(K.device, torch.float64), alpha=mom2_update_weight)  # one d_ff x d_ff temporary
    if preserved is not None:
        A.add_(preserved.to(K.device, torch.float64))
    if pull is not None:
        return torch.linalg.solve(A, K @ R.T + pull.to(K.device, torch.float64).T).T
    return R @ torch.linalg.solve(A, K).T


def nullspace_projection(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U U^T over the eigenvectors of C whose eigenvalues are below `threshold` (float64): the
    directions corpus keys hardly use. AlphaEdit's projection (the reference thresholds the same
    normalisation of C, the mean k k^T per token)."""
    values, vectors = torch.linalg.eigh(cov.double())
    u = vectors[:, values < threshold]
    return u @ u.T


def solve_alphaedit_update(keys: torch.Tensor, residuals: torch.Tensor, projection: torch.Tensor,
                           preserved: torch.Tensor | None, l2: float, pull: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """AlphaEdit's update of one down-projection (Fang et al. 2025, eq. 11), in float64:

        Delta^T = (P (K_p K_p^T + K K^T) + L2 I)^-1 P (K R^T + K_p R_p^T)

    with P the null-space projection of C and K_p K_p^T (`preserved`, [d_ff, d_ff] or None) the summed
    outer products of keys that must keep their outputs (earlier edits, --preserve prompts), R_p K_p^T
    (`pull`, None for none) the moves asked of restored ones, as in solve_layer_update. The
    solution lies in the range of P, so corpus keys (which live outside it) hardly move.
    Returns Delta [d_model, d_ff].
    """
    K, R = keys.double(), residuals.double()
    P = projection.to(K.device, torch.float64)
    M = K @ K.T if preserved is None else preserved.to(K.device, torch.float64) + K @ K.T
    A = P @ M + l2 * torch.eye(P.shape[0], dtype=torch.float64, device=K.device)
    B = K @ R.T if pull is None else K @ R.T + pull.to(K.device, torch.float64).T
    return torch.linalg.solve(A, P @ B).T
