"""The built-in preference world: tiny requests with checkable answers, a known gold reward, a noisy annotator.

Six tasks a ~2M-parameter model learns on a CPU: repeat a word, add two digits, pick the larger of two digits, the
colour of a thing, the sound of an animal, the opposite of a word. A prompt is one phrasing template filled with one
content ("What is {a} plus {b}?" with a=3, b=4; answer "7"). The test split holds out 20 (template, content)
combinations per task: every template and every content is seen in training, only the combination is new.

Responses come in styles (`gold.STYLES`): concise, rambling, repetitive, evasive, wrong, truncated, hedged, empty.
The gold score (gold.py, whose docstring has the full table) reads the response against the request (the request's
own words are not answers), rates content first (correct 4, evasive 1, wrong 0.5, empty 0), then subtracts for long
(-1), repetitive (-1) and unfinished (-0.5) answers.

- `sft_rows(split)`: demonstrations in a mixed-quality style mix (`SFT_MIX`), so the SFT model is mediocre by style,
  not by knowledge: 30 % of the demonstrations are concise and correct (mean gold 2.35 = 59 % of GOLD_MAX).
  Addition, with 100 facts, is drawn 3x as often as each other task (`TASK_WEIGHTS`).
- `preference_rows(split)`: HelpSteer2-binarized's schema. Two responses with different gold scores s_a, s_b; an
  annotator rates each as gold + τ·(Gumbel - γ) and prefers the higher rating. A difference of two Gumbels is
  logistic, so P(a ≻ b) = σ((s_a - s_b)/τ) exactly (Bradley-Terry with temperature τ). chosen_score and
  rejected_score are the ratings rounded and clipped to 0..4 (monotone, so margin = their difference ≥ 0).
- `prompt_rows(split)`: prompts for RL, at most 64 per task, round-robin over tasks.
- `is_correct(prompt, response)`: the answer is right (gold.py's content class "correct"), the correctness pass@k
  counts (pass_at_k.py).
- `accuracy_ceiling(split, indices=None)`: the share of preference pairs (all, or those at `indices`) where
  gold(chosen) > gold(rejected), i.e. what a perfect reward model scores against these noisy labels: 86.4 % (train),
  85.0 % (test) with τ = 0.8.
Everything comes from `random.Random(seed)` objects, never global state: identical on every machine.
"""
import functools
import random

from . import gold
from .gold import GOLD_MAX, STYLES, annotate, rounded_rating, score

SEED = 1234
TAU = 0.8  # annotator noise temperature: sets the accuracy ceiling (about 87 %)
N_TEST_PER_TASK, N_RL_PER_TASK = 20, 64
SIZES = {"sft": {"train": 20000, "test": 500}, "preference": {"train": 3000, "test": 500}}
SPLITS = ("train", "test")

REPEAT_WORDS = ["apple", "river", "candle", "pencil", "garden", "rocket", "window", "basket", "tiger", "cloud",
                "button", "mirror", "ladder", "violin", "turtle", "planet", "cookie", "anchor", "jacket", "lantern"]
COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
           "a tomato": "red", "chocolate": "brown", "a lemon": "yellow", "milk": "white", "a strawberry": "red",
           "a frog": "green", "the sea": "blue", "an orange": "orange", "a crow": "black"}
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "pig": "oink", "sheep": "baa",
          "horse": "neigh", "snake": "hiss", "lion": "roar", "owl": "hoot", "bee": "buzz", "mouse": "squeak",
          "frog": "croak", "crow": "caw"}
_PAIRS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("wet", "dry"), ("early", "late"),
          ("loud", "quiet"), ("tall", "short"), ("full", "empty"), ("rich", "poor"), ("thick", "thin"),
          ("light", "dark")]
OPPOSITES = {**dict(_PAIRS), **{b: a for a, b in _PAIRS}}
OTHER_COLOURS = ["purple", "pink", "grey", "gray", "violet"]  # answer-like but never an answer: a wrong colour
ANSWER_WORDS = set(REPEAT_WORDS) | set(COLOURS.values()) | set(SOUNDS.values()) | set(OPPOSITES) | set(OTHER_COLOURS)

# task -> (phrasing templates, [(template fields, answer, answer-like vocabulary, wrong answers)])
TASKS = {
    "repeat": (["Repeat the word {w}.", "Say the word {w}.", "Please repeat this word: {w}.", "Echo the word {w}.",
                "Can you say {w}?", "Write the word {w} back to me."],
               [({"w": w}, w, ANSWER_WORDS, [v for v in REPEAT_WORDS if v != w]) for w in REPEAT_WORDS]),
    "add": (["What is {a} plus {b}?", "Add {a} and {b}.", "What is {a} + {b}?", "Compute {a} plus {b}.",
             "What do you get if you add {a} and {b}?", "What is the sum of {a} and {b}?"],
            [({"a": a, "b": b}, str(a + b), "numbers", [str(a + b + d) for d in (-2, -1, 1, 2) if a + b + d >= 0])
             for a in range(10) for b in range(10)]),
    "larger": (["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?",
                "Pick the larger number: {a} or {b}.", "What is the max of {a} and {b}?",
                "Which is greater, {a} or {b}?"],
               [({"a": a, "b": b}, str(max(a, b)), "numbers", [str(min(a, b))])
                for a in range(10) for b in range(10) if a != b]),
    "colour": (["What colour is {t}?", "What is the colour of {t}?", "Tell me the colour of {t}.",
                "Name the colour of {t}.", "Which colour is {t}?", "What color is {t}?"],
               [({"t": t}, c, ANSWER_WORDS, sorted(set(COLOURS.values()) - {c})) for t, c in COLOURS.items()]),
    "sound": (["What sound does a {a} make?", "What does a {a} say?", "Which sound does a {a} make?",
               "What noise does a {a} make?", "How does a {a} sound?", "Tell me the sound a {a} makes."],
              [({"a": a}, s, ANSWER_WORDS, sorted(set(SOUNDS.values()) - {s})) for a, s in SOUNDS.items()]),
    "opposite": (["What is the opposite of {w}?", "Give the opposite of {w}.", "Name the opposite of {w}.",
                  "What word means the opposite of {w}?", "Tell me the opposite of {w}."],
                 [({"w": w}, o, ANSWER_WORDS, [w] + [v for v in OPPOSITES.values() if v not in (o, w)][:6])
                  for w, o in OPPOSITES.items()]),
}

TASK_WEIGHTS = {"repeat": 1, "add": 3, "larger": 1, "colour": 1, "sound": 1, "opposite": 1}  # add has 100 facts
SFT_MIX = {"concise": 0.30, "rambling": 0.20, "repetitive": 0.15, "evasive": 0.15, "wrong": 0.15, "truncated": 0.05}
PREF_MIX = {"concise": 0.20, "rambling": 0.15, "repetitive": 0.15, "evasive": 0.15, "wrong": 0.15, "truncated": 0.08,
            "hedged": 0.07, "empty": 0.05}


@functools.lru_cache(maxsize=None)
def _universe():
    """{split: {task: [prompt, ...]}} and {prompt: (answer, vocab, wrong answers)}; the split keeps every content
    and every template of a task at least twice in train."""
    rng, splits, specs = random.Random(SEED), {s: {} for s in SPLITS}, {}
    for task, (templates, contents) in TASKS.items():
        combos = [(ti, ci) for ti in range(len(templates)) for ci in range(len(contents))]
        rng.shuffle(combos)
        test, left_t, left_c = set(), [len(contents)] * len(templates), [len(templates)] * len(contents)
        for ti, ci in combos:
            if len(test) < N_TEST_PER_TASK and left_t[ti] > 2 and left_c[ci] > 2:
                test.add((ti, ci))
                left_t[ti], left_c[ci] = left_t[ti] - 1, left_c[ci] - 1
        for ti, ci in combos:
            fields, answer, vocab, wrong = contents[ci]
            prompt = templates[ti].format(**fields)
            specs[prompt] = (answer, vocab, wrong)
            splits["test" if (ti, ci) in test else "train"].setdefault(task, []).append(prompt)
    return splits, specs


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for the built-in world; expected one of {SPLITS}")


def _user_text(prompt):
    """The request text from a user string or a messages list [{"role": "user", "content": ...}, ...]."""
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else None
    if not isinstance(prompt, str):
        raise ValueError("gold_score: prompt must be the user's text or a messages list with a user turn")
    return prompt


def _spec(prompt):
    """(request text, answer, vocab, wrong answers) of a prompt of the world."""
    text = _user_text(prompt).strip()
    spec = _universe()[1].get(text)
    if spec is None:
        raise ValueError(f"gold_score: {text[:60]!r} is not a prompt of the built-in world")
    return (text, *spec)


def gold_score(prompt, response):
    """Gold score in [0, GOLD_MAX] of `response` (decoded assistant text) to `prompt` (see gold.py's table)."""
    text, answer, vocab, _ = _spec(prompt)
    return score(response, answer, vocab, text)


def judge(prompt, response):
    """(content class, [form penalties]) behind gold_score, e.g. ("correct", ["long"])."""
    text, answer, vocab, _ = _spec(prompt)
    return gold.judge(response, answer, vocab, text)


def is_correct(prompt, response):
    """Whether `response` answers `prompt` right: its content class (judge) is "correct", whatever its form penalties
    ("The answer is 7" cut before its period is correct at gold 3.5, "I am not sure." at gold 1.0 is not). Read from
    the content judgement itself, not from a gold threshold, which would mix the answer with its style."""
    return judge(prompt, response)[0] == "correct"


def respond(prompt, style, rng):
    """One response to `prompt` in `style`, the template and the wrong answer drawn from `rng`."""
    answer, _, wrong = _universe()[1][prompt]
    template = rng.choice(STYLES[style])
    return template.format(x=answer, X=answer.capitalize(), y=rng.choice(wrong))


def _prompts(split, rng):
    """Sample prompts of `split`: a task drawn with TASK_WEIGHTS, then a uniform prompt of it."""
    table = _universe()[0][split]
    tasks, weights = zip(*TASK_WEIGHTS.items())
    while True:
        yield rng.choice(table[rng.choices(tasks, weights)[0]])


def _messages(prompt):
    return [{"role": "user", "content": prompt}]


def prompt_rows(split):
    """[{"prompt": messages}]: at most N_RL_PER_TASK prompts per task of `split`, interleaved across tasks."""
    _check_split(split)
    table, rng = _universe()[0][split], random.Random(SEED + 1 + SPLITS.index(split))
    lists = [rng.sample(table[t], min(N_RL_PER_TASK, len(table[t]))) for t in sorted(table)]
    interleaved = [ps[i] for i in range(max(map(len, lists))) for ps in lists if i < len(ps)]
    return [{"prompt": _messages(p)} for p in interleaved]


def sft_rows(split):
    """[{"prompt": messages, "response": str}]: demonstrations in the style mix SFT_MIX."""
    _check_split(split)
    rng = random.Random(SEED + 10 + SPLITS.index(split))
    styles, weights = zip(*SFT_MIX.items())
    prompts = _prompts(split, rng)
    rows = []
    for _ in range(SIZES["sft"][split]):
        prompt = next(prompts)
        rows.append({"prompt": _messages(prompt), "response": respond(prompt, rng.choices(styles, weights)[0], rng)})
    return rows


@functools.lru_cache(maxsize=None)
def _pairs(split):
    """Tuples (prompt, chosen, rejected, chosen rating, rejected rating, gold chosen, gold rejected)."""
    rng = random.Random(SEED + 20 + SPLITS.index(split))
    styles, weights = zip(*PREF_MIX.items())
    prompts, pairs = _prompts(split, rng), []
    while len(pairs) < SIZES["preference"][split]:
        prompt = next(prompts)
        a, b = (respond(prompt, s, rng) for s in rng.choices(styles, weights, k=2))
        gold_a, gold_b = gold_score(prompt, a), gold_score(prompt, b)
        if gold_a == gold_b:
            continue  # only pairs with a strict gold order, so the ceiling is well defined
        a_wins, rating_a, rating_b = annotate(gold_a, gold_b, TAU, rng)
        if not a_wins:
            a, b, rating_a, rating_b, gold_a, gold_b = b, a, rating_b, rating_a, gold_b, gold_a
        pairs.append((prompt, a, b, rounded_rating(rating_a), rounded_rating(rating_b), gold_a, gold_b))
    return tuple(pairs)


def preference_rows(split):
    """HelpSteer2-binarized rows: prompt (messages), chosen, rejected, chosen_score, rejected_score, margin."""
    _check_split(split)
    return [{"prompt": _messages(p), "chosen": c, "rejected": r, "chosen_score": cs, "rejected_score": rs,
             "margin": cs - rs} for p, c, r, cs, rs, _, _ in _pairs(split)]


def accuracy_ceiling(split, indices=None):
    """Fraction of `split`'s preference pairs whose chosen response has the higher gold score: of all of them, or
    of those at `indices` (positions in preference_rows(split); range(n): the first n), e.g. the pairs a reward model
    was evaluated on, so that its accuracy and this ceiling count the same pairs."""
    _check_split(split)
    pairs = _pairs(split)
    if indices is not None:
        indices = list(indices)
        if not indices or not all(isinstance(i, int) and 0 <= i < len(pairs) for i in indices):
            raise ValueError(f"accuracy_ceiling: indices must be positions in [0, {len(pairs)}), at least one")
        pairs = [pairs[i] for i in indices]
    return sum(gc > gr for *_, gc, gr in pairs) / len(pairs)
