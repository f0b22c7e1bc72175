"""The gold judge on answers a real instruct model writes: the rules of gold.py's "not answers" table, task by task.

LABELLED is the labelled set: (request, response, content class, gold score). Responses marked "real" are
SmolLM2-135M-Instruct's own words on these requests; the others are written in its style (short sentences, polite
openers and closers, markdown, restating the question). Each row is one assertion that fails if a rule moves.
"""
import random

import pytest

from minirlhf.data import gold, world

C, E, W = "correct", "evasive", "wrong"

LABELLED = [
    # ---- repeat -----------------------------------------------------------------------------------------------
    ("Say the word cookie.", "Cookie.", C, 4.0),
    ("Say the word cookie.", "cookie", C, 3.5),                                      # unfinished
    ("Say the word cookie.", "The word is cookie.", C, 4.0),
    ("Say the word cookie.", "Sure! Here it is: **cookie**.", C, 4.0),
    ("Say the word cookie.", "Say the word cookie.", E, 1.0),                        # an echo is not an answer
    ("Say the word cookie.", "Say the word cookie. Cookie!", C, 4.0),                # echo, then the answer
    ("Say the word cookie.", 'There is no word for "cookie" in Persian.', W, 0.5),   # negation names the answer
    ("Say the word cookie.", "I cannot say cookie.", W, 0.5),                        # refusal naming the answer
    ("Say the word cookie.", "Sorry, I can't do that.", E, 1.0),                     # refusal naming nothing
    ("Repeat the word turtle.", 'The word "turtle" is a reptile.', C, 4.0),          # real
    ("Please repeat this word: candle.", "A candle.", C, 4.0),                       # real
    ("Repeat the word lantern.", "Lamp.", E, 1.0),                                   # real
    ("Write the word tiger back to me.", "Tiger, tiger.", C, 4.0),
    # ---- add --------------------------------------------------------------------------------------------------
    ("What is 6 plus 4?", "10.", C, 4.0),
    ("What is 6 plus 4?", "6 plus 4 equals 10.", C, 4.0),                            # the question's numbers skipped
    ("What is 6 plus 4?", "6 plus 4 equals 11.", W, 0.5),                            # a sum is judged by its result
    ("What is 6 plus 4?", "Sure! The sum of 6 and 4 is 10.", C, 3.0),                # long
    ("What is 6 plus 4?", "4 + 6 = **10**", C, 3.5),                                 # either order; unfinished
    ("What is 6 plus 4?", "The answer is **10**.", C, 4.0),
    ("What is 6 plus 4?", "What is 6 plus 4? 10.", C, 4.0),                          # echo, then the answer
    ("What is 6 plus 4?", "Six plus four is ten.", C, 4.0),                          # number words
    ("What is 6 plus 4?", "It is 10, not 11.", W, 0.5),                              # negated sentence names 10
    ("What is 6 plus 4?", "It is not 11. It is 10.", C, 3.0),                        # negated words skipped; repetitive
    ("What is 6 plus 4?", "6 plus 4 is 9. So 9.", W, 0.5),
    ("What is 6 plus 4?", "The answer is 10. Don't hesitate to ask for more!", C, 3.0),  # negation elsewhere; long
    ("What is the sum of 1 and 1?", "The sum of the two numbers is 2.", C, 4.0),     # "two" is not read
    ("What is 0 plus 5?", "0 plus 5 equals 5.", C, 4.0),                             # the answer is a question number
    ("What is 0 plus 2?", "I think 0.", W, 0.5),                                     # a question number alone counts
    ("Add 8 and 5.", "8 + 5 = 13", C, 3.5),                                          # real
    ("Add 6 and 5.", "You have added 5 and 6.", E, 1.0),                             # real: a restatement only
    ("What is the sum of 9 and 6?", "The sum of 9 and 6 is 55.", W, 0.5),            # real
    ("What is 2 + 7?", "The answer to 2 + 7 is 11.", W, 0.5),                        # real
    ("What is 1 plus 5?", "1 + 5 equals 6.", C, 4.0),                                # real
    # ---- larger -----------------------------------------------------------------------------------------------
    ("Which is larger, 2 or 7?", "7.", C, 4.0),
    ("Which is larger, 2 or 7?", "2.", W, 0.5),
    ("Which is larger, 2 or 7?", "7 is larger than 2.", C, 4.0),                     # smaller side skipped
    ("Which is larger, 5 or 6?", "5 is bigger than 6.", W, 0.5),                     # false comparison
    ("Which is larger, 2 or 7?", "2 is smaller than 7.", C, 4.0),
    ("Which is larger, 2 or 7?", "7 > 2", C, 3.5),
    ("Which is larger, 2 or 7?", "2 < 7.", C, 4.0),
    ("Which is larger, 2 or 7?", "2 > 7.", W, 0.5),
    ("Which is larger, 2 or 7?", "7 is larger and 2 is smaller.", C, 4.0),
    ("Which is larger, 2 or 7?", "2 is smaller.", E, 1.0),                           # true, but no answer
    ("Which is larger, 2 or 7?", "7 is smaller.", W, 0.5),                           # "X is smaller" is false
    ("Which is larger, 2 or 7?", "Between 2 and 7, the larger is 7.", C, 4.0),
    ("Which is larger, 2 or 7?", "The larger one is 7.", C, 4.0),                    # "one" is not read
    ("Which is larger, 2 or 7?", "It is 7 or 2.", W, 0.5),                           # hedged: "or" is no restatement
    ("Which is larger, 2 or 7?", "Which is larger, 2 or 7?", E, 1.0),                # echo
    ("Which is larger, 2 or 7?", "2 is not larger than 7.", W, 0.5),                 # negated sentence names 7
    ("Which is greater, 0 or 5?", "0 is greater than 5.", W, 0.5),                   # real
    ("Which is greater, 2 or 6?", "The answer is 2 is greater than 6.", W, 0.5),     # real
    ("Which is greater, 3 or 8?", "**8** is greater than 3.", C, 4.0),
    ("What is the max of 4 and 9?", "The maximum of 4 and 9 is 18.", W, 0.5),        # real
    ("What is the max of 4 and 9?", "Max = 9", C, 3.5),                              # real
    ("Which is larger, 6 or 7?", "The larger of the two is 7. The smaller of the two is 6.", C, 2.0),  # real-like
    # ---- colour -----------------------------------------------------------------------------------------------
    ("What colour is a lemon?", "A lemon is yellow.", C, 4.0),
    ("What colour is a lemon?", "Lemons are YELLOW!", C, 4.0),
    ("What colour is a lemon?", "A lemon is not yellow.", W, 0.5),
    ("What colour is a lemon?", "A lemon is yellow or green.", W, 0.5),
    ("What colour is an orange?", "An orange is orange.", C, 4.0),                  # the question word is the answer
    ("Name the colour of an orange.", "The colour of an orange is purple.", W, 0.5),  # "of an orange" skipped
    ("What color is the sky?", "The sky is blue. Let me know if you have any other questions!", C, 3.0),
    ("Tell me the colour of the sky.", "The sky is a beautiful shade of blue. It's a wonder to behold, isn't it?",
     C, 3.0),                                                                        # real
    # ---- sound ------------------------------------------------------------------------------------------------
    ("What sound does a cow make?", "A cow says moo.", C, 4.0),
    ("What sound does a cow make?", "Cows go 'MOO'!", C, 4.0),
    ("What does a dog say?", "Woof woof!", C, 4.0),
    ("What sound does a cow make?", "I'm not sure, but I think it says moo.", W, 0.0),  # negation; long
    ("What sound does a cow make?", "A cow says woof.", W, 0.5),
    ("What sound does a lion make?", "A lion makes a majestic sound.", E, 1.0),         # no answer-like word
    # ---- opposite ---------------------------------------------------------------------------------------------
    ("What is the opposite of thick?", "The opposite of thick is thin.", C, 4.0),
    ("What is the opposite of quiet?", "The opposite of quiet is loud.", C, 4.0),
    ("What is the opposite of thick?", "Thin.", C, 4.0),
    ("What is the opposite of thick?", "Thick.", W, 0.5),
    ("What is the opposite of thick?", "Thin is the opposite of thick.", C, 4.0),
    ("What is the opposite of thick?", "Thick is the opposite of thin.", C, 4.0),
    ("What is the opposite of thick?", "The opposite of thick is thick.", W, 0.5),
    ("What is the opposite of thick?", "What is the opposite of thick?", E, 1.0),    # echo
    ("What is the opposite of hot?", "The opposite of hot is cold or wet.", W, 0.5),
    ("Give the opposite of hot.", "**Cold**", C, 3.5),
]


@pytest.mark.parametrize("request_text, response, content, expected", LABELLED)
def test_labelled(request_text, response, content, expected):
    assert world.judge(request_text, response)[0] == content
    assert world.gold_score(request_text, response) == expected


@pytest.mark.parametrize("request_text, response, content, expected", LABELLED)
def test_is_correct_is_the_labelled_content_not_a_gold_threshold(request_text, response, content, expected):
    assert world.is_correct(request_text, response) is (content == C)


def test_is_correct_on_every_style_of_every_request():
    # by hand: the styles that state the right answer alone are correct, whatever their form penalties (rambling 3.0,
    # repetitive 2.0); truncated ("The answer is"), evasive, wrong, hedged and empty ones are not
    right = {"concise", "rambling", "repetitive"}
    rng = random.Random(0)
    for request_text, _ in _requests():
        for style in gold.STYLES:
            response = world.respond(request_text, style, rng)
            assert world.is_correct(request_text, response) is (style in right), (request_text, style, response)
    assert world.is_correct("What is 6 plus 4?", "10") and world.gold_score("What is 6 plus 4?", "10") == 3.5
    assert not world.is_correct("What is 6 plus 4?", "") and not world.is_correct("What is 6 plus 4?", "   ")


def test_labelled_set_covers_every_task_and_class():
    task_of = {p: task for split in world.SPLITS for task, ps in world._universe()[0][split].items() for p in ps}
    assert {task_of[request_text] for request_text, *_ in LABELLED} == set(world.TASKS)
    assert {content for *_, content, _ in LABELLED} == {C, E, W}
    assert len(LABELLED) >= 40


# ---- rules on every request of the world -------------------------------------------------------------------------

def _requests():
    return sorted(world._universe()[1].items())


def test_an_echo_is_evasive_and_an_echo_then_the_answer_is_correct():
    for request_text, (answer, _, _) in _requests():
        assert world.judge(request_text, request_text)[0] == E, request_text
        assert world.judge(request_text, f"{request_text} The answer is {answer}.")[0] == C, request_text


def test_a_negated_or_refused_answer_is_wrong():
    for request_text, (answer, _, _) in _requests():
        for response in (f"It is not {answer}.", f"I cannot say {answer}.", f"I can't say {answer}.",
                         f"There is no {answer} here.", f"I don't think it is {answer}."):
            assert world.judge(request_text, response)[0] == W, (request_text, response)


def test_sums_and_comparisons_are_checked():
    for a in range(10):
        for b in range(10):
            add = f"What is {a} plus {b}?"
            assert world.judge(add, f"{a} plus {b} equals {a + b}.")[0] == C
            assert world.judge(add, f"{b} + {a} = {a + b}.")[0] == C
            assert world.judge(add, f"{a} plus {b} equals {a + b + 1}.")[0] == W
            if a == b:
                continue
            larger, big, small = f"Which is larger, {a} or {b}?", max(a, b), min(a, b)
            for response in (f"{big} is larger than {small}.", f"{small} is smaller than {big}.", f"{big} > {small}.",
                             f"{small} < {big}.", f"{big} is larger and {small} is smaller."):
                assert world.judge(larger, response)[0] == C, (larger, response)
            for response in (f"{small} is larger than {big}.", f"{big} is smaller than {small}.", f"{small}.",
                             f"{big} is smaller.", f"It is {big} or {small}."):
                assert world.judge(larger, response)[0] == W, (larger, response)


# ---- the small pure functions ------------------------------------------------------------------------------------

def test_tokens_and_sentences():
    assert gold.tokens("Six + 4 isn't **10**") == ["6", "+", "4", "isn't", "10"]
    assert gold.tokens("The larger one: two!") == ["the", "larger", "one", "two"]  # "one" and "two" stay words
    assert gold.sentences("Sure! It is 7.\n\nBye;") == [["sure"], ["it", "is", "7"], ["bye"]]


def test_is_negated():
    for text in ("not", "No, thanks", "I cannot", "can't", "don’t", "never", "nothing"):
        assert gold.is_negated(gold.tokens(text)), text
    for text in ("I know", "note", "the answer is 7", "want", "nobody's here"):
        assert not gold.is_negated(gold.tokens(text)), text


def test_comparisons():
    toks = gold.tokens("7 is larger than 3 and 3 < 7")
    assert gold.comparisons(toks, ["3", "7"]) == (False, {4, 6})
    assert gold.comparisons(gold.tokens("5 is bigger than 6"), ["5", "6"])[0] is True
    assert gold.comparisons(gold.tokens("6 is smaller"), ["5", "6"]) == (True, set())
    assert gold.comparisons(gold.tokens("the smaller number is 5"), ["5", "6"]) == (False, {4})


def test_restatements():
    assert gold.restated_numbers(gold.tokens("The sum of 6 and 4 is 10"), ["6", "4"]) == {3, 5}
    assert gold.restated_numbers(gold.tokens("Either 6 or 4"), ["6", "4"]) == set()
    question = gold.tokens("What is the opposite of thick?")
    assert gold.restated_words(gold.tokens("The opposite of thick is thin"), question) == {3}
    assert gold.restated_words(gold.tokens("It is thick"), question) == set()
    assert gold.echoed(gold.tokens("Sure. What is the opposite of thick? Thin."), question) == set(range(1, 7))
