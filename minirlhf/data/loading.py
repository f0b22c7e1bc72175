"""Load a preference or prompt data set by name, as a `datasets.Dataset` in the common schema of sources.py.

    load_preference_dataset(name, split)  -> columns prompt, chosen, rejected (+ chosen_score, rejected_score, margin)
    load_prompt_dataset(name, split)      -> column prompt, each prompt once

`name` is a Hub id from the table below or "builtin" (minirlhf.data.world). With `data_files` the same code reads
local files (or globs, hf:// paths) holding the source's RAW schema, .json / .jsonl / .parquet (files.py reads them):
that is how the tests run offline, and how to take a slice of the multi-GB stack-exchange sets. A single file (or
list) stands for the split asked for; a dict {Hub split name: files} is indexed like the Hub.

Splits are "train" and "test" everywhere ("validation" is accepted for "test"). Sources with only a train split on
the Hub get a fixed held-out split: a row is in "test" when zlib.crc32(key) % 100 < HOLDOUT_PERCENT, key being the
prompt / question text, so the split depends on nothing but the text (not on row order or on the data set's size),
and the same prompt never lands on both sides.

Rows that cannot be used are skipped and counted, with one warning line per split (sources.py names the reasons).
Bad input (an unknown name or split, unreadable files, a split without one usable row) raises one InputError whose
message names the flag (--dataset, --data-files, --split) or the file, the problem and what was expected.
"""
import os
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass

from datasets import Dataset, load_dataset

from ..errors import InputError
from . import files, sources
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
    raw, origin = _raw(name, source, split, data_files)
    return _normalised(raw, source.normalise, SCORED_PAIR_FEATURES if source.scored else PAIR_FEATURES, name, split,
                       origin)


def load_prompt_dataset(name, split="train", data_files=None):
    """Prompts of `name` (see KNOWN_PROMPT_DATASETS), each once, in first-seen order: squad questions, the prompts
    of a preference set, or the built-in world's RL prompts."""
    split = _check(name, split, data_files, KNOWN_PROMPT_DATASETS, "prompt")
    if name == "builtin":
        from . import world
        prompts = Dataset.from_list(world.prompt_rows(split), features=PROMPT_FEATURES)
    elif name in PROMPT_SOURCES:
        source = PROMPT_SOURCES[name]
        raw, origin = _raw(name, source, split, data_files)
        prompts = _normalised(raw, source.normalise, PROMPT_FEATURES, name, split, origin)
    else:
        prompts = load_preference_dataset(name, split, data_files).select_columns(["prompt"])
    seen, first = set(), []
    for i, prompt in enumerate(prompts["prompt"]):
        key = tuple((m["role"], m["content"]) for m in prompt)
        if key not in seen:
            seen.add(key)
            first.append(i)
    return prompts.select(first)


def describe_source(name, split, data_files=None):
    """How a message names the rows of one split: "--data-files pairs.jsonl [train]", "--dataset builtin [test]"."""
    return (f"--data-files {data_files}" if data_files else f"--dataset {name}") + f" [{split}]"


def _check(name, split, data_files, known, kind):
    """The canonical split ("train" / "test"), after one-line errors for an unknown name or split."""
    if name not in known:
        raise InputError(f"--dataset: unknown {kind} data set {name!r}; known: {', '.join(known)}")
    if split not in SPLITS:
        raise InputError(f"--split / --eval-split: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if name == "builtin" and data_files is not None:
        raise InputError("--data-files: the builtin data set is generated in code and takes no data_files; give "
                         "--dataset the Hub id whose raw schema the files hold")
    return SPLITS[split]


def in_holdout(key):
    """True when the row with this key text belongs to the held-out ("test") split of a train-only source."""
    return zlib.crc32(str(key).encode("utf-8")) % 100 < HOLDOUT_PERCENT


def _raw(name, source, split, data_files):
    """(raw rows of one split, where they come from for messages): from the Hub as a Dataset, or from data_files in
    the Hub's raw schema as a list of dicts (files.py). Train-only sources keep the rows of their fixed split."""
    hub_split, data_dir = source.splits[split]
    if data_files is None:
        origin = f"--dataset {name}"
        try:
            raw = load_dataset(name, data_dir=data_dir, split=hub_split)  # needs the network (or the local HF cache)
        except OSError as e:  # ConnectionError (offline), DatasetNotFoundError (a FileNotFoundError), ...
            raise InputError(f"{origin}: could not load it from the Hugging Face Hub or its local cache ({e}); "
                             "offline, pass --data-files with local files in its raw schema") from None
        missing = [c for c in source.columns if c not in raw.column_names]
        if missing:
            raise InputError(f"{origin}: the Hub data lacks column(s) {missing}; has {raw.column_names}")
    else:
        patterns = _split_files(data_files, name, split, hub_split)
        raw, origin = files.read_rows(patterns, source.columns, name), f"--data-files {' '.join(patterns)}"
    if source.holdout_key:
        keys = raw[source.holdout_key] if isinstance(raw, Dataset) else [row[source.holdout_key] for row in raw]
        keep = [i for i, key in enumerate(keys) if in_holdout(key) == (split == "test")]
        if not keep:
            raise InputError(f"{origin}: no rows for split {split!r} of {name}: this source has only a train split "
                             f"on the Hub, 'test' being the rows whose {source.holdout_key} hashes into the held-out "
                             f"{HOLDOUT_PERCENT} % (loading.in_holdout), and all {len(keys)} rows fall in the other "
                             f"split; expected more rows")
        raw = raw.select(keep) if isinstance(raw, Dataset) else [raw[i] for i in keep]
    return raw, origin


def _split_files(data_files, name, split, hub_split):
    """The paths (or globs, URLs) of data_files that hold `split`: all of them, or a dict's entry for the Hub split."""
    if isinstance(data_files, dict):
        if not data_files.get(hub_split):
            entry = "an empty" if hub_split in data_files else "no"
            raise InputError(f"--data-files: {entry} {hub_split!r} entry, so no file for split {split!r} of {name} "
                             f"(keys: {', '.join(map(str, data_files)) or 'none'}); expected {{{hub_split!r}: files}}: "
                             f"a dict of data files is keyed by the Hub's split names")
        data_files = data_files[hub_split]
    patterns = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    return [os.fspath(pattern) for pattern in patterns]


def _normalised(rows, normalise, features, name, split, origin):
    """Run `normalise` over the raw rows; count what it skips; one warning line; a Dataset of what it kept. None
    kept is an InputError with the counts: an empty Dataset would only fail later, naming a missing column."""
    kept, skipped, n_raw = [], Counter(), 0
    for n_raw, row in enumerate(rows, 1):
        for out in normalise(row):
            if isinstance(out, str):
                skipped[out] += 1
            else:
                kept.append(out)
    counts = f"kept {len(kept)} rows from {n_raw} raw rows; skipped " + (
        ", ".join(f"{count} × {reason}" for reason, count in sorted(skipped.items())) or "nothing")
    if not kept:
        raise InputError(f"{origin}: no usable rows in split {split!r} of {name}: {counts}; expected rows of its raw "
                         f"schema that pass the checks of minirlhf/data/schema.py")
    report = f"{name} [{split}]: {counts}"
    if skipped:
        warn_once(report)
    return Dataset.from_list(kept, features=features)


def warn_once(message):
    """warnings.warn(message), issued from this one line so that Python's default filter prints an identical
    message once per process (it remembers message and location): train_dpo.py reads its eval split twice, for the
    pairs and for the sampling prompts, and from two lines the same skip report would print twice. Under
    torchrun only rank 0 warns: every process reads the same rows."""
    if os.environ.get("RANK", "0") == "0":
        warnings.warn(message, stacklevel=1)
