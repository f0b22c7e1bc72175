"""How the built-in world rates a response: the templated STYLES, the gold score, the noisy annotator.

The gold reward is a deterministic score in [0, GOLD_MAX] for one response to one request.

The world (world.py) knows the right answer `answer` of each request and which tokens look like an answer to it
(any number for arithmetic, any word of the world's answer vocabulary otherwise). `judge` reads free-form text the
way a careful grader would, one sentence at a time (a sentence ends at . ! ? ; or a line break): lower-cased, with
punctuation and markdown ignored, numbers written as digits or as the words zero, three, ..., twenty ("one" and "two"
are not read: "the larger one", "these two numbers"). Some answer-like words are not answers (next table); the
rest decide the content. Then, on HelpSteer2's 0..4 scale:

    content (base score)                                                      base
    ------------------------------------------------------------------------  ----
    correct   the right answer, and no other answer-like word                 4.0
    evasive   no answer-like word at all ("I am not sure.", junk, off-topic)   1.0
    wrong     some other answer-like word (incl. hedging "7 or 8"), a false    0.5
              comparison, or the right answer in a negated sentence
    empty     nothing but whitespace                                           0.0

    not answers: what the grader skips                  example (the skipped words in [ ])
    ------------------------------------------------------------------------------------------------------------
    a copy of the request                               "[Say the word cookie.]"  (an echo alone is evasive)
    the question's two numbers joined by plus, + or     "[6] plus [4] equals 10."  "The sum of [6] and [4] is 10."
      and, in either order                              (a sum is judged by its result: "... equals 11." is wrong)
    a question word after "of (a/an/the)" or before     "The opposite of [thick] is thin."
      "is (the) opposite"                               "[Thick] is the opposite of thin."
    the smaller number of a true comparison             "7 is larger than [3]."  "[3] is smaller than 7."  "7 > [3]"
      (COMPARISONS: X larger/bigger/greater/higher/     "7 is larger and [3] is smaller."
      more than Y, X > Y, X smaller/less/lower/fewer    a false comparison makes the response wrong:
      than Y, X < Y, "X is (the) smaller")              "5 is bigger than 6."  "7 is smaller."
    every word of a negated sentence (one with not,     "It is not 8. It is 7." is correct; but a negated sentence
      no, never, cannot, none, nothing, neither, nor,   that names the right answer makes the response wrong:
      or a word ending in n't)                          "I cannot say cookie."  "A lemon is not yellow."

    form penalties (each subtracted once, score floored at 0)                 penalty
    ------------------------------------------------------------------------  -------
    long        more than 8 words                                               1.0
    repetitive  some word bigram occurs two or more times                       1.0
    unfinished  the text does not end with . ! or ?  (e.g. cut off)              0.5

Words for the form penalties are `[a-z]+` runs and `[0-9]+` numbers (`words`). So correctness dominates: a correct
answer scores at least 4 - 2.5 = 1.5, anything else at most 1.0. The scores the templated STYLES below get (checked
in tests/test_world.py; tests/test_gold.py checks the rules on answers a real instruct model writes):

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

_WORD = re.compile(r"[a-z]+|[0-9]+")                        # for the form penalties
_TOKEN = re.compile(r"[a-z]+(?:['’]t\b)?|[0-9]+|[+=<>]")   # for the content: also "can't" and + = < >
_SENTENCE_END = re.compile(r"[.!?;\n]")
NUMBER_WORDS = {w: str(n) for n, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                                "thirteen fourteen fifteen sixteen seventeen eighteen nineteen "
                                                "twenty".split()) if w not in ("one", "two")}
NEGATIONS = {"not", "no", "never", "cannot", "none", "nothing", "neither", "nor"}  # and any word ending in n't
_MORE, _LESS = "larger|bigger|greater|higher|more", "smaller|less|lower|fewer"
_LEAST = "smaller|smallest|lesser|lower|lowest|less"
# (pattern over a sentence's tokens, group of the larger number or None = the question's larger, group of the smaller)
COMPARISONS = [
    (rf"(\d+) (?:is )?(?:the )?(?:{_MORE}) than (\d+)", 1, 2),  # 7 is larger than 3
    (r"(\d+) > (\d+)", 1, 2),                                   # 7 > 3
    (rf"(\d+) (?:is )?(?:the )?(?:{_LESS}) than (\d+)", 2, 1),  # 3 is smaller than 7
    (r"(\d+) < (\d+)", 2, 1),                                   # 3 < 7
    (rf"(\d+) is (?:the )?(?:{_LEAST})(?! than)", None, 1),     # 3 is the smaller
    (rf"(?:{_LEAST}) (?:number |one |of the two )?is (\d+)", None, 1),  # the smaller one is 3
]

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


def tokens(text):
    """The tokens the content is read from: lower-cased words, n't contractions, numbers (number words as digits)
    and the symbols + = < >: "Six + 4 isn't **10**" -> ['6', '+', '4', "isn't", '10']."""
    return [NUMBER_WORDS.get(t, t) for t in _TOKEN.findall(text.lower())]


def sentences(text):
    """`tokens` of each sentence of `text` (split at . ! ? ; and line breaks), empty sentences dropped."""
    return [ts for ts in map(tokens, _SENTENCE_END.split(text)) if ts]


def is_negated(toks):
    """Whether a sentence's tokens hold a negation: a word of NEGATIONS or one ending in n't ("can't", "don’t")."""
    return any(t in NEGATIONS or t.endswith(("n't", "n’t")) for t in toks)


def echoed(toks, request):
    """Positions of every copy of the request's tokens in `toks`: "Say the word cookie." inside the response."""
    n = len(request)
    return {i + k for i in range(len(toks) - n + 1) if n and toks[i:i + n] == request for k in range(n)}


def restated_numbers(toks, numbers):
    """Positions of the question's two `numbers` joined by plus, + or and, in either order: "6 plus 4", "4 and 6"."""
    if len(numbers) != 2:
        return set()
    return {j for i in range(len(toks) - 2) if toks[i + 1] in ("plus", "+", "and")
            and sorted((toks[i], toks[i + 2])) == sorted(numbers) for j in (i, i + 2)}


def restated_words(toks, question):
    """Positions of a question word (not a number) after "of (a/an/the)" or before "is (the) opposite":
    "the opposite of thick", "the colour of an orange", "thick is the opposite of thin"."""
    def restated(i):
        before, after = toks[max(0, i - 2):i], toks[i + 1:i + 4]
        return (before[-1:] == ["of"] or before[:1] == ["of"] and before[1] in ("a", "an", "the")
                or after[:2] == ["is", "opposite"] or after == ["is", "the", "opposite"])
    return {i for i, t in enumerate(toks) if t in question and not t.isdigit() and restated(i)}


def comparisons(toks, numbers):
    """(some comparison is false, positions of the smaller side of the true ones) for the COMPARISONS in `toks`.

    "X is (the) smaller" compares X with the question's larger number: true only for the question's smaller one."""
    text = " ".join(toks)
    starts = [sum(len(t) + 1 for t in toks[:i]) for i in range(len(toks))]  # character offset of each token
    false, smaller = False, set()
    for pattern, big_group, small_group in COMPARISONS:
        for m in re.finditer(rf"(?<!\S){pattern}(?!\S)", text):
            small = m.group(small_group)
            if big_group is None:
                true = small in numbers and int(small) < max(map(int, numbers))
            else:
                true = int(m.group(big_group)) > int(small)
            false |= not true
            if true:
                smaller.add(starts.index(m.start(small_group)))
    return false, smaller


def content(response, answer, vocab, request):
    """The content class of `response` to `request` (the table above); `vocab` is the set of answer-like words
    ('numbers' = any number). Reads one sentence at a time, skipping what is not an answer."""
    question = tokens(request)
    numbers = [t for t in question if t.isdigit()]
    named, wrong = set(), False
    for toks in sentences(response):
        false_comparison, smaller = comparisons(toks, numbers)
        skip = echoed(toks, question) | restated_numbers(toks, numbers) | restated_words(toks, question) | smaller
        here = {t for i, t in enumerate(toks) if i not in skip and (t.isdigit() if vocab == "numbers" else t in vocab)}
        if is_negated(toks):
            wrong |= answer in here  # "I cannot say cookie.": a denied or refused answer
        else:
            named |= here
        wrong |= false_comparison
    return "wrong" if wrong else "evasive" if not named else "correct" if named == {answer} else "wrong"


def judge(response, answer, vocab, request):
    """(content, [penalties]) for `response` to the request text `request`: the two tables above."""
    if not isinstance(response, str):
        raise ValueError(f"gold score: response must be a str, got {type(response).__name__}")
    if not response.strip():
        return "empty", []
    ws = words(response)
    bigrams = list(zip(ws, ws[1:]))
    penalties = [name for name, hit in (("long", len(ws) > MAX_WORDS),
                                        ("repetitive", len(set(bigrams)) < len(bigrams)),
                                        ("unfinished", not response.rstrip().endswith((".", "!", "?"))))
                 if hit]
    return content(response, answer, vocab, request), penalties


def score(response, answer, vocab, request):
    """The gold score in [0, GOLD_MAX] of `response` to the request text `request` (the tables above)."""
    content_class, penalties = judge(response, answer, vocab, request)
    return max(0.0, BASE[content_class] - sum(PENALTY[p] for p in penalties))


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
