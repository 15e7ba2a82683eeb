"""The closed-form MEMIT update of one layer (paper eq. 14), kept apart from the model plumbing so
that it can be tested against the equation and another update rule can sit beside it."""

from __future__ import annotations

import torch


def solve_layer_update(keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor,
                       mom2_update_weight: float) -> torch.Tensor:
    """The update of one down-projection, in float64:

        Delta = R K^T (lambda C + K K^T)^-1

    keys K [d_ff, n] (one column per edit), residuals R [d_model, n], cov C [d_ff, d_ff] = E[k k^T]
    over the corpus, lambda = `mom2_update_weight`. Returns Delta [d_model, d_ff]. Solved with
    `torch.linalg.solve` (A = lambda C + K K^T is symmetric, so (A^-1 K)^T = K^T A^-1), never an
    explicit inverse: it is more accurate and as fast.
    """
    K, R = keys.double(), residuals.double()
    A = mom2_update_weight * cov.to(K.device, torch.float64) + K @ K.T
    return R @ torch.linalg.solve(A, K).T
