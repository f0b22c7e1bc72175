"""How the built-in world rates a response: the templated STYLES, the gold score, the noisy annotator.

The gold reward is a deterministic score in [0, GOLD_MAX] for one response to one request.

The world (world.py) knows the right answer `answer` of each request and which tokens look like an answer to it
(any number for arithmetic, any word of the world's answer vocabulary otherwise). `score` reads free-form text:
it lower-cases the response, splits it into words (`[a-z]+` runs and `[0-9]+` numbers; punctuation is ignored) and
keeps the answer-like ones. Then, on HelpSteer2's 0..4 scale:

    content (base score)                                                      base
    ------------------------------------------------------------------------  ----
    correct   every answer-like word is the right answer (at least one)        4.0
    evasive   no answer-like word at all ("I am not sure.", junk, off-topic)   1.0
    wrong     some answer-like word is not the right answer (incl. hedging
              "7 or 8", which names the right answer AND a wrong one)          0.5
    empty     nothing but whitespace                                           0.0

    form penalties (each subtracted once, score floored at 0)                 penalty
    ------------------------------------------------------------------------  -------
    long        more than 8 words                                               1.0
    repetitive  some word bigram occurs two or more times                       1.0
    unfinished  the text does not end with . ! or ?  (e.g. cut off)              0.5

So correctness dominates: a correct answer scores at least 4 - 2.5 = 1.5, anything else at most 1.0. The scores the
templated STYLES below get (checked in tests/test_world.py):

    "The answer is 7."                                      concise, correct            4.0
    "The answer is 7"                                       concise, correct, cut       3.5
    "Sure, I can help with that. It is 7. Have a nice day!" rambling, correct           3.0
    "It is 7. It is 7. It is 7."                            repetitive, correct         2.0
    "I am not sure about that."                             evasive                     1.0
    "I think 8."                                            wrong                       0.5
    "It is 7 or 8."                                         hedged                      0.5
    "Sure, I can help with"                                 truncated (no answer)       0.5
    ""                                                      empty                       0.0
"""
import math
import re

GOLD_MAX = 4.0
MAX_WORDS = 8  # more words than this is "long"
BASE = {"correct": 4.0, "evasive": 1.0, "wrong": 0.5, "empty": 0.0}
PENALTY = {"long": 1.0, "repetitive": 1.0, "unfinished": 0.5}

_WORD = re.compile(r"[a-z]+|[0-9]+")

# Response styles. {x} is the right answer, {y} a wrong one, {X} the right answer capitalised.
_CORE = ["The answer is {x}.", "It is {x}.", "{X}."]
_OPEN = ["Good question! Let me think about it.", "Thanks for asking, I will do my best.",
         "Sure, I can help with that."]
_CLOSE = ["I hope this helps!", "Feel free to ask anything else.", "Have a nice day!"]
STYLES = {
    "concise": _CORE,
    "rambling": [f"{o} {c} {e}" for o in _OPEN for c in _CORE for e in _CLOSE],
    "repetitive": [" ".join([c] * 3) for c in _CORE[:2]],
    "evasive": ["I am not sure about that.", "Sorry, I cannot answer that.", "That is tricky, I do not know."],
    "wrong": ["I think {y}.", "Maybe {y}.", "Probably {y}."],
    "truncated": ["The answer is", "Sure, I can help with", "Good question! Let me"],
    "hedged": ["It is {x} or {y}.", "Either {y} or {x}."],
    "empty": [""],
}


def words(text):
    """Lower-cased words and numbers of `text`, punctuation dropped: "It's 17!" -> ['it', 's', '17']."""
    return _WORD.findall(text.lower())


def judge(response, answer, vocab):
    """(content, [penalties]) for `response`; `vocab` is the set of answer-like words ('numbers' = any number)."""
    if not isinstance(response, str):
        raise ValueError(f"gold score: response must be a str, got {type(response).__name__}")
    if not response.strip():
        return "empty", []
    ws = words(response)
    named = {w for w in ws if (w.isdigit() if vocab == "numbers" else w in vocab)}
    content = "evasive" if not named else "correct" if named == {answer} else "wrong"
    bigrams = list(zip(ws, ws[1:]))
    penalties = [name for name, hit in (("long", len(ws) > MAX_WORDS),
                                        ("repetitive", len(set(bigrams)) < len(bigrams)),
                                        ("unfinished", not response.rstrip().endswith((".", "!", "?"))))
                 if hit]
    return content, penalties


def score(response, answer, vocab):
    """The gold score in [0, GOLD_MAX] of the table above."""
    content, penalties = judge(response, answer, vocab)
    return max(0.0, BASE[content] - sum(PENALTY[p] for p in penalties))


def centred_gumbel(rng):
    """A Gumbel(0, 1) draw minus its mean γ (Euler's constant): -log(-log U) - γ, U ~ Uniform(0, 1)."""
    return -math.log(-math.log(rng.random() or 1e-300)) - 0.5772156649015329


def annotate(gold_a, gold_b, tau, rng):
    """The noisy annotator: (prefers_a, rating_a, rating_b) with rating = gold + τ·centred Gumbel.

    The difference of two independent Gumbels is logistic, so P(prefers_a) = σ((gold_a - gold_b)/τ) exactly: the
    Bradley-Terry model with temperature τ. The noise has mean 0, so ratings are unbiased."""
    rating_a, rating_b = gold_a + tau * centred_gumbel(rng), gold_b + tau * centred_gumbel(rng)
    return rating_a > rating_b, rating_a, rating_b


def rounded_rating(rating):
    """An annotator's rating as a HelpSteer2 score: rounded and clipped to 0..4."""
    return float(min(GOLD_MAX, max(0.0, round(rating))))
