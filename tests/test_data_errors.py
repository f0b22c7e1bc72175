"""Bad data given with --data-files: every unreadable file, and every split left without a usable row, is one
InputError line naming the file (or the split of the data set) and the problem; mixed-type text columns keep their
good rows; non-finite or non-numeric scores are skipped and counted; the skip report is printed once per split."""
import gzip
import json
import math
import random
import warnings
from pathlib import Path

import pytest
from datasets import Dataset

from minirlhf.data import load_preference_dataset, load_prompt_dataset
from minirlhf.errors import InputError

FIXTURES = Path(__file__).parent / "fixtures"
HELPSTEER, ULTRAFEEDBACK = "juyoungml/HelpSteer2-binarized", "argilla/ultrafeedback-binarized-preferences-cleaned"
HH, SE_PAIRED = "Anthropic/hh-rlhf", "lvwerra/stack-exchange-paired"
SE_PREFS = "HuggingFaceH4/stack-exchange-preferences"
JSON_EXPECTED = "expected JSON lines (one object per line) or a JSON array of objects"
HH_ROW = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.", "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5."}


def user(text):
    return [{"role": "user", "content": text}]


def loaded(name, path, split="train"):
    """(rows, the skip report lines) of one file."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_preference_dataset(name, split, data_files=str(path))
    return data.to_list(), [str(w.message) for w in caught if str(w.message).startswith(name)]


def input_error(call):
    """The message of the InputError that call() raises, after checking that it is one line."""
    with pytest.raises(InputError) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


def write_jsonl(path, rows):
    """JSON lines as Python's json module writes them: NaN, Infinity and -Infinity as bare literals."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------- unreadable files

def _zero_bytes(tmp):
    (tmp / "a.jsonl").write_bytes(b"")
    return tmp / "a.jsonl", "{path}: the file is empty; " + JSON_EXPECTED


def _whitespace(tmp):
    (tmp / "a.jsonl").write_text("\n  \n")
    return tmp / "a.jsonl", "{path}: the file is empty (only whitespace); " + JSON_EXPECTED


def _not_json(tmp):
    (tmp / "a.jsonl").write_text(json.dumps(HH_ROW) + "\nchosen,rejected\n")
    return tmp / "a.jsonl", "{path}: not JSON lines (line 2, column 1: Expecting value); " + JSON_EXPECTED


def _binary(tmp):
    data = random.Random(0).randbytes(512)
    (tmp / "a.jsonl").write_bytes(data)
    with pytest.raises(UnicodeDecodeError) as error:
        data.decode("utf-8")
    bad = error.value.start
    return tmp / "a.jsonl", (f"{{path}}: not a text file (line {data[:bad].count(10) + 1}: byte 0x{data[bad]:02x} "
                             f"is not UTF-8); " + JSON_EXPECTED)


def _cut_jsonl(tmp):
    line = json.dumps(HH_ROW)
    (tmp / "a.jsonl").write_text(line + "\n" + line[:-20])  # the second line cut in the middle of a string
    column = line.rindex(': "') + 3  # 1-based column of the opening quote of the cut string
    return tmp / "a.jsonl", (f"{{path}}: not JSON lines (line 2, column {column}: Unterminated string starting at; "
                             f"the last line has no newline: the file looks truncated); " + JSON_EXPECTED)


def _not_objects(tmp):
    (tmp / "a.jsonl").write_text(json.dumps(HH_ROW) + "\n[1, 2]\n")
    return tmp / "a.jsonl", "{path}: not JSON objects (line 2 is an array); " + JSON_EXPECTED


def _empty_array(tmp):
    (tmp / "a.json").write_text("[]")
    return tmp / "a.json", "{path}: the file holds no rows; " + JSON_EXPECTED


def _cut_parquet(tmp):
    Dataset.from_list([HH_ROW] * 50).to_parquet(str(tmp / "whole.parquet"))
    data = (tmp / "whole.parquet").read_bytes()
    (tmp / "a.parquet").write_bytes(data[:len(data) // 2])
    return tmp / "a.parquet", ("{path}: not a readable parquet file (Parquet magic bytes not found in footer. Either "
                               "the file is corrupted or this is not a parquet file.)")


def _cut_gzip(tmp):
    data = gzip.compress((json.dumps(HH_ROW) + "\n").encode() * 50)
    (tmp / "a.jsonl.gz").write_bytes(data[:len(data) // 2])
    return tmp / "a.jsonl.gz", ("{path}: cannot be read (Compressed file ended before the end-of-stream marker was "
                                "reached); " + JSON_EXPECTED)


def _missing(tmp):
    return tmp / "missing.jsonl", ("{path}: no file matches this path; expected existing .json, .jsonl or .parquet "
                                   "files")


def _unmatched_glob(tmp):
    (tmp / "a.jsonl").write_text(json.dumps(HH_ROW) + "\n")
    return tmp / "train-*.jsonl", ("{path}: no file matches this pattern; expected existing .json, .jsonl or "
                                   ".parquet files")


def _directory(tmp):
    return tmp, "{path}: is a directory; expected .json, .jsonl or .parquet files (a glob such as {path}/*.jsonl " \
                "names those in it)"


@pytest.mark.parametrize("make", [_zero_bytes, _whitespace, _not_json, _binary, _cut_jsonl, _not_objects,
                                  _empty_array, _cut_parquet, _cut_gzip, _missing, _unmatched_glob, _directory])
def test_unreadable_data_files_are_one_line_naming_the_file(tmp_path, make):
    path, expected = make(tmp_path)
    message = input_error(lambda: load_preference_dataset(HH, data_files=str(path)))
    assert message == "--data-files " + expected.format(path=path)


def test_one_bad_file_among_good_ones_is_named(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [HH_ROW])
    (tmp_path / "bad.jsonl").write_bytes(b"")
    message = input_error(lambda: load_preference_dataset(HH, data_files=[str(good), str(tmp_path / "bad.jsonl")]))
    assert message.startswith(f"--data-files {tmp_path / 'bad.jsonl'}: the file is empty")


def test_json_array_and_glob_and_gzip_are_read(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([HH_ROW]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({**HH_ROW, "chosen": HH_ROW["chosen"].replace("4.", "Four.")}) + "\n")
    rows, report = loaded(HH, tmp_path / "*.json*")
    assert [row["chosen"] for row in rows] == ["4.", "Four."] and report == []


# ---------------------------------------------------------------- a number in a text column

def test_text_column_with_one_number_keeps_its_string_rows():
    # `datasets` types the chosen column as JSON (one row holds the number 2) and returns the string "2" as the
    # number 2 too: all four rows were skipped as non-string responses. Read with the json module, only the row
    # holding a number is, and the strings stay strings.
    rows, report = loaded(HELPSTEER, FIXTURES / "helpsteer2_mixed_types.jsonl")
    assert rows == [
        {"prompt": user("What is 1+1?"), "chosen": "2", "rejected": "3", "chosen_score": 4.0, "rejected_score": 1.0,
         "margin": 3.0},
        {"prompt": user("How many legs does a bird have?"), "chosen": "2", "rejected": "4", "chosen_score": 4.0,
         "rejected_score": 2.0, "margin": 2.0},
        {"prompt": user("How many moons has Mars?"), "chosen": "Two: Phobos and Deimos.", "rejected": "1",
         "chosen_score": 3.5, "rejected_score": 1.0, "margin": 2.5},
    ]
    assert report == [f"{HELPSTEER} [train]: kept 3 rows from 4 raw rows; skipped 1 × non-string response"]


def test_mixed_types_in_parquet_keep_the_string_rows(tmp_path):
    # a parquet file is typed by its writer: a string column gives strings, whatever they look like
    rows = [{"question": "Name a fruit.", "response_j": "2", "response_k": "Apple."},
            {"question": "Name a planet.", "response_j": "Mars.", "response_k": "3"}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    assert [(r["chosen"], r["rejected"]) for r in loaded(SE_PAIRED, tmp_path / "a.parquet")[0]] == [
        ("2", "Apple."), ("Mars.", "3")]


# ---------------------------------------------------------------- NaN, infinite and non-numeric scores

def helpsteer_row(prompt, chosen_score, rejected_score, score_diff):
    return {"prompt": prompt, "chosen": "Good.", "rejected": "Bad.", "chosen_score": chosen_score,
            "rejected_score": rejected_score, "score_diff": score_diff}


def test_helpsteer2_skips_non_finite_and_non_numeric_scores(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", [
        helpsteer_row("Name a fruit.", 4, 1, 3),
        helpsteer_row("Name a planet.", 4, 1, math.nan),       # the row that trained a margin model to NaN
        helpsteer_row("Name a metal.", math.inf, 1, 3),
        helpsteer_row("Name a river.", 4, -math.inf, 3),
        helpsteer_row("Name a prime.", 1e308, -1e308, 3),      # finite scores, finite score_diff: kept as given
        helpsteer_row("Name a vowel.", 4, 1, "3"),
        helpsteer_row("Name an ocean.", True, 1, 3),
    ])
    assert "NaN" in path.read_text() and "Infinity" in path.read_text()  # the literals json.loads accepts
    rows, report = loaded(HELPSTEER, path)
    assert [(r["prompt"][0]["content"], r["margin"]) for r in rows] == [("Name a fruit.", 3.0), ("Name a prime.", 3.0)]
    assert report == [f"{HELPSTEER} [train]: kept 2 rows from 7 raw rows; skipped 3 × non-finite score, "
                      "2 × non-numeric score"]


def ultrafeedback_row(prompt, chosen_rating, rejected_rating):
    def turns(response):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return {"prompt": prompt, "chosen": turns("Good."), "rejected": turns("Bad."), "chosen-rating": chosen_rating,
            "rejected-rating": rejected_rating}


def test_ultrafeedback_skips_non_finite_and_non_numeric_ratings(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [
        ultrafeedback_row("Name a fruit.", 5.0, 2.5),
        ultrafeedback_row("Name a planet.", math.nan, 2.5),
        ultrafeedback_row("Name a metal.", 5.0, -math.inf),
        ultrafeedback_row("Name a river.", 1e308, -1e308),     # finite ratings, infinite margin
        ultrafeedback_row("Name a prime.", "5", 2.5),
        ultrafeedback_row("Name a vowel.", [5], 2.5),
    ])
    rows, report = loaded(ULTRAFEEDBACK, path)
    assert [(r["prompt"][0]["content"], r["margin"]) for r in rows] == [("Name a fruit.", 2.5)]
    assert report == [f"{ULTRAFEEDBACK} [train]: kept 1 rows from 6 raw rows; skipped 3 × non-finite score, "
                      "2 × non-numeric score"]


def test_stack_exchange_preferences_skips_answers_without_a_finite_score(tmp_path):
    answers = [{"pm_score": score, "text": f"<p>Answer {i}.</p>"}
               for i, score in enumerate([3, math.nan, 1, math.inf, -math.inf, "2", True])]
    path = write_jsonl(tmp_path / "s.jsonl", [{"question": "<p>How do I read a file?</p>", "answers": answers}])
    rows, report = loaded(SE_PREFS, path)
    assert [(r["chosen"], r["rejected"], r["margin"]) for r in rows] == [("<p>Answer 0.</p>", "<p>Answer 2.</p>", 2.0)]
    assert report == [f"{SE_PREFS} [train]: kept 1 rows from 1 raw rows; skipped 5 × unusable answer"]


def test_kept_scores_are_finite():
    for name, fixture in ((HELPSTEER, "helpsteer2_binarized.jsonl"), (ULTRAFEEDBACK,
                          "ultrafeedback_binarized_cleaned.jsonl"), (SE_PREFS, "stack_exchange_preferences.jsonl")):
        rows, _ = loaded(name, FIXTURES / fixture)
        assert all(math.isfinite(row[key]) for row in rows for key in ("chosen_score", "rejected_score", "margin"))


# ---------------------------------------------------------------- the skip report: once per split

def test_skip_report_is_printed_once_per_split(monkeypatch):
    path = str(FIXTURES / "helpsteer2_binarized.jsonl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own action for UserWarning: what a script's user sees
        load_preference_dataset(HELPSTEER, "train", data_files=path)
        load_preference_dataset(HELPSTEER, "test", data_files=path)       # train_dpo.py reads its eval split for
        load_preference_dataset(HELPSTEER, "validation", data_files=path)  # the pairs and again for the prompts
        load_prompt_dataset(HELPSTEER, "test", data_files=path)
    assert [str(w.message).split(":")[0] for w in caught] == [f"{HELPSTEER} [train]", f"{HELPSTEER} [test]"]
    monkeypatch.setenv("RANK", "1")  # under torchrun, only rank 0 reports
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_preference_dataset(HELPSTEER, "train", data_files=path)
    assert caught == []


# ---------------------------------------------------------------- a split without usable rows

def test_split_with_every_row_skipped_names_split_source_and_reasons(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", [HH_ROW | {"rejected": HH_ROW["chosen"]}] * 2 + [{"chosen": "hi"}])
    assert input_error(lambda: load_preference_dataset(HH, "test", data_files=str(path))) == (
        f"--data-files {path}: no usable rows in split 'test' of {HH}: kept 0 rows from 3 raw rows; skipped "
        "2 × identical responses, 1 × malformed transcript; expected rows of its raw schema that pass the checks of "
        "minirlhf/data/schema.py")
    assert "no usable rows in split 'train' of rajpurkar/squad" in input_error(lambda: load_prompt_dataset(
        "rajpurkar/squad", data_files=str(write_jsonl(tmp_path / "q.jsonl", [{"question": " "}]))))


def test_held_out_split_without_rows(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [ultrafeedback_row("Name a fruit.", 5.0, 2.5)])  # a train row
    assert input_error(lambda: load_preference_dataset(ULTRAFEEDBACK, "test", data_files=str(path))) == (
        f"--data-files {path}: no rows for split 'test' of {ULTRAFEEDBACK}: this source has only a train split on "
        "the Hub, 'test' being the rows whose prompt hashes into the held-out 5 % (loading.in_holdout), and all 1 "
        "rows fall in the other split; expected more rows")


def test_data_files_dict_without_the_split():
    path = str(FIXTURES / "helpsteer2_binarized.jsonl")
    assert input_error(lambda: load_preference_dataset(HELPSTEER, "test", data_files={"train": path})) == (
        f"--data-files: no 'validation' entry, so no file for split 'test' of {HELPSTEER} (keys: train); expected "
        "{'validation': files}: a dict of data files is keyed by the Hub's split names")
    assert input_error(lambda: load_preference_dataset(HELPSTEER, "train", data_files={"train": []})).startswith(
        "--data-files: an empty 'train' entry, so no file for split 'train'")


def test_missing_columns_name_the_file_and_the_schema():
    path = FIXTURES / "hh_rlhf_helpful_base.jsonl"
    assert input_error(lambda: load_preference_dataset(SE_PAIRED, data_files=str(path))) == (
        f"--data-files {path}: lacks column(s) ['question', 'response_j', 'response_k'] of the {SE_PAIRED} raw "
        "schema; has ['chosen', 'rejected']")


@pytest.mark.parametrize("call, message", [
    (lambda: load_preference_dataset("org/nope"), "--dataset: unknown preference data set 'org/nope'; known: "),
    (lambda: load_prompt_dataset("builtin", "dev"), "--split / --eval-split: unknown split 'dev'; expected one of "
                                                    "train, test, validation"),
    (lambda: load_preference_dataset("builtin", data_files="x.jsonl"), "--data-files: the builtin data set is "),
    (lambda: load_preference_dataset(HH, data_files="pairs.csv"), "--data-files pairs.csv: no file matches"),
])
def test_flag_errors_are_input_errors(call, message):
    assert input_error(call).startswith(message)


def test_wrong_extension_names_the_file(tmp_path):
    (tmp_path / "pairs.csv").write_text("chosen,rejected\na,b\n")
    assert input_error(lambda: load_preference_dataset(HH, data_files=str(tmp_path / "pairs.csv"))) == (
        f"--data-files {tmp_path / 'pairs.csv'}: data files must be .json, .jsonl or .parquet files (JSON may be "
        ".gz)")
