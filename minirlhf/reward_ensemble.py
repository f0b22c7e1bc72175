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

Normalised members (opt-in, --reward-ensemble-normalize). A Bradley-Terry reward model is defined only up to an
additive constant and a scale: its loss sees r_c - r_r alone, so members trained with different seeds agree on the
ORDER of responses but sit at different offsets and slopes, and the spread across members then measures those
offsets, nearly a constant, not disagreement. Each member is first standardised with its mean μ_i and population std
σ_i over a FIXED reference set of responses (the built-in world's training pairs, chosen and rejected:
roles.Reward.reference_statistics), never the current rollout, which would make the objective move with the policy;
then all are put on the members' average offset and scale, so that the reward keeps its units and every KL knob
(PPO's r - β·KL) means what it means with one reward model:

    R̃_i = μ̄ + σ̄ · (R_i - μ_i) / σ_i          μ̄ = (1/M) Σ_i μ_i,  σ̄ = (1/M) Σ_i σ_i

and the combinations above run on the R̃_i. One member is its own score again (R̃ = R up to rounding); members that
differ only by an offset and a positive scale become identical (spread 0): what spread is left is disagreement.
(OpenRLHF likewise stores a reward model's mean and std and standardises its scores.)
"""
ENSEMBLES = ("mean", "min", "mean-minus-var", "mean-minus-std")


def reference_statistics(scores):
    """scores (M, N): M members' scores of the N responses of the fixed reference set -> (mean (M,), std (M,)), each
    member's mean and population standard deviation (1/N), in float64."""
    scores = scores.double()  # (M, N)
    return scores.mean(1), scores.std(1, correction=0)  # (M,), (M,)


def normalize_members(scores, mean, std):
    """scores (M, B), mean (M,), std (M,) -> (M, B): R̃_i = μ̄ + σ̄ · (R_i - μ_i) / σ_i for every member i (module
    docstring), in the scores' dtype."""
    if scores.dim() != 2 or mean.shape != (scores.shape[0],) or std.shape != mean.shape:
        raise ValueError(f"normalize_members: need scores (M, B) and mean, std (M,), got {tuple(scores.shape)}, "
                         f"{tuple(mean.shape)}, {tuple(std.shape)}")
    if not bool((std > 0).all()):
        raise ValueError(f"normalize_members: every member's reference std must be > 0, got {std.tolist()}")
    z = (scores - mean.to(scores)[:, None]) / std.to(scores)[:, None]  # (M, B): each member standardised
    return mean.mean().to(scores) + std.mean().to(scores) * z  # (M, B): on the members' average offset and scale


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
