"""Load a preference or prompt data set by name, as a `datasets.Dataset` in the common schema of sources.py.

    load_preference_dataset(name, split)  -> columns prompt, chosen, rejected (+ chosen_score, rejected_score, margin)
    load_prompt_dataset(name, split)      -> column prompt, each prompt once

`name` is a Hub id from the table below or "builtin" (minirlhf.data.world). With `data_files` the same code reads
local files (or hf:// paths) holding the source's RAW schema, .json / .jsonl / .parquet: that is how the tests run
offline, and how to take a slice of the multi-GB stack-exchange sets. A single file (or list) stands for the split
asked for; a dict {Hub split name: files} is indexed like the Hub.

Splits are "train" and "test" everywhere ("validation" is accepted for "test"). Sources with only a train split on
the Hub get a fixed held-out split: a row is in "test" when zlib.crc32(key) % 100 < HOLDOUT_PERCENT, key being the
prompt / question text, so the split depends on nothing but the text (not on row order or on the data set's size),
and the same prompt never lands on both sides.

Rows that cannot be used are skipped and counted, with one warning line per call (sources.py names the reasons).
"""
import glob
import os
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass

from datasets import Dataset, load_dataset

from . import sources
from .schema import PAIR_FEATURES, PROMPT_FEATURES, SCORED_PAIR_FEATURES

HOLDOUT_PERCENT = 5
SPLITS = {"train": "train", "test": "test", "validation": "test"}  # accepted name -> train / test


@dataclass(frozen=True)
class Source:
    normalise: object         # generator: raw row -> normalised rows / skip reasons (sources.py)
    columns: tuple            # the raw columns it reads
    splits: dict              # "train" / "test" -> (Hub split, Hub data_dir)
    scored: bool = False      # rows carry chosen_score, rejected_score, margin
    holdout_key: str = None   # set when the Hub has only a train split: the column hashed for the held-out split


_TRAIN_ONLY = {"train": ("train", None), "test": ("train", None)}
PREFERENCE_SOURCES = {
    "juyoungml/HelpSteer2-binarized": Source(
        sources.helpsteer2, ("prompt", "chosen", "rejected", "chosen_score", "rejected_score", "score_diff"),
        {"train": ("train", None), "test": ("validation", None)}, scored=True),
    "argilla/ultrafeedback-binarized-preferences-cleaned": Source(
        sources.ultrafeedback, ("prompt", "chosen", "rejected", "chosen-rating", "rejected-rating"),
        _TRAIN_ONLY, scored=True, holdout_key="prompt"),
    "Anthropic/hh-rlhf": Source(
        sources.hh_rlhf, ("chosen", "rejected"),
        {"train": ("train", "helpful-base"), "test": ("test", "helpful-base")}),
    "HuggingFaceH4/stack-exchange-preferences": Source(
        sources.stack_exchange_preferences, ("question", "answers"), _TRAIN_ONLY, scored=True, holdout_key="question"),
    "lvwerra/stack-exchange-paired": Source(
        sources.stack_exchange_paired, ("question", "response_j", "response_k"),
        {"train": ("train", "data/reward"), "test": ("train", "data/evaluation")}),
}
PROMPT_SOURCES = {
    "rajpurkar/squad": Source(sources.squad, ("question",), {"train": ("train", None), "test": ("validation", None)}),
}
KNOWN_PREFERENCE_DATASETS = (*PREFERENCE_SOURCES, "builtin")
KNOWN_PROMPT_DATASETS = (*PROMPT_SOURCES, *PREFERENCE_SOURCES, "builtin")


def load_preference_dataset(name, split="train", data_files=None):
    """Preference pairs of `name` (see KNOWN_PREFERENCE_DATASETS) as a Dataset: prompt, chosen, rejected, and
    chosen_score, rejected_score, margin where the source has scores."""
    split = _check(name, split, data_files, KNOWN_PREFERENCE_DATASETS, "preference")
    if name == "builtin":  # generated rows, already normalised; kept whole (its empty responses are on purpose)
        from . import world  # imported here: the world is only built when it is asked for
        return Dataset.from_list(world.preference_rows(split), features=SCORED_PAIR_FEATURES)
    source = PREFERENCE_SOURCES[name]
    return _normalised(_raw(name, source, split, data_files), source.normalise,
                       SCORED_PAIR_FEATURES if source.scored else PAIR_FEATURES, f"{name} [{split}]")


def load_prompt_dataset(name, split="train", data_files=None):
    """Prompts of `name` (see KNOWN_PROMPT_DATASETS), each once, in first-seen order: squad questions, the prompts
    of a preference set, or the built-in world's RL prompts."""
    split = _check(name, split, data_files, KNOWN_PROMPT_DATASETS, "prompt")
    if name == "builtin":
        from . import world
        prompts = Dataset.from_list(world.prompt_rows(split), features=PROMPT_FEATURES)
    elif name in PROMPT_SOURCES:
        source = PROMPT_SOURCES[name]
        prompts = _normalised(_raw(name, source, split, data_files), source.normalise, PROMPT_FEATURES,
                              f"{name} [{split}]")
    else:
        prompts = load_preference_dataset(name, split, data_files).select_columns(["prompt"])
    seen, first = set(), []
    for i, prompt in enumerate(prompts["prompt"]):
        key = tuple((m["role"], m["content"]) for m in prompt)
        if key not in seen:
            seen.add(key)
            first.append(i)
    return prompts.select(first)


def _check(name, split, data_files, known, kind):
    """The canonical split ("train" / "test"), after one-line errors for an unknown name or split."""
    if name not in known:
        raise ValueError(f"unknown {kind} data set {name!r}; known: {', '.join(known)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if name == "builtin" and data_files is not None:
        raise ValueError("the builtin data set is generated in code and takes no data_files")
    return SPLITS[split]


def in_holdout(key):
    """True when the row with this key text belongs to the held-out ("test") split of a train-only source."""
    return zlib.crc32(str(key).encode("utf-8")) % 100 < HOLDOUT_PERCENT


def _raw(name, source, split, data_files):
    """The raw rows of one split: from the Hub, or from data_files in the Hub's raw schema."""
    hub_split, data_dir = source.splits[split]
    data_files = os.fspath(data_files) if isinstance(data_files, os.PathLike) else data_files
    if data_files is None:
        raw = load_dataset(name, data_dir=data_dir, split=hub_split)  # the real thing; needs the network once
    else:
        raw = load_dataset(_file_format(data_files, hub_split), data_files=data_files,
                           split=hub_split if isinstance(data_files, dict) else "train")
    missing = [c for c in source.columns if c not in raw.column_names]
    if missing:
        raise ValueError(f"{name}: raw data lacks column(s) {missing}; has {raw.column_names}")
    if source.holdout_key:
        keep = [i for i, key in enumerate(raw[source.holdout_key]) if in_holdout(key) == (split == "test")]
        raw = raw.select(keep)
    return raw


def _file_format(data_files, hub_split):
    """"json" or "parquet" for load_dataset, from the first file's extension; checks that local files exist."""
    if isinstance(data_files, dict):
        if hub_split not in data_files:
            raise ValueError(f"data_files has no {hub_split!r} entry (keys: {', '.join(data_files)})")
        data_files = data_files[hub_split]
    paths = [data_files] if isinstance(data_files, str) else list(data_files)
    for path in paths:
        if "://" not in path and not glob.glob(path):
            raise ValueError(f"data_files: no file matches {path!r}")
    first = paths[0].removesuffix(".gz") if paths else ""
    if first.endswith((".json", ".jsonl")):
        return "json"
    if first.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"data_files must be .json, .jsonl or .parquet files, got {paths}")


def _normalised(rows, normalise, features, label):
    """Run `normalise` over the raw rows; count what it skips; one warning line; a Dataset of what it kept."""
    kept, skipped, n_raw = [], Counter(), 0
    for n_raw, row in enumerate(rows, 1):
        for out in normalise(row):
            if isinstance(out, str):
                skipped[out] += 1
            else:
                kept.append(out)
    report = f"{label}: kept {len(kept)} rows from {n_raw} raw rows; skipped " + (
        ", ".join(f"{count} × {reason}" for reason, count in sorted(skipped.items())) or "nothing")
    if not kept:
        raise ValueError(f"no usable rows. {report}")
    if skipped:
        warnings.warn(report, stacklevel=3)
    return Dataset.from_list(kept, features=features)
