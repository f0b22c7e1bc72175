"""An ensemble of reward models: M reward models trained alike (here: train_reward.py with different --seed) score
every response, and the policy optimises ONE combination of the M scores (Coste et al. 2023, "Reward Model Ensembles
Help Mitigate Overoptimization", arXiv 2310.02743, Sec. 3). With R_i the i-th member's score of a response and
R̄ = (1/M) Σ_i R_i:

    mean             R̄                                     mean optimisation
    min              min_i R_i                              worst-case optimisation (WCO)
    mean-minus-var   R̄ - λ · (1/M) Σ_i (R_i - R̄)²          uncertainty-weighted optimisation (UWO), the paper's
    mean-minus-std   R̄ - λ · sqrt((1/M) Σ_i (R_i - R̄)²)    UWO with the standard deviation σ: λ in the reward's
                                                            units, R̄ - λσ a lower confidence bound

The spread is the POPULATION variance / std over the M members (1/M, the paper's intra-ensemble variance; torch's
correction=0), not the sample one (1/(M - 1)): so M = 1 is allowed, its spread is exactly 0 and every combination
returns the one member's scores unchanged. The members agree where they were trained and drift apart where the policy
wanders off it; min and mean - λ·spread pay the policy less there, so exploiting one member's error stops paying.
"""
ENSEMBLES = ("mean", "min", "mean-minus-var", "mean-minus-std")


def ensemble_std(scores):
    """scores (M, B): M members' scores of B responses -> (B,) their population standard deviation (1/M)."""
    return scores.std(0, correction=0)  # (M, B) -> (B,)


def combine(scores, how="mean", lam=1.0):
    """scores (M, B): M members' scores of B responses -> (B,) the one score the policy optimises (module docstring).
    how: mean | min | mean-minus-var | mean-minus-std; lam: λ >= 0 of the two uncertainty-weighted ones."""
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"combine: need scores of shape (M >= 1, B), got {tuple(scores.shape)}")
    if how not in ENSEMBLES:
        raise ValueError(f"combine: how must be one of {ENSEMBLES}, got {how!r}")
    if how == "min":
        return scores.min(0).values  # (B,): the worst case
    mean = scores.mean(0)  # (B,)
    if how == "mean-minus-var":
        return mean - lam * scores.var(0, correction=0)
    if how == "mean-minus-std":
        return mean - lam * ensemble_std(scores)
    return mean
