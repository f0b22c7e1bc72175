"""Two of DAPO's changes to GRPO's rollout (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System
at Scale", arXiv 2503.14476): which groups a rollout keeps (Sec. 3.2) and a length penalty on the score (Sec. 3.4).
(DAPO's clip-higher and token-level loss are in grpo.py.)

Legend: B responses, G per prompt, groups contiguous (B = n_groups * G).

Dynamic sampling (Sec. 3.2, Eq. 11's constraint 0 < |{o_i : is_equivalent(a, o_i)}| < G). A group whose scores are
all equal has advantages r_i - mean = 0 for every response (baselines.group_advantages sets them exactly 0): its
clipped term gives no gradient, and under a token-mean loss its tokens only dilute the others'. DAPO drops such
groups (for a 0/1 reward: all correct or all wrong) and samples more until the batch is full of informative ones:

    informative(group) = max_i r_i != min_i r_i          (exact equality: group_advantages' own zero rule)

Near-equal but different scores count as informative: their advantages are small, not zero.

Soft overlong punishment (Sec. 3.4, Eq. 13), with L_max the most tokens a response may have and L_cache a buffer:

                 0                               |y| <= L_max - L_cache
    R_length  =  ((L_max - L_cache) - |y|) / L_cache    L_max - L_cache < |y| <= L_max
                 -1                              L_max < |y|

added to the score: a response that runs into the last L_cache tokens loses up to 1, linearly in its length, rather
than only the truncated ones being punished at once. Here a response cannot outgrow L_max (--max-new-tokens cuts it),
so the last line never applies: a cut response has |y| = L_max and gets the middle line's -1.
"""


def informative_groups(scores, group_size):
    """(B,) scores, group-contiguous -> (n_groups,) bool: True where the group's scores are not all equal (exactly),
    i.e. where its GRPO advantages are not all zero (DAPO's dynamic sampling keeps these groups)."""
    if scores.dim() != 1 or group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"informative_groups: scores must be (n_groups * {group_size},), got {tuple(scores.shape)}")
    grouped = scores.view(-1, group_size)  # (n_groups, G)
    return grouped.amax(dim=1) != grouped.amin(dim=1)  # (n_groups,)


def overlong_penalty(lengths, max_len, buffer):
    """DAPO's soft overlong punishment, Eq. 13: (B,) response lengths (tokens) -> (B,) penalties in [-1, 0]:
    0 up to max_len - buffer tokens, then linearly down to -1 at max_len, -1 beyond. The three cases of Eq. 13 are one
    clamp: ((max_len - buffer) - |y|) / buffer, clamped to [-1, 0]. Floating lengths keep their dtype, integer ones
    give float32."""
    if not 1 <= buffer <= max_len:
        raise ValueError(f"overlong_penalty: buffer must lie in [1, max_len = {max_len}], got {buffer}")
    lengths = lengths if lengths.is_floating_point() else lengths.float()  # (B,)
    return (((max_len - buffer) - lengths) / buffer).clamp(min=-1.0, max=0.0)  # (B,)
