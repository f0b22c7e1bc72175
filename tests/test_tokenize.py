"""Tokenisation and collation: the truncation rules, the loss mask, and padding on either side, checked against
hand-written expected tensors and against decoding."""
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_chat_tokenizer
from datasets import Dataset

from minirlhf.data import load_preference_dataset
from minirlhf.data.templates import format_prompt
from minirlhf.data.tokenize import (collate_pairs, collate_prompts, pad, pair_batches, require_pad_token, tokenize_pair,
                                    tokenize_preference_dataset, tokenize_prompt, tokenize_prompt_dataset)

FIXTURES = Path(__file__).parent / "fixtures"
LONG_CHAT = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "Paris is the capital of France."},
             {"role": "user", "content": "And the capital?"}]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_pair_ids_and_eos(chat_tokenizer):
    prompt = format_prompt(chat_tokenizer, LONG_CHAT[:1])
    pair = tokenize_pair(chat_tokenizer, prompt, "Paris.", "Lyon.", max_length=64, max_prompt_length=32)
    eos = chat_tokenizer.eos_token_id
    assert pair == {"prompt_ids": ids(chat_tokenizer, prompt), "chosen_ids": ids(chat_tokenizer, "Paris.") + [eos],
                    "rejected_ids": ids(chat_tokenizer, "Lyon.") + [eos]}


def test_left_truncation_keeps_the_end_of_the_prompt(chat_tokenizer):
    prompt = format_prompt(chat_tokenizer, LONG_CHAT)
    full = ids(chat_tokenizer, prompt)
    assert len(full) > 12
    kept = tokenize_prompt(chat_tokenizer, prompt, max_prompt_length=12)["prompt_ids"]
    assert kept == full[-12:]
    assert chat_tokenizer.decode(kept).endswith("capital?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenize_prompt(chat_tokenizer, "Paris", max_prompt_length=12)["prompt_ids"] == ids(chat_tokenizer, "Paris")


def test_long_response_is_cut_on_the_right_without_eos(chat_tokenizer):
    prompt = format_prompt(chat_tokenizer, LONG_CHAT[:1])
    n_prompt, long_text = len(ids(chat_tokenizer, prompt)), "Paris is the capital of France. " * 5
    max_length = n_prompt + 6
    pair = tokenize_pair(chat_tokenizer, prompt, long_text, "Lyon.", max_length, max_prompt_length=n_prompt)
    assert pair["chosen_ids"] == ids(chat_tokenizer, long_text)[:6]  # cut: no EOS
    assert chat_tokenizer.eos_token_id not in pair["chosen_ids"]
    assert pair["rejected_ids"][-1] == chat_tokenizer.eos_token_id  # short enough: ends with EOS


# Two hand-made pairs: pad id 0, EOS 2. Lengths: 4, 5 (pair 1) and 5, 2 (pair 2), so T = 5.
PAIRS = [{"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2], "margin": 1.5},
         {"prompt_ids": [10], "chosen_ids": [11, 12, 13, 2], "rejected_ids": [2], "margin": 0.5}]


def test_collate_pairs_right_padding():
    batch = collate_pairs(PAIRS, pad_token_id=0, padding_side="right")
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 0], [10, 11, 12, 13, 2],   # chosen rows
                                           [5, 6, 8, 9, 2], [10, 2, 0, 0, 0]]      # rejected rows
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert batch["margin"].tolist() == [1.5, 0.5]


def test_collate_pairs_left_padding():
    batch = collate_pairs(PAIRS, pad_token_id=0, padding_side="left")
    assert batch["input_ids"].tolist() == [[0, 5, 6, 7, 2], [10, 11, 12, 13, 2], [5, 6, 8, 9, 2], [0, 0, 0, 10, 2]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert batch["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]]


def test_both_padding_sides_hold_the_same_real_tokens(chat_tokenizer):
    rows = [tokenize_pair(chat_tokenizer, format_prompt(chat_tokenizer, LONG_CHAT[:k]), chosen, "No.", 48, 24)
            for k, chosen in ((1, "Paris."), (3, "Paris is the capital of France."))]
    pad_id = require_pad_token(chat_tokenizer)
    right, left = (collate_pairs(rows, pad_id, side) for side in ("right", "left"))
    assert pad_id != chat_tokenizer.eos_token_id
    for r in range(4):
        real_right, real_left = right["attention_mask"][r].bool(), left["attention_mask"][r].bool()
        assert torch.equal(right["input_ids"][r][real_right], left["input_ids"][r][real_left])
        assert torch.equal(right["response_mask"][r][real_right], left["response_mask"][r][real_left])
        assert (right["input_ids"][r][~real_right] == pad_id).all()
        assert (left["input_ids"][r][~real_left] == pad_id).all()
    # the loss mask covers exactly the response and its EOS
    chosen = right["input_ids"][1][right["response_mask"][1].bool()]
    assert chat_tokenizer.decode(chosen) == "Paris is the capital of France.<|im_end|>"


def test_collate_prompts_left_pads_and_passes_fields_through():
    batch = collate_prompts([{"prompt_ids": [4, 5, 6], "prompt": "a"}, {"prompt_ids": [7], "prompt": "b"}], 0)
    assert batch["input_ids"].tolist() == [[4, 5, 6], [0, 0, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["prompt"] == ["a", "b"]


def test_pad_token_must_not_be_eos(chat_tokenizer):
    assert require_pad_token(chat_tokenizer) == 0
    no_pad = make_chat_tokenizer()
    no_pad.pad_token = no_pad.eos_token
    with pytest.raises(ValueError, match="pad token distinct from EOS"):
        require_pad_token(no_pad)


def test_dataset_helper_skips_prompts_longer_than_max_length(chat_tokenizer):
    data = Dataset.from_list([
        {"prompt": LONG_CHAT[:1], "chosen": "Paris.", "rejected": "Lyon.", "margin": 1.0},
        {"prompt": [{"role": "user", "content": "France? " * 40}], "chosen": "Paris.", "rejected": "Lyon.",
         "margin": 2.0},  # 93 prompt tokens > max_length: skipped
        {"prompt": LONG_CHAT, "chosen": "Paris.", "rejected": "Nice.", "margin": 3.0},  # 45 > max_prompt_length: cut
    ])
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 pairs whose prompt alone is longer than max_length=60"):
        tokenized = tokenize_preference_dataset(data, chat_tokenizer, max_length=60, max_prompt_length=30)
    assert tokenized["margin"] == [1.0, 3.0]
    for row, source in zip(tokenized, (data[0], data[2])):
        expected = tokenize_pair(chat_tokenizer, format_prompt(chat_tokenizer, source["prompt"]), source["chosen"],
                                 source["rejected"], 60, 30)
        assert {key: row[key] for key in expected} == expected
    assert len(tokenized[1]["prompt_ids"]) == 30
    with pytest.raises(ValueError, match="every prompt is longer than max_length=8"):
        tokenize_preference_dataset(data.select([1]), chat_tokenizer, max_length=8, max_prompt_length=4)


def test_loader_to_batch_end_to_end(chat_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = load_preference_dataset("juyoungml/HelpSteer2-binarized",
                                        data_files=str(FIXTURES / "helpsteer2_binarized.jsonl"))
    # prompts of 21, 73 (multi-turn, left-truncated to 64) and 20 tokens
    tokenized = tokenize_preference_dataset(pairs, chat_tokenizer, max_length=96, max_prompt_length=64, template="qa")
    batch = collate_pairs(list(tokenized), require_pad_token(chat_tokenizer), padding_side="right")
    assert batch["input_ids"].shape[0] == 2 * len(pairs) == 6
    assert batch["margin"].tolist() == [3.0, 1.5, 3.0]
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    assert chat_tokenizer.decode(first) == "Question: What is the capital of France?\n\nAnswer: " \
                                           "Paris is the capital of France.<|im_end|>"
    prompts = tokenize_prompt_dataset(pairs.select_columns(["prompt"]), chat_tokenizer, max_prompt_length=48)
    sampled = collate_prompts(list(prompts), require_pad_token(chat_tokenizer))
    assert sampled["attention_mask"][:, -1].all()  # every prompt ends at the last column
    assert all(text.endswith("<|im_start|>assistant\n") for text in chat_tokenizer.batch_decode(sampled["input_ids"]))


@pytest.mark.parametrize("max_length, max_prompt_length, message", [
    (16, 16, "must be smaller than max_length"), (0, 4, "max_length must be a positive int"),
    (16, 2.5, "max_prompt_length must be a positive int")])
def test_bad_lengths(chat_tokenizer, max_length, max_prompt_length, message):
    with pytest.raises(ValueError, match=message):
        tokenize_pair(chat_tokenizer, "Question:", "a", "b", max_length, max_prompt_length)


def test_bad_padding_side_and_text(chat_tokenizer):
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        pad([[1]], 0, "middle")
    with pytest.raises(ValueError, match="expected a string to tokenize, got NoneType"):
        tokenize_pair(chat_tokenizer, "Question:", None, "b", 16, 8)


def test_empty_datasets_keep_their_id_columns(chat_tokenizer):
    # map() never runs on zero rows: without care the id columns were missing and the caller failed on
    # "Column 'prompt_ids' doesn't exist." instead of seeing an empty data set
    pairs = Dataset.from_list([{"prompt": LONG_CHAT[:1], "chosen": "Paris.", "rejected": "Lyon."}]).select([])
    tokenized = tokenize_preference_dataset(pairs, chat_tokenizer, max_length=64, max_prompt_length=32)
    assert len(tokenized) == 0 and tokenized["prompt_ids"][:] == tokenized["chosen_ids"][:] == []
    assert tokenized.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).num_rows == 0
    prompts = tokenize_prompt_dataset(pairs.select_columns(["prompt"]), chat_tokenizer, max_prompt_length=32)
    assert prompts.column_names == ["prompt", "prompt_ids"] and prompts["prompt_ids"][:] == []


def test_length_problems_are_input_errors(chat_tokenizer):
    from minirlhf.errors import InputError
    data = Dataset.from_list([{"prompt": LONG_CHAT, "chosen": "Paris.", "rejected": "Lyon."}])
    with pytest.raises(InputError, match=r"^--max-length: every prompt is longer than max_length=8 tokens \(all 1 "
                                         r"pairs\); expected a --max-length above the prompts' lengths$"):
        tokenize_preference_dataset(data, chat_tokenizer, max_length=8, max_prompt_length=4)
    with pytest.raises(InputError, match="^--max-prompt-length: max_prompt_length"):
        tokenize_prompt_dataset(data, chat_tokenizer, max_prompt_length=0)


def test_too_long_prompt_report_is_printed_once(chat_tokenizer):
    data = Dataset.from_list([{"prompt": LONG_CHAT[:1], "chosen": "Paris.", "rejected": "Lyon."},
                              {"prompt": [{"role": "user", "content": "France? " * 40}], "chosen": "Paris.",
                               "rejected": "Lyon."}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own action for UserWarning
        for _ in range(2):
            tokenize_preference_dataset(data, chat_tokenizer, max_length=60, max_prompt_length=30)
    assert [str(w.message) for w in caught] == [
        "skipped 1 of 2 pairs whose prompt alone is longer than max_length=60 tokens"]


def test_a_system_prompt_goes_before_every_prompt_of_both_dataset_helpers(chat_tokenizer):
    system = "Answer in one word."
    prompts = Dataset.from_list([{"prompt": LONG_CHAT[:1]}, {"prompt": [{"role": "system", "content": "Be kind."},
                                                                         *LONG_CHAT[:1]]}])
    with_system = tokenize_prompt_dataset(prompts, chat_tokenizer, 64, system_prompt=system)["prompt_ids"]
    assert chat_tokenizer.decode(with_system[0]) == ("<|im_start|>system\nAnswer in one word.<|im_end|>\n"
                                                     "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                                     "<|im_start|>assistant\n")
    assert chat_tokenizer.decode(with_system[1]).startswith("<|im_start|>system\nBe kind.<|im_end|>")  # its own
    assert tokenize_prompt_dataset(prompts, chat_tokenizer, 64)["prompt_ids"][0] == \
        ids(chat_tokenizer, format_prompt(chat_tokenizer, LONG_CHAT[:1]))  # default: no system message
    pairs = Dataset.from_list([{"prompt": LONG_CHAT[:1], "chosen": "Paris.", "rejected": "Lyon."}])
    row = tokenize_preference_dataset(pairs, chat_tokenizer, 512, 256, "llama3", system_prompt=system)[0]
    assert row["prompt_ids"] == ids(chat_tokenizer, format_prompt(None, LONG_CHAT[:1], "llama3", system))
    assert "Answer in one word." in chat_tokenizer.decode(row["prompt_ids"])
    assert row["chosen_ids"] == ids(chat_tokenizer, "Paris.") + [chat_tokenizer.eos_token_id]


# ---- length limits derived from the data, and every cut reported
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # SmolLM2's own system prompt


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from minirlhf.assets import TINY_LLAMA
    from minirlhf.models import load_tokenizer
    return load_tokenizer(TINY_LLAMA)


def full_prompt_ids(tokenizer, prompts, system_prompt=None):
    return [ids(tokenizer, format_prompt(tokenizer, p, None, system_prompt)) for p in prompts]


def cut_messages(caught):
    return [str(w.message) for w in caught if "cut" in str(w.message) or "skipped" in str(w.message)]


def test_resolve_lengths():
    from minirlhf.data.tokenize import LENGTH_CAP, PROMPT_LENGTH_CAP, resolve_lengths
    assert resolve_lengths([14, 24, 20]) == (24, None)  # prompts alone: the longest, no max_length
    assert resolve_lengths([14, 24], [5, 31]) == (24, 55)  # pairs: + the longest response (EOS included)
    assert resolve_lengths([14, 24], [5, 31], 32, 64) == (32, 64)  # given values are kept as they are
    assert resolve_lengths([14, 24], [5, 31], max_prompt_length=16) == (16, 47)  # max_length from the kept prompt
    assert resolve_lengths([14, 24], [5, 31], max_prompt_length=40) == (40, 55)
    assert resolve_lengths([14, 70], [5, 31], max_length=64) == (33, 64)  # room for the longest response
    assert resolve_lengths([14, 70], [5, 60], max_length=64) == (32, 64)  # ... but at least half of max_length
    assert resolve_lengths([14, 20], [5, 60], max_length=64) == (20, 64)
    assert resolve_lengths([5000]) == (PROMPT_LENGTH_CAP, None)  # capped
    assert resolve_lengths([5000], [5000]) == (PROMPT_LENGTH_CAP, LENGTH_CAP)
    assert resolve_lengths([3], [1], max_prompt_length=8) == (8, 9)  # max_length stays above max_prompt_length
    with pytest.raises(ValueError, match="must be smaller than max_length"):
        resolve_lengths([3], [1], 8, 8)


def test_derived_limits_give_the_tiny_model_the_same_ids_as_the_old_defaults(tiny_tokenizer):
    """The built-in world's prompts fit the old --max-prompt-length 32 and its pairs --max-length 64 with the tiny
    model's template: the derived limits must tokenise them to the very same ids, and report nothing."""
    from minirlhf.data import load_prompt_dataset
    from minirlhf.data.tokenize import resolve_lengths
    prompts, pairs = load_prompt_dataset("builtin", "train"), load_preference_dataset("builtin", "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cut would be a warning
        derived = tokenize_prompt_dataset(prompts, tiny_tokenizer)["prompt_ids"]
        assert derived == tokenize_prompt_dataset(prompts, tiny_tokenizer, 32)["prompt_ids"]
        derived = tokenize_preference_dataset(pairs, tiny_tokenizer)
        old = tokenize_preference_dataset(pairs, tiny_tokenizer, 64, 32)
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert derived[key] == old[key], key
    lengths = [len(p) for p in full_prompt_ids(tiny_tokenizer, prompts["prompt"])]
    assert resolve_lengths(lengths) == (24, None)  # the values the scripts now run with
    responses = [1 + max(len(ids(tiny_tokenizer, c)), len(ids(tiny_tokenizer, r)))
                 for c, r in zip(pairs["chosen"], pairs["rejected"])]
    assert resolve_lengths([len(p) for p in derived["prompt_ids"]], responses) == (24, 55)


def test_a_long_system_prompt_fits_the_derived_limit_and_an_explicit_one_cuts_and_reports(tiny_tokenizer):
    from minirlhf.data import load_prompt_dataset
    from minirlhf.data.tokenize import reset_truncation_summary, truncation_summary
    prompts = load_prompt_dataset("builtin", "test")
    full = full_prompt_ids(tiny_tokenizer, prompts["prompt"], SMOL_SYSTEM)
    assert min(map(len, full)) > 32  # every prompt is longer than the old default
    reset_truncation_summary()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        derived = tokenize_prompt_dataset(prompts, tiny_tokenizer, system_prompt=SMOL_SYSTEM, name="builtin [test]")
        assert cut_messages(caught) == []
        assert derived["prompt_ids"] == full  # nothing cut: the limit is the longest prompt
        assert truncation_summary() == {"data/prompts_truncated": 0}
        cut = tokenize_prompt_dataset(prompts, tiny_tokenizer, 32, system_prompt=SMOL_SYSTEM, name="builtin [test]")
    assert cut["prompt_ids"] == [p[-32:] for p in full]
    by = [len(p) - 32 for p in full]
    assert cut_messages(caught) == [
        f"builtin [test]: --max-prompt-length 32: cut 120 of 120 prompts (by {min(by)}-{max(by)} tokens, mean "
        f"{sum(by) / len(by):.1f}); they keep their last 32 tokens"]
    assert truncation_summary() == {"data/prompts_truncated": 120}


def test_held_out_prompts_report_their_cuts(tiny_tokenizer):
    from minirlhf.evaluation import held_out_prompts
    with pytest.warns(UserWarning, match=r"^builtin \[test\]: --max-prompt-length 40: cut 6 of 6 prompts \(by "):
        _, prompt_ids = held_out_prompts("builtin", "test", None, tiny_tokenizer, 6, 2, 40, system_prompt=SMOL_SYSTEM)
    assert len(prompt_ids) == 12 and {len(p) for p in prompt_ids} == {40}
    _, prompt_ids = held_out_prompts("builtin", "test", None, tiny_tokenizer, 6, 2, None, system_prompt=SMOL_SYSTEM)
    assert min(map(len, prompt_ids)) > 40  # derived: whole


def test_pairs_report_prompt_and_response_cuts_and_skips(tiny_tokenizer):
    from minirlhf.data.tokenize import reset_truncation_summary, truncation_summary
    pairs = load_preference_dataset("builtin", "test").select(range(40))
    prompts = full_prompt_ids(tiny_tokenizer, pairs["prompt"], SMOL_SYSTEM)
    eos = tiny_tokenizer.eos_token_id
    responses = [(ids(tiny_tokenizer, c) + [eos], ids(tiny_tokenizer, r) + [eos])
                 for c, r in zip(pairs["chosen"], pairs["rejected"])]
    max_length, max_prompt_length = 72, 64  # some prompts are longer than 72 (skipped), most longer than 64 (cut)
    kept = [i for i, p in enumerate(prompts) if len(p) <= max_length]
    assert 0 < len(kept) < len(prompts)
    prompt_cuts = [len(prompts[i]) - max_prompt_length for i in kept if len(prompts[i]) > max_prompt_length]
    response_cuts = [len(r) - (max_length - min(len(prompts[i]), max_prompt_length)) for i in kept
                     for r in responses[i] if min(len(prompts[i]), max_prompt_length) + len(r) > max_length]
    assert prompt_cuts and response_cuts

    def spread(cuts):
        return (f"by {min(cuts)} tokens" if min(cuts) == max(cuts) else
                f"by {min(cuts)}-{max(cuts)} tokens, mean {sum(cuts) / len(cuts):.1f}")
    reset_truncation_summary()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = tokenize_preference_dataset(pairs, tiny_tokenizer, max_length, max_prompt_length,
                                           system_prompt=SMOL_SYSTEM, name="builtin [test]")
    assert cut_messages(caught) == [
        f"builtin [test]: skipped {len(prompts) - len(kept)} of {len(prompts)} pairs whose prompt alone is longer "
        f"than max_length={max_length} tokens; --max-prompt-length {max_prompt_length}: cut {len(prompt_cuts)} of "
        f"{len(kept)} prompts ({spread(prompt_cuts)}); they keep their last {max_prompt_length} tokens; --max-length "
        f"{max_length}: cut {len(response_cuts)} of {2 * len(kept)} responses on the right ({spread(response_cuts)}); "
        f"a cut response has no EOS"]
    assert truncation_summary() == {"data/pairs_skipped": len(prompts) - len(kept),
                                    "data/prompts_truncated": len(prompt_cuts),
                                    "data/responses_truncated": len(response_cuts)}
    for row, i in zip(data, kept):  # the same ids as one pair at a time
        expected = tokenize_pair(tiny_tokenizer, format_prompt(tiny_tokenizer, pairs[i]["prompt"], None, SMOL_SYSTEM),
                                 pairs[i]["chosen"], pairs[i]["rejected"], max_length, max_prompt_length)
        assert {key: row[key] for key in expected} == expected
    assert all(len(row["prompt_ids"]) + len(row[k]) <= max_length for row in data for k in ("chosen_ids",
                                                                                             "rejected_ids"))
    # derived limits: nothing cut, nothing skipped, no line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        whole = tokenize_preference_dataset(pairs, tiny_tokenizer, system_prompt=SMOL_SYSTEM)
    assert cut_messages(caught) == [] and whole["prompt_ids"] == prompts
    assert [(c, r) for c, r in zip(whole["chosen_ids"], whole["rejected_ids"])] == [tuple(r) for r in responses]


def test_optional_lengths_on_the_command_line():
    import train_dpo
    import train_ppo
    from minirlhf.cli import field_docs, parse_args
    from minirlhf.validation import COMMON_RANGES, check_ranges
    args = parse_args(train_dpo.Args, [])
    assert args.max_length is None and args.max_prompt_length is None
    check_ranges(args, COMMON_RANGES)  # none is allowed
    args = parse_args(train_dpo.Args, ["--max-length", "64", "--max-prompt-length", "32"])
    assert (args.max_length, args.max_prompt_length) == (64, 32)
    with pytest.raises(ValueError, match="--max-length must be >= 2"):
        check_ranges(parse_args(train_dpo.Args, ["--max-length", "1"]), {})
    assert parse_args(train_ppo.Args, ["--max-prompt-length", "none"]).max_prompt_length is None
    for module, field in ((train_dpo, "max_length"), (train_dpo, "max_prompt_length"),
                          (train_ppo, "max_prompt_length")):
        assert "default: derived from the data (the longest prompt" in " ".join(field_docs(module.Args)[field].split())


def test_sft_padded_examples_report_their_cuts(tiny_tokenizer):
    import train_sft
    from minirlhf.data import world
    rows = world.sft_rows("test")[:10]
    responses = [len(ids(tiny_tokenizer, r["response"])) + 1 for r in rows]
    block = 40 + sorted(responses)[5]  # some responses fit beside a 40-token prompt, some are cut
    args = train_sft.Args(packing=False, block_size=block, max_prompt_length=40, system_prompt=SMOL_SYSTEM)
    cut = sum(40 + n > block for n in responses)
    assert 0 < cut < 10
    with pytest.warns(UserWarning, match=rf"^builtin \[test\]: --max-prompt-length 40: cut 10 of 10 prompts \(by .*\); "
                                         rf"they keep their last 40 tokens; --block-size {block}: cut {cut} of 10 "
                                         rf"responses on the right"):
        _, attention, loss = train_sft.padded_examples(tiny_tokenizer, rows, args, "builtin [test]")
    assert attention.sum(1).tolist() == [min(block, 40 + n) for n in responses]
    args = train_sft.Args(packing=False, max_prompt_length=None, system_prompt=SMOL_SYSTEM)  # derived: whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, attention, loss = train_sft.padded_examples(tiny_tokenizer, rows, args, "builtin [test]")
    prompts = full_prompt_ids(tiny_tokenizer, [r["prompt"] for r in rows], SMOL_SYSTEM)
    assert loss.sum(1).tolist() == responses
    assert attention.sum(1).tolist() == [len(p) + n for p, n in zip(prompts, responses)]


def test_pair_batches_are_consecutive_collated_pairs():
    data = [{"prompt_ids": [5] * (i + 1), "chosen_ids": [6, 1], "rejected_ids": [7] * (i % 3 + 1) + [1]}
            for i in range(7)]
    batches = list(pair_batches(data, 0, 3))
    assert [len(b["input_ids"]) for b in batches] == [6, 6, 2]  # 3, 3, 1 pairs: 2 rows each
    for start, batch in zip((0, 3, 6), batches):
        expected = collate_pairs(data[start:start + 3], 0)
        assert all(torch.equal(batch[k], expected[k]) for k in ("input_ids", "attention_mask", "response_mask"))
    assert len(list(pair_batches(Dataset.from_list(data), 0, 7))) == 1
