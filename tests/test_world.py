"""The built-in world: determinism, schemas, the gold table, the noisy annotator, the ceiling, the splits."""
import math
import random

import pytest

from minirlhf.data import gold, world

SPLITS = ("train", "test")


def _prompts(split):
    return [row["prompt"][0]["content"] for row in world.prompt_rows(split)]


# ---- determinism and schemas -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [world.preference_rows, world.prompt_rows, world.sft_rows])
def test_deterministic(fn):
    for split in SPLITS:
        assert fn(split) == fn(split)


@pytest.mark.parametrize("fn", [world.preference_rows, world.prompt_rows, world.sft_rows, world.accuracy_ceiling])
def test_unknown_split_is_a_clear_error(fn):
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        fn("validation")


def _is_messages(m):
    return (isinstance(m, list) and len(m) == 1 and m[0]["role"] == "user" and isinstance(m[0]["content"], str)
            and m[0]["content"])


def test_preference_schema_and_sizes():
    for split, size in (("train", 3000), ("test", 500)):
        rows = world.preference_rows(split)
        assert len(rows) == size
        for r in rows:
            assert set(r) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "margin"}
            assert _is_messages(r["prompt"]) and isinstance(r["chosen"], str) and isinstance(r["rejected"], str)
            assert all(isinstance(r[k], float) for k in ("chosen_score", "rejected_score", "margin"))
            assert r["chosen_score"] in (0.0, 1.0, 2.0, 3.0, 4.0) and r["rejected_score"] in (0.0, 1.0, 2.0, 3.0, 4.0)
            assert r["margin"] == r["chosen_score"] - r["rejected_score"] >= 0
            # only pairs with a strict gold order
            assert world.gold_score(r["prompt"], r["chosen"]) != world.gold_score(r["prompt"], r["rejected"])


def test_sft_and_prompt_schema():
    for split in SPLITS:
        sft = world.sft_rows(split)
        assert all(set(r) == {"prompt", "response"} and _is_messages(r["prompt"]) and isinstance(r["response"], str)
                   for r in sft)
        prompts = world.prompt_rows(split)
        assert all(set(r) == {"prompt"} and _is_messages(r["prompt"]) for r in prompts)
        assert len({r["prompt"][0]["content"] for r in prompts}) == len(prompts)  # no duplicates
    assert len(world.prompt_rows("test")) == 6 * world.N_TEST_PER_TASK


def test_sft_is_mediocre_by_style_mix():
    """About SFT_MIX['concise'] of the demonstrations are the best style; the mean gold sits mid-scale."""
    rows = world.sft_rows("train")
    scores = [world.gold_score(r["prompt"], r["response"]) for r in rows]
    assert abs(sum(s == world.GOLD_MAX for s in scores) / len(scores) - world.SFT_MIX["concise"]) < 0.02
    assert 0.45 * world.GOLD_MAX < sum(scores) / len(scores) < 0.65 * world.GOLD_MAX


# ---- splits ------------------------------------------------------------------------------------------------------

def test_train_and_test_prompts_are_disjoint():
    train, test = world._universe()[0]["train"], world._universe()[0]["test"]
    all_train = {p for ps in train.values() for p in ps}
    all_test = {p for ps in test.values() for p in ps}
    assert all_train.isdisjoint(all_test)
    for split, held_out in (("train", all_test), ("test", all_train)):
        for fn in (world.prompt_rows, world.sft_rows, world.preference_rows):
            assert not {r["prompt"][0]["content"] for r in fn(split)} & held_out


def test_held_out_answers_were_seen_in_training():
    """Held out are combinations only: every test answer is taught by some train prompt of the same task."""
    train, test = world._universe()[0]["train"], world._universe()[0]["test"]
    specs = world._universe()[1]
    for task, prompts in test.items():
        assert {specs[p][0] for p in prompts} <= {specs[p][0] for p in train[task]}, task


# ---- gold score --------------------------------------------------------------------------------------------------

# (prompt, response, gold): the table of gold.py's docstring, one line per rule
GOLD_TABLE = [
    ("What is 3 plus 4?", "The answer is 7.", 4.0),
    ("What is 3 plus 4?", "7.", 4.0),
    ("What is 3 plus 4?", "The answer is 7", 3.5),                       # unfinished
    ("What is 3 plus 4?", "Sure, I can help with that. It is 7. Have a nice day!", 3.0),  # long
    ("What is 3 plus 4?", "It is 7. It is 7. It is 7.", 2.0),            # long + repetitive
    ("What is 3 plus 4?", "7 7 7", 2.5),                                 # repetitive + unfinished
    ("What is 3 plus 4?", "I am not sure about that.", 1.0),             # evasive
    ("What is 3 plus 4?", "I think 8.", 0.5),                            # wrong
    ("What is 3 plus 4?", "It is 7 or 8.", 0.5),                         # hedged = wrong
    ("What is 3 plus 4?", "It is 17.", 0.5),                             # a number is read whole
    ("What is 3 plus 4?", "Sure, I can help with", 0.5),                 # truncated, no answer
    ("What is 3 plus 4?", "", 0.0),
    ("What is 3 plus 4?", "   \n ", 0.0),
    ("Which is larger, 3 or 8?", "8!", 4.0),
    ("Which is larger, 3 or 8?", "3.", 0.5),
    ("What sound does a cow make?", "MOO!!", 4.0),                     # case and punctuation are ignored
    ("What sound does a cow make?", "It is woof.", 0.5),
    ("What is the opposite of hot?", "It is hot.", 0.5),
    ("What is the opposite of hot?", "It is apple.", 0.5),              # any answer word of the world counts
    ("Repeat the word tiger.", "tiger", 3.5),
    ("What colour is the sky?", "xq zz@@## ...", 1.0),                   # junk: evasive
    ("What colour is the sky?", "la la la la la la la la la la.", 0.0),  # junk, long and repetitive
    ("What colour is the sky?", "blue " * 50, 1.5),                      # correct but degenerate: still > 1
]


@pytest.mark.parametrize("prompt, response, expected", GOLD_TABLE)
def test_gold_table(prompt, response, expected):
    assert world.gold_score(prompt, response) == expected
    assert world.gold_score([{"role": "user", "content": prompt}], response) == expected  # messages work too


EXPECTED_BY_STYLE = {"concise": {4.0}, "rambling": {3.0}, "repetitive": {2.0}, "evasive": {1.0}, "wrong": {0.5},
                     "truncated": {0.5}, "hedged": {0.5}, "empty": {0.0}}


def test_every_templated_style_scores_its_table_value_on_every_prompt():
    assert set(EXPECTED_BY_STYLE) == set(gold.STYLES)
    for prompt, (answer, _, wrong) in world._universe()[1].items():
        for style, templates in gold.STYLES.items():
            for t in templates:
                for y in wrong[:2]:
                    r = t.format(x=answer, X=answer.capitalize(), y=y)
                    assert world.gold_score(prompt, r) in EXPECTED_BY_STYLE[style], (prompt, r)


def test_style_templates_use_no_answer_words():
    """Filler words must never be read as an answer."""
    for templates in gold.STYLES.values():
        for t in templates:
            assert not set(gold.words(t.replace("{x}", "").replace("{X}", "").replace("{y}", ""))) & world.ANSWER_WORDS


def test_correctness_dominates_and_range():
    """Property: on random junk and random edits, the score is in [0, 4] and correct >= 1.5 > anything else."""
    rng = random.Random(0)
    vocab = sorted(world.ANSWER_WORDS) + [str(i) for i in range(20)] + ["the", "is", "it", ".", "!", "?", " ", "\n"]
    for prompt in rng.sample(sorted(world._universe()[1]), 60):
        for _ in range(30):
            response = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 14)))
            s = world.gold_score(prompt, response)
            content, _ = world.judge(prompt, response)
            assert 0.0 <= s <= world.GOLD_MAX
            assert (s >= 1.5) if content == "correct" else (s <= 1.0)


def test_gold_errors_are_one_line_value_errors():
    with pytest.raises(ValueError, match="not a prompt of the built-in world"):
        world.gold_score("What is the capital of France?", "Paris.")
    with pytest.raises(ValueError, match="response must be a str"):
        world.gold_score("What is 3 plus 4?", None)
    with pytest.raises(ValueError, match="messages list with a user turn"):
        world.gold_score([{"role": "system", "content": "hi"}], "7.")


# ---- the noisy annotator and the ceiling -------------------------------------------------------------------------

@pytest.mark.parametrize("delta, tau", [(0.5, 0.8), (1.5, 0.8), (1.0, 0.4), (-1.0, 1.3)])
def test_annotator_is_bradley_terry(delta, tau):
    """P(a preferred) = σ(Δ/τ): Monte Carlo over n draws, tolerance 4 standard errors."""
    rng, n = random.Random(7), 40000
    wins = sum(world.annotate(2.0 + delta, 2.0, tau, rng)[0] for _ in range(n))
    p = 1 / (1 + math.exp(-delta / tau))
    assert abs(wins / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_annotator_ratings_are_unbiased():
    """The Gumbel noise is centred (Gumbel - γ): mean rating = gold, within 4 standard errors."""
    rng, n, tau = random.Random(3), 40000, 0.8
    ratings = [world.annotate(2.5, 1.0, tau, rng)[1] for _ in range(n)]
    sd = tau * math.pi / math.sqrt(6)
    assert abs(sum(ratings) / n - 2.5) < 4 * sd / math.sqrt(n)


def test_accuracy_ceiling_matches_sigma_formula():
    """The ceiling is 80-90 % and agrees with the mean of σ(|Δgold|/τ) over the pairs (sampling tolerance)."""
    for split in SPLITS:
        ceiling = world.accuracy_ceiling(split)
        assert 0.80 <= ceiling <= 0.90
        pairs = world._pairs(split)
        expected = sum(1 / (1 + math.exp(-abs(gc - gr) / world.TAU)) for *_, gc, gr in pairs) / len(pairs)
        assert abs(ceiling - expected) < 4 * math.sqrt(expected * (1 - expected) / len(pairs))


def test_accuracy_ceiling_of_some_pairs():
    """accuracy_ceiling(split, indices): the same count over the pairs at those positions of preference_rows(split)
    (gold is recomputed here from the rows' texts); all of them by default, as before."""
    rows = world.preference_rows("test")
    right = [world.gold_score(r["prompt"], r["chosen"]) > world.gold_score(r["prompt"], r["rejected"]) for r in rows]
    assert world.accuracy_ceiling("test") == sum(right) / len(rows)
    assert world.accuracy_ceiling("test", range(len(rows))) == world.accuracy_ceiling("test")
    for indices in (range(48), [3, 1, 4, 1, 5, 9, 2, 6], range(100, 500, 7)):
        indices = list(indices)
        assert world.accuracy_ceiling("test", indices) == sum(right[i] for i in indices) / len(indices)
    assert world.accuracy_ceiling("test", range(48)) != world.accuracy_ceiling("test")  # so the choice matters
    for bad in ([], [len(rows)], [-1], [0.5]):
        with pytest.raises(ValueError, match="indices"):
            world.accuracy_ceiling("test", bad)
