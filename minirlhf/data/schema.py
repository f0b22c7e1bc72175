"""The common schema every loader produces, and the checks a row must pass to be kept.

    prompt    [{"role": "system"|"user"|"assistant", "content": str}, ...]   ends with a non-empty user turn
    chosen    str, the preferred response             rejected   str, the other one
    chosen_score, rejected_score, margin              floats, only where the source has scores

A row that fails a check is not an error: `checked` returns a short reason ("missing field", "empty prompt",
"empty response", "non-string response", "identical responses", "non-numeric score", "non-finite score", ...) that the
loader counts and reports once. Scores must be finite: Python's json module reads NaN and Infinity, and one NaN
margin turns a `--loss margin` reward model's loss into NaN.
"""
import math

from datasets import Features, List, Value

ROLES = ("system", "user", "assistant")
MESSAGES = List({"role": Value("string"), "content": Value("string")})
PROMPT_FEATURES = Features({"prompt": MESSAGES})  # the arrow types of the columns, so that every loader agrees
PAIR_FEATURES = Features({"prompt": MESSAGES, "chosen": Value("string"), "rejected": Value("string")})
SCORED_PAIR_FEATURES = Features({**PAIR_FEATURES, "chosen_score": Value("float64"),
                                 "rejected_score": Value("float64"), "margin": Value("float64")})


def prompt_problem(prompt):
    """Why `prompt` is not a usable messages list ending with a non-empty user turn, or None when it is."""
    if prompt is None:
        return "missing field"
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in prompt):
        return "malformed prompt"
    if prompt[-1]["role"] != "user":
        return "prompt not ending with a user turn"
    if not prompt[-1]["content"].strip():
        return "empty prompt"
    return None


def checked(prompt, chosen, rejected, scores=None, margin=None):
    """The normalised row, or the reason it must be skipped. Sources with scores pass scores = (chosen_score,
    rejected_score) and may pass a margin of their own; it defaults to chosen_score - rejected_score."""
    if chosen is None or rejected is None or (scores is not None and None in scores):
        return "missing field"
    problem = prompt_problem(prompt)
    if problem:
        return problem
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return "non-string response"
    if not chosen.strip() or not rejected.strip():
        return "empty response"
    if chosen == rejected:
        return "identical responses"
    row = {"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt], "chosen": chosen,
           "rejected": rejected}
    if scores is None:
        return row
    numbers = [s for s in (*scores, margin) if s is not None]
    if not all(is_number(s) for s in numbers):
        return "non-numeric score"
    if not all(is_finite(s) for s in numbers):
        return "non-finite score"
    chosen_score, rejected_score = map(float, scores)
    margin = chosen_score - rejected_score if margin is None else float(margin)
    if not math.isfinite(margin):  # the difference of two huge finite scores
        return "non-finite score"
    return {**row, "chosen_score": chosen_score, "rejected_score": rejected_score, "margin": margin}


def is_number(value):
    """An int or float, finite or not; a bool is not a score."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(number):
    """A number that is a finite float64 (not NaN, not ±inf, not an int too large for a float)."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


def user_turn(text):
    """A one-turn prompt from a question string; anything else comes back unchanged for `checked` to name."""
    return [{"role": "user", "content": text.strip()}] if isinstance(text, str) else text
