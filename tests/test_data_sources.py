"""Data-set loaders. Each file in tests/fixtures/ holds a handful of rows in one Hub data set's RAW schema, ugly rows
included; it goes through the real loader (data_files=) and we compare with the exact normalised rows and the exact
one-line skip report. HelpSteer2's rationale / difficulty fields are placeholders: the loader never reads them."""
import json
import math
import warnings
import zlib
from pathlib import Path

import pytest
from datasets import Dataset

from minirlhf.data import (KNOWN_PREFERENCE_DATASETS, KNOWN_PROMPT_DATASETS, load_preference_dataset,
                           load_prompt_dataset, loading, world)
from minirlhf.data.sources import MAX_PAIRS_PER_QUESTION, helpsteer2_messages, hh_messages, stack_exchange_score

FIXTURES = Path(__file__).parent / "fixtures"
HELPSTEER, ULTRAFEEDBACK = "juyoungml/HelpSteer2-binarized", "argilla/ultrafeedback-binarized-preferences-cleaned"
HH, SE_PAIRED = "Anthropic/hh-rlhf", "lvwerra/stack-exchange-paired"
SE_PREFS = "HuggingFaceH4/stack-exchange-preferences"


def user(text):
    return [{"role": "user", "content": text}]


def scored(prompt, chosen, rejected, chosen_score, rejected_score, margin=None):
    margin = chosen_score - rejected_score if margin is None else margin
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_score": chosen_score,
            "rejected_score": rejected_score, "margin": margin}


def load(loader, name, fixture, split="train"):
    """(rows, the loader's warning lines) for one fixture file."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = loader(name, split, data_files=str(FIXTURES / fixture))
    return data.to_list(), [str(w.message) for w in caught if str(w.message).startswith(name)]


def test_helpsteer2_rows_and_skips():
    rows, report = load(load_preference_dataset, HELPSTEER, "helpsteer2_binarized.jsonl")
    assert rows == [
        scored(user("What is the capital of France?"), "Paris is the capital of France.", "Lyon.", 4.0, 1.0, 3.0),
        scored([{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7 is prime."},
                {"role": "user", "content": "Name a bigger one."}], "11 is a bigger prime.", "8 is bigger.",
               3.5, 2.0, 1.5),
        scored(user("Say hi."), " Hi!", "Goodbye.", 3.0, 0.0, 3.0),  # prompt stripped, response verbatim
    ]
    assert report == [f"{HELPSTEER} [train]: kept 3 rows from 9 raw rows; skipped 1 × empty prompt, "
                      "1 × empty response, 1 × identical responses, 2 × missing field, 1 × non-string response"]


def test_split_names_index_a_dict_of_data_files():
    path = str(FIXTURES / "helpsteer2_binarized.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        test = load_preference_dataset(HELPSTEER, "test", data_files={"validation": path})
        assert load_preference_dataset(HELPSTEER, "validation", data_files={"validation": path}).to_list() \
            == test.to_list()
    assert len(test) == 3
    with pytest.raises(ValueError, match="no 'train' entry"):
        load_preference_dataset(HELPSTEER, "train", data_files={"validation": path})


def test_helpsteer2_multi_turn_prompt():
    assert helpsteer2_messages("a\n<extra_id_1>Assistant\nb\n\nc\n<extra_id_1>User\nd") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b\n\nc"}, {"role": "user", "content": "d"}]


def test_ultrafeedback_rows_and_fixed_holdout():
    train, report = load(load_preference_dataset, ULTRAFEEDBACK, "ultrafeedback_binarized_cleaned.jsonl")
    test, _ = load(load_preference_dataset, ULTRAFEEDBACK, "ultrafeedback_binarized_cleaned.jsonl", split="test")
    assert train == [
        scored(user("How do I reverse a list in Python?"), "Use my_list[::-1] or my_list.reverse().", "You cannot.",
               4.75, 1.5),
        scored(user("Why is the sky blue?"), "Rayleigh scattering of sunlight.", "Because of the ocean.", 5.0, 2.0),
    ]
    assert test == [scored(user("How do I copy a set in Python?"), "Call s.copy() or set(s).",
                           "Use copy.deepcopy always.", 4.5, 2.25)]
    assert report == [f"{ULTRAFEEDBACK} [train]: kept 2 rows from 5 raw rows; skipped 1 × identical responses, "
                      "1 × missing field, 1 × no final assistant turn"]
    # the rule, restated independently: crc32 of the prompt text, mod 100, below HOLDOUT_PERCENT
    for row in train + test:
        held_out = zlib.crc32(row["prompt"][0]["content"].encode("utf-8")) % 100 < loading.HOLDOUT_PERCENT
        assert held_out == (row in test)


def test_hh_rlhf_rows_and_skips():
    rows, report = load(load_preference_dataset, HH, "hh_rlhf_helpful_base.jsonl")
    assert rows == [
        {"prompt": user("What is 2+2?"), "chosen": "2+2 is 4.", "rejected": "It is 5."},
        {"prompt": [{"role": "user", "content": "Give me a short list."},
                    {"role": "assistant", "content": "Sure:\n- one\n- two"},
                    {"role": "user", "content": "Thanks! One more item,\nplease."}],
         "chosen": "- three\n\nThat makes three items.", "rejected": "No."},
    ]
    assert report == [f"{HH} [train]: kept 2 rows from 5 raw rows; skipped 1 × chosen and rejected prompts differ, "
                      "1 × empty response, 1 × malformed transcript"]


def test_hh_messages_joins_continuation_lines():
    transcript = "\n\nHuman: line one\nline two\n\n\nAssistant: a\nHuman:b\n\nAssistant:"
    assert hh_messages(transcript) == [
        {"role": "user", "content": "line one\nline two"}, {"role": "assistant", "content": "a"},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": ""}]
    assert hh_messages("preamble\n\nHuman: hi") is None
    assert hh_messages(None) is None


def test_stack_exchange_preferences_pairs():
    rows, report = load(load_preference_dataset, SE_PREFS, "stack_exchange_preferences.jsonl")
    q1, q2, q4 = (user(f"<p>{q}</p>") for q in ("How do I reverse a list in Python?",
                                                "What does the yield keyword do?", "How do I sort a dict by value?"))
    # question 2 has answers scored 0..5: 15 pairs, all untied; the 10 with the largest gaps (>= 2) are kept, equal
    # gaps in answer-list order
    kept = [(5, 0), (4, 0), (5, 1), (3, 0), (4, 1), (5, 2), (2, 0), (3, 1), (4, 2), (5, 3)]
    assert len(kept) == MAX_PAIRS_PER_QUESTION
    assert rows == [
        scored(q1, "<p>Use <code>reversed()</code>.</p>", "<p>Loop backwards.</p>", 5.0, 2.0),
        scored(q1, "<p>Use <code>reversed()</code>.</p>", "<p>Use a stack.</p>", 5.0, 2.0),  # 2 vs 2: tied, skipped
        *[scored(q2, f"<p>Answer scored {c}.</p>", f"<p>Answer scored {r}.</p>", float(c), float(r)) for c, r in kept],
        scored(q4, "<p>sorted(d.items(), key=...)</p>", "<p>You cannot sort a dict.</p>", 4.0, -1.0),
    ]
    assert report == [f"{SE_PREFS} [train]: kept 13 rows from 4 raw rows; skipped 5 × pair beyond 10 per question, "
                      "1 × question without two differently scored answers, 2 × tied pair, 1 × unusable answer"]
    test, _ = load(load_preference_dataset, SE_PREFS, "stack_exchange_preferences.jsonl", split="test")
    assert test == [scored(user("<p>How do I merge two lists?</p>"), "<p>a + b</p>", "<p>Use a loop.</p>", 2.0, 0.0)]


@pytest.mark.parametrize("upvotes, accepted, expected", [
    (0, False, 0), (0, True, 1), (1, False, 1), (1, True, 2), (3, False, 2), (3, True, 3), (-2, False, -1),
    (-2, True, -1), (2, False, 2), (10, False, 3), (100, True, 8)])
def test_stack_exchange_score_table(upvotes, accepted, expected):
    # log2(1+u) for u = 0, 1, 3, 2, 10, 100: 0, 1, 2, 1.58, 3.46, 6.66
    assert stack_exchange_score(upvotes, accepted) == expected


def test_stack_exchange_score_rounding_choice_cannot_matter():
    # half-up vs Python's half-to-even only differ on exact halves, which log2(1 + integer) never is
    assert all(stack_exchange_score(u, False) == round(math.log2(1 + u)) for u in range(100_000))
    with pytest.raises(ValueError, match="must be an int"):
        stack_exchange_score(2.5, False)


def test_stack_exchange_paired_rows_and_parquet(tmp_path):
    rows, report = load(load_preference_dataset, SE_PAIRED, "stack_exchange_paired.jsonl")
    assert rows == [
        {"prompt": user("How do I reverse a list in Python?"), "chosen": "Use `reversed(xs)` or `xs[::-1]`.",
         "rejected": "Lists cannot be reversed."},
        {"prompt": user("What does the yield keyword do?"), "chosen": "It turns the function into a generator.",
         "rejected": "It returns twice."},
    ]
    assert report == [f"{SE_PAIRED} [train]: kept 2 rows from 5 raw rows; skipped 1 × empty prompt, "
                      "1 × identical responses, 1 × missing field"]
    parquet = tmp_path / "paired.parquet"  # the same raw schema as a parquet file, as the Hub stores it
    Dataset.from_json(str(FIXTURES / "stack_exchange_paired.jsonl")).to_parquet(str(parquet))
    with pytest.warns(UserWarning, match="kept 2 rows from 5 raw rows"):
        assert load_preference_dataset(SE_PAIRED, data_files=parquet).to_list() == rows  # a Path works too


def test_prompt_datasets_are_unique_prompts():
    prompts, report = load(load_prompt_dataset, "rajpurkar/squad", "squad.jsonl")
    assert prompts == [{"prompt": user("In what country is Normandy located?")}, {"prompt": user("What is Normandy?")}]
    assert report == ["rajpurkar/squad [train]: kept 3 rows from 5 raw rows; skipped 1 × empty prompt, "
                      "1 × missing field"]
    prompts, _ = load(load_prompt_dataset, SE_PREFS, "stack_exchange_preferences.jsonl")
    assert prompts == [{"prompt": user(f"<p>{q}</p>")} for q in (
        "How do I reverse a list in Python?", "What does the yield keyword do?", "How do I sort a dict by value?")]


def test_builtin_delegates_to_the_world(monkeypatch):
    pair = scored(user("What is 1 plus 1?"), "2.", "", 4.0, 0.0)  # the world's empty responses are kept on purpose
    calls = []
    monkeypatch.setattr(world, "preference_rows", lambda split: calls.append(split) or [pair])
    monkeypatch.setattr(world, "prompt_rows", lambda split: calls.append(split) or [{"prompt": pair["prompt"]}] * 2)
    assert load_preference_dataset("builtin", "validation").to_list() == [pair]
    assert load_prompt_dataset("builtin").to_list() == [{"prompt": pair["prompt"]}]
    assert calls == ["test", "train"]


def test_builtin_real_world_schema():
    data = load_preference_dataset("builtin", "test")
    assert data.column_names == ["prompt", "chosen", "rejected", "chosen_score", "rejected_score", "margin"]
    assert data.to_list() == world.preference_rows("test")


@pytest.mark.parametrize("call, message", [
    (lambda: load_preference_dataset("org/nope"), "unknown preference data set 'org/nope'; known: "
                                                  + ", ".join(KNOWN_PREFERENCE_DATASETS)),
    (lambda: load_prompt_dataset("org/nope"), "unknown prompt data set 'org/nope'; known: "
                                              + ", ".join(KNOWN_PROMPT_DATASETS)),
    (lambda: load_preference_dataset("builtin", "dev"), "unknown split 'dev'"),
    (lambda: load_preference_dataset("builtin", data_files="x.jsonl"), "takes no data_files"),
    (lambda: load_preference_dataset(SE_PAIRED, data_files=str(FIXTURES / "hh_rlhf_helpful_base.jsonl")),
     r"lacks column\(s\) \['question', 'response_j', 'response_k'\]"),
    (lambda: load_preference_dataset(HH, data_files=str(FIXTURES / "missing.jsonl")), "no file matches"),
    (lambda: load_prompt_dataset("rajpurkar/squad", data_files=str(FIXTURES / "hh_rlhf_helpful_base.jsonl")),
     "lacks column"),
])
def test_bad_input_is_one_clear_line(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


def test_wrong_file_type(tmp_path):
    (tmp_path / "pairs.csv").write_text("chosen,rejected\na,b\n")
    with pytest.raises(ValueError, match=r"must be \.json, \.jsonl or \.parquet files"):
        load_preference_dataset(HH, data_files=str(tmp_path / "pairs.csv"))


def test_no_usable_rows_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: same",
                                "rejected": "\n\nHuman: hi\n\nAssistant: same"}) + "\n")
    with pytest.raises(ValueError, match="no usable rows.*1 × identical responses"):
        load_preference_dataset(HH, data_files=str(path))
