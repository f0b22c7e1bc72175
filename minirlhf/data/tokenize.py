"""Token ids for preference pairs and prompts, and the collators that pad them into batches.

One pair is three id lists; the two rows a model sees share the prompt:

    chosen row:    prompt_ids + chosen_ids       (a response ends with EOS)
    rejected row:  prompt_ids + rejected_ids

Texts are tokenised exactly as written (add_special_tokens=False: the template already wrote any BOS, templates.py),
prompt and responses separately, so the prompt / response boundary is exact. Truncation:
- the prompt keeps its END: beyond max_prompt_length tokens only the last max_prompt_length are kept (left
  truncation: the last turn, the one being answered, matters most; as in the multi-adapter PPO setup). A leading BOS
  is then lost too.
- a response is cut on the right so that prompt + response <= max_length. A cut response keeps no EOS (it did not
  end there), so a model is never taught to stop mid-sentence.
A length left as None is derived from the data (resolve_lengths): the longest prompt (after the template), and
prompt + the longest response for max_length, capped at PROMPT_LENGTH_CAP / LENGTH_CAP; then nothing is cut unless a
cap is reached. The dataset helpers report every cut: one warning line per data set (report_cuts), e.g. (the tiny
model, SmolLM2's system prompt as --system-prompt, --max-prompt-length 32)
    builtin [test]: --max-prompt-length 32: cut 120 of 120 prompts (by 34-43 tokens, mean 37.5); they keep their
    last 32 tokens
and count it for summary.json (truncation_summary: data/prompts_truncated, data/responses_truncated,
data/pairs_skipped, summed over the data sets a run tokenised).

Collators pad with the tokenizer's pad token (require_pad_token), which must differ from EOS
(models.load_tokenizer adds one): masks come from lengths, never from comparing ids with a pad id, but a pad equal
to EOS would make padding and a real end of sequence indistinguishable to everything downstream.
Legend: B pairs (or prompts) in a batch, T tokens.
"""
from collections import Counter

import torch
from datasets import List, Value

from ..errors import InputError
from .loading import warn_once
from .templates import format_prompt

def _ids(tokenizer, text):
    if not isinstance(text, str):
        raise ValueError(f"expected a string to tokenize, got {type(text).__name__}")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _ids_batch(tokenizer, texts):
    """_ids of many texts in one tokenizer call (a fast tokenizer encodes a list many times faster than one by one)."""
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"expected a string to tokenize, got {type(text).__name__}")
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


PROMPT_LENGTH_CAP = 1024  # the most prompt tokens a derived max_prompt_length keeps
LENGTH_CAP = 2048  # the most prompt + response tokens of a derived max_length

_CUTS = Counter()  # what this process's dataset helpers cut and skipped (truncation_summary)


def _check_lengths(max_length, max_prompt_length):
    """InputErrors: the lengths are the scripts' --max-length and --max-prompt-length (None: derived)."""
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"--{name.replace('_', '-')}: {name} must be a positive int, got {value!r}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise InputError(f"--max-prompt-length: max_prompt_length ({max_prompt_length}) must be smaller than "
                         f"max_length ({max_length}), leaving room for the response")


def resolve_lengths(prompt_lengths, response_lengths=None, max_prompt_length=None, max_length=None):
    """(max_prompt_length, max_length) for data of these lengths: a value given is kept as it is; one left None is
    derived from the data, the one place every script, compare, best_of_n and the evaluation get it from:
      max_prompt_length  the longest prompt, at most PROMPT_LENGTH_CAP; with max_length given, at most what leaves
                         room for the longest response, but never less than half of max_length (and below it)
      max_length         the longest prompt kept + the longest response, at most LENGTH_CAP (and above
                         max_prompt_length); stays None for prompts alone (response_lengths None)
    prompt_lengths: tokens of each prompt (after the template); response_lengths: tokens of each row's longest
    response, its EOS included. So nothing is cut unless a cap or a given value says so."""
    _check_lengths(max_length, max_prompt_length)
    longest_prompt = max(prompt_lengths, default=1)
    longest_response = max(response_lengths, default=1) if response_lengths is not None else None
    if max_prompt_length is None:
        room = longest_prompt
        if max_length is not None:
            room = min(room, max(max_length - (longest_response or 1), max_length // 2), max_length - 1)
        max_prompt_length = max(1, min(room, PROMPT_LENGTH_CAP))
    if max_length is None and longest_response is not None:
        max_length = max(max_prompt_length + 1,
                         min(min(longest_prompt, max_prompt_length) + longest_response, LENGTH_CAP))
    _check_lengths(max_length, max_prompt_length)
    return max_prompt_length, max_length


def _spread(amounts):
    """'by 3-11 tokens, mean 6.4' of the tokens each cut removed."""
    lo, hi, mean = min(amounts), max(amounts), sum(amounts) / len(amounts)
    return f"by {lo} token{'s' * (hi != 1)}" if lo == hi else f"by {lo}-{hi} tokens, mean {mean:.1f}"


def report_cuts(name, prompt_lengths, max_prompt_length, response_lengths=None, max_length=None, skipped=0,
                derived=(), length_flag="--max-length"):
    """Count what the truncation rules cut (the module docstring) and say it in ONE warning line (warn_once), none
    when nothing was cut or skipped; the counts go to truncation_summary too. Returns {prompts_truncated,
    responses_truncated (with responses), pairs_skipped (with responses)}.
    name: the data set, e.g. "builtin [train]" (None: no prefix); prompt_lengths: the kept rows' prompt tokens
    before the cut; response_lengths: per row, a tuple of its responses' tokens (EOS included) before the cut;
    skipped: rows dropped before (their prompt alone longer than max_length); derived: the names among
    "max_prompt_length", "max_length" that resolve_lengths derived (said so in the line); length_flag: the flag of
    max_length (train_sft.py's is --block-size)."""
    mark = {flag: " (derived)" if flag in derived else "" for flag in ("max_prompt_length", "max_length")}
    prompt_cuts = [n - max_prompt_length for n in prompt_lengths if n > max_prompt_length]
    counts, parts = {"prompts_truncated": len(prompt_cuts)}, []
    if skipped:
        parts.append(f"skipped {skipped} of {skipped + len(prompt_lengths)} pairs whose prompt alone is longer than "
                     f"max_length={max_length} tokens")
    if prompt_cuts:
        parts.append(f"--max-prompt-length {max_prompt_length}{mark['max_prompt_length']}: cut {len(prompt_cuts)} of "
                     f"{len(prompt_lengths)} prompts ({_spread(prompt_cuts)}); they keep their last "
                     f"{max_prompt_length} tokens")
    if response_lengths is not None:
        response_cuts = [n - max(0, max_length - min(p, max_prompt_length))
                         for p, lengths in zip(prompt_lengths, response_lengths) for n in lengths
                         if min(p, max_prompt_length) + n > max_length]
        n_responses = sum(len(lengths) for lengths in response_lengths)
        counts.update(responses_truncated=len(response_cuts), pairs_skipped=skipped)
        if response_cuts:
            parts.append(f"{length_flag} {max_length}{mark['max_length']}: cut {len(response_cuts)} of {n_responses} "
                         f"responses on the right ({_spread(response_cuts)}); a cut response has no EOS")
    _CUTS.update(counts)  # a count of 0 adds its key too: the summary says "none cut"
    if parts:
        warn_once((f"{name}: " if name else "") + "; ".join(parts))
    return counts


def truncation_summary():
    """{data/prompts_truncated, data/responses_truncated, data/pairs_skipped}: what this process's dataset helpers
    cut and skipped, summed over every data set since reset_truncation_summary (Run() calls it); for summary.json.
    Empty when nothing was tokenised."""
    return {f"data/{key}": value for key, value in sorted(_CUTS.items())}


def reset_truncation_summary():
    _CUTS.clear()


def tokenize_prompt(tokenizer, prompt_text, max_prompt_length=None):
    """{"prompt_ids": the last max_prompt_length token ids of prompt_text (None: all of them)}."""
    _check_lengths(None, max_prompt_length)
    ids = _ids(tokenizer, prompt_text)
    return {"prompt_ids": ids[-max_prompt_length:] if max_prompt_length is not None else ids}


def tokenize_pair(tokenizer, prompt_text, chosen, rejected, max_length=None, max_prompt_length=None):
    """{"prompt_ids", "chosen_ids", "rejected_ids"} of one pair, truncated by the rules of the module docstring (a
    length left None: resolve_lengths of this one pair, so nothing is cut below the caps)."""
    _check_lengths(max_length, max_prompt_length)
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no EOS token to end responses with")
    prompt_ids, chosen_ids, rejected_ids = (_ids(tokenizer, text) for text in (prompt_text, chosen, rejected))
    max_prompt_length, max_length = resolve_lengths([len(prompt_ids)], [1 + max(len(chosen_ids), len(rejected_ids))],
                                                    max_prompt_length, max_length)
    return _truncate_pair(prompt_ids, chosen_ids + [tokenizer.eos_token_id], rejected_ids + [tokenizer.eos_token_id],
                          max_length, max_prompt_length)


def _truncate_pair(prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length):
    """The truncation rules of the module docstring, on token ids (the responses' EOS already appended)."""
    prompt_ids = prompt_ids[-max_prompt_length:]
    budget = max_length - len(prompt_ids)  # >= 1 since max_prompt_length < max_length
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids[:budget], "rejected_ids": rejected_ids[:budget]}


_PAIR_IDS = ("prompt_ids", "chosen_ids", "rejected_ids")


def tokenize_preference_dataset(dataset, tokenizer, max_length=None, max_prompt_length=None, template=None,
                                system_prompt=None, name=None):
    """Add prompt_ids, chosen_ids, rejected_ids to a preference Dataset (load_preference_dataset), the prompt
    formatted with `template` and `system_prompt` (templates.format_prompt; None: none added). A length left None is
    derived from these pairs (resolve_lengths). Rows whose prompt ALONE is longer than max_length tokens are skipped:
    cutting such a prompt to its last max_prompt_length tokens would keep too little of it. Longer-than-
    max_prompt_length prompts below that are left-truncated as usual. What was skipped or cut is reported in one
    warning line naming the data set `name` (report_cuts)."""
    _check_lengths(max_length, max_prompt_length)
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no EOS token to end responses with")
    eos = tokenizer.eos_token_id

    def tokenize_rows(rows):  # a batch of rows: each column a list (one tokenizer call per column); nothing cut yet
        prompts = _ids_batch(tokenizer, [format_prompt(tokenizer, p, template, system_prompt) for p in rows["prompt"]])
        chosen, rejected = ([ids + [eos] for ids in _ids_batch(tokenizer, rows[k])] for k in ("chosen", "rejected"))
        return {"prompt_ids": prompts, "chosen_ids": chosen, "rejected_ids": rejected,
                "_lengths": [[len(p), len(c), len(r)] for p, c, r in zip(prompts, chosen, rejected)]}

    if len(dataset) == 0:
        return _empty_with(dataset, _PAIR_IDS)
    tokenized = dataset.map(tokenize_rows, batched=True, batch_size=1000)
    lengths = tokenized["_lengths"]
    derived = [k for k, v in (("max_prompt_length", max_prompt_length), ("max_length", max_length)) if v is None]
    max_prompt_length, max_length = resolve_lengths([p for p, _, _ in lengths], [max(c, r) for _, c, r in lengths],
                                                    max_prompt_length, max_length)
    keep = [i for i, (p, _, _) in enumerate(lengths) if p <= max_length]
    if not keep:
        raise InputError(f"--max-length: every prompt is longer than max_length={max_length} tokens (all "
                         f"{len(lengths)} pairs); expected a --max-length above the prompts' lengths")
    kept = [lengths[i] for i in keep]
    counts = report_cuts(name, [p for p, _, _ in kept], max_prompt_length, [(c, r) for _, c, r in kept], max_length,
                         skipped=len(lengths) - len(keep), derived=derived)
    if len(keep) < len(lengths):
        tokenized = tokenized.select(keep)
    if counts["prompts_truncated"] or counts["responses_truncated"]:  # else the ids are final already
        def cut_rows(rows):
            pairs = [_truncate_pair(p, c, r, max_length, max_prompt_length)
                     for p, c, r in zip(*(rows[k] for k in _PAIR_IDS))]
            return {k: [pair[k] for pair in pairs] for k in _PAIR_IDS}
        tokenized = tokenized.map(cut_rows, batched=True, batch_size=1000)
    return tokenized.remove_columns("_lengths")


def tokenize_prompt_dataset(dataset, tokenizer, max_prompt_length=None, template=None, system_prompt=None, name=None):
    """Add prompt_ids (left-truncated to max_prompt_length; None: derived from these prompts, resolve_lengths) to a
    prompt Dataset (load_prompt_dataset), each prompt formatted with `template` and `system_prompt`
    (templates.format_prompt; None: none added). Cut prompts are reported in one warning line naming the data set
    `name` (report_cuts)."""
    _check_lengths(None, max_prompt_length)
    if len(dataset) == 0:
        return _empty_with(dataset, ("prompt_ids",))

    def tokenize_rows(rows):
        prompts = _ids_batch(tokenizer, [format_prompt(tokenizer, p, template, system_prompt) for p in rows["prompt"]])
        return {"prompt_ids": prompts, "_length": [len(p) for p in prompts]}

    tokenized = dataset.map(tokenize_rows, batched=True, batch_size=1000)
    lengths = tokenized["_length"]
    derived = ["max_prompt_length"] if max_prompt_length is None else []
    max_prompt_length, _ = resolve_lengths(lengths, max_prompt_length=max_prompt_length)
    if report_cuts(name, lengths, max_prompt_length, derived=derived)["prompts_truncated"]:
        tokenized = tokenized.map(lambda rows: {"prompt_ids": [ids[-max_prompt_length:] for ids in rows["prompt_ids"]]},
                                  batched=True, batch_size=1000)
    return tokenized.remove_columns("_length")


def _empty_with(dataset, columns):
    """The empty `dataset` with empty id columns: map() never runs on no rows, so it would add none, and the caller
    would fail on "Column 'prompt_ids' doesn't exist" instead of seeing zero rows."""
    for column in columns:
        dataset = dataset.add_column(column, [], feature=List(Value("int64")))
    return dataset


def require_pad_token(tokenizer):
    """The tokenizer's pad id, after checking that there is one and that it is not EOS."""
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError("the tokenizer needs a pad token distinct from EOS (minirlhf.models.load_tokenizer adds one)")
    return tokenizer.pad_token_id


def pad(sequences, value, padding_side="right"):
    """(N, T) int64 tensor of the int lists padded with `value` to the longest, on the left or the right."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(seq) for seq in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)  # (N, T)
    for i, seq in enumerate(sequences):
        start = width - len(seq) if padding_side == "left" else 0
        out[i, start:start + len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def _extras(batch, skip):
    """Every other field of the examples: numbers as a (B,) float tensor, anything else as a list."""
    extras = {}
    for key in [key for key in batch[0] if key not in skip]:
        values = [example[key] for example in batch]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        extras[key] = torch.tensor(values, dtype=torch.float32) if numeric else values
    return extras


def collate_pairs(batch, pad_token_id, padding_side="right"):
    """A batch of B tokenised pairs -> input_ids, attention_mask, response_mask, all (2B, T): rows 0..B-1 are
    prompt+chosen, rows B..2B-1 prompt+rejected. response_mask is 1 on response tokens (EOS included), 0 on the prompt
    and on padding: the loss mask. Other fields (e.g. margin) come along, numbers as (B,) tensors."""
    prompts = [example["prompt_ids"] for example in batch] * 2
    responses = [example["chosen_ids"] for example in batch] + [example["rejected_ids"] for example in batch]
    return {
        "input_ids": pad([p + r for p, r in zip(prompts, responses)], pad_token_id, padding_side),  # (2B, T)
        "attention_mask": pad([[1] * (len(p) + len(r)) for p, r in zip(prompts, responses)], 0, padding_side),
        "response_mask": pad([[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)], 0, padding_side),
        **_extras(batch, skip=("prompt_ids", "chosen_ids", "rejected_ids")),
    }


def pair_batches(data, pad_token_id, size):
    """collate_pairs batches of `size` consecutive pairs of `data` (a list or datasets.Dataset of tokenised pairs), in
    order; the last may hold fewer."""
    for i in range(0, len(data), size):
        yield collate_pairs([data[j] for j in range(i, min(i + size, len(data)))], pad_token_id)


def collate_prompts(batch, pad_token_id):
    """A batch of B tokenised prompts -> input_ids, attention_mask (B, T), LEFT-padded so that every prompt ends at
    the last column and sampling appends new tokens to all rows at once. Other fields (e.g. the prompt messages,
    to score samples with) come along as lists."""
    prompts = [example["prompt_ids"] for example in batch]
    return {
        "input_ids": pad(prompts, pad_token_id, "left"),  # (B, T)
        "attention_mask": pad([[1] * len(p) for p in prompts], 0, "left"),
        **_extras(batch, skip=("prompt_ids",)),
    }
