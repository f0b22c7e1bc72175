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

Collators pad with the tokenizer's pad token (require_pad_token), which must differ from EOS
(models.load_tokenizer adds one): masks come from lengths, never from comparing ids with a pad id, but a pad equal
to EOS would make padding and a real end of sequence indistinguishable to everything downstream.
Legend: B pairs (or prompts) in a batch, T tokens.
"""
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


def _check_lengths(max_length, max_prompt_length):
    """InputErrors: the lengths are the scripts' --max-length and --max-prompt-length."""
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"--{name.replace('_', '-')}: {name} must be a positive int, got {value!r}")
    if max_length is not None and max_prompt_length >= max_length:
        raise InputError(f"--max-prompt-length: max_prompt_length ({max_prompt_length}) must be smaller than "
                         f"max_length ({max_length}), leaving room for the response")


def tokenize_prompt(tokenizer, prompt_text, max_prompt_length):
    """{"prompt_ids": the last max_prompt_length token ids of prompt_text}."""
    _check_lengths(None, max_prompt_length)
    return {"prompt_ids": _ids(tokenizer, prompt_text)[-max_prompt_length:]}


def tokenize_pair(tokenizer, prompt_text, chosen, rejected, max_length, max_prompt_length):
    """{"prompt_ids", "chosen_ids", "rejected_ids"} of one pair, truncated by the rules of the module docstring."""
    _check_lengths(max_length, max_prompt_length)
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no EOS token to end responses with")
    return _truncate_pair(_ids(tokenizer, prompt_text), _ids(tokenizer, chosen), _ids(tokenizer, rejected),
                          tokenizer.eos_token_id, max_length, max_prompt_length)


def _truncate_pair(prompt_ids, chosen_ids, rejected_ids, eos_id, max_length, max_prompt_length):
    """The truncation rules of the module docstring, on token ids."""
    prompt_ids = prompt_ids[-max_prompt_length:]
    budget = max_length - len(prompt_ids)  # >= 1 since max_prompt_length < max_length
    chosen_ids, rejected_ids = ((ids + [eos_id])[:budget] for ids in (chosen_ids, rejected_ids))
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def tokenize_preference_dataset(dataset, tokenizer, max_length, max_prompt_length, template=None, system_prompt=None):
    """Add prompt_ids, chosen_ids, rejected_ids to a preference Dataset (load_preference_dataset), the prompt
    formatted with `template` and `system_prompt` (templates.format_prompt; None: none added). Rows whose prompt
    ALONE is longer than max_length tokens are skipped and counted (one warning): cutting such a prompt to its last
    max_prompt_length tokens would keep too little of it. Longer-than-max_prompt_length prompts below that are
    left-truncated as usual."""
    _check_lengths(max_length, max_prompt_length)
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no EOS token to end responses with")

    def tokenize_rows(rows):  # a batch of rows: each column a list (one tokenizer call per column)
        prompts = _ids_batch(tokenizer, [format_prompt(tokenizer, p, template, system_prompt) for p in rows["prompt"]])
        chosen, rejected = _ids_batch(tokenizer, rows["chosen"]), _ids_batch(tokenizer, rows["rejected"])
        pairs = [_truncate_pair(p, c, r, tokenizer.eos_token_id, max_length, max_prompt_length)
                 for p, c, r in zip(prompts, chosen, rejected)]
        return {**{k: [pair[k] for pair in pairs] for k in ("prompt_ids", "chosen_ids", "rejected_ids")},
                "prompt_too_long": [len(p) > max_length for p in prompts]}

    if len(dataset) == 0:
        return _empty_with(dataset, ("prompt_ids", "chosen_ids", "rejected_ids"))
    tokenized = dataset.map(tokenize_rows, batched=True, batch_size=1000)
    too_long = sum(tokenized["prompt_too_long"])
    if too_long and too_long == len(tokenized):
        raise InputError(f"--max-length: every prompt is longer than max_length={max_length} tokens (all "
                         f"{too_long} pairs); expected a --max-length above the prompts' lengths")
    if too_long:
        warn_once(f"skipped {too_long} of {len(tokenized)} pairs whose prompt alone is longer than "
                  f"max_length={max_length} tokens")
        tokenized = tokenized.filter(lambda flag: not flag, input_columns="prompt_too_long")
    return tokenized.remove_columns("prompt_too_long")


def tokenize_prompt_dataset(dataset, tokenizer, max_prompt_length, template=None, system_prompt=None):
    """Add prompt_ids (left-truncated to max_prompt_length) to a prompt Dataset (load_prompt_dataset), each prompt
    formatted with `template` and `system_prompt` (templates.format_prompt; None: none added)."""
    _check_lengths(None, max_prompt_length)
    if len(dataset) == 0:
        return _empty_with(dataset, ("prompt_ids",))
    return dataset.map(lambda rows: {"prompt_ids": [ids[-max_prompt_length:] for ids in _ids_batch(
        tokenizer, [format_prompt(tokenizer, p, template, system_prompt) for p in rows["prompt"]])]}, batched=True,
        batch_size=1000)


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
