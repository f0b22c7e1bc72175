"""One normaliser per Hub data set: a raw row, exactly as the Hub stores it, -> rows of the common schema (schema.py).

Each normaliser is a generator: it yields a normalised row, or a short string naming why something was skipped
(schema.checked names the common reasons; a source adds its own, e.g. "tied pair"). The loader (loading.py) counts
those strings and warns once. No I/O here: every function takes and returns plain Python values.

Prompt turns are stripped of surrounding whitespace; responses are kept verbatim (except hh-rlhf, where the space after
"Assistant:" is part of the transcript format).
"""
import math
import re

from .schema import checked, is_finite, is_number, prompt_problem, user_turn

MAX_PAIRS_PER_QUESTION = 10  # stack-exchange-preferences: at most this many pairs per question (the StackLLaMA setup)


# ---------------------------------------------------------------- juyoungml/HelpSteer2-binarized
# prompt, chosen, rejected are strings; chosen_score, rejected_score, score_diff numbers (-> margin). Multi-turn
# prompts follow nvidia/HelpSteer2: "{user 1}\n<extra_id_1>Assistant\n{assistant 1}\n<extra_id_1>User\n{user 2}".
_HELPSTEER_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n")


def helpsteer2_messages(prompt):
    """Split a HelpSteer2 prompt string into messages at its <extra_id_1>User / <extra_id_1>Assistant markers."""
    if not isinstance(prompt, str):
        return prompt  # for checked() to name
    parts = _HELPSTEER_TURN.split(prompt)  # [user 1, "Assistant", assistant 1, "User", user 2, ...]
    roles = ["User"] + parts[1::2]
    return [{"role": role.lower(), "content": text.strip()} for role, text in zip(roles, parts[0::2])]


def helpsteer2(row):
    if row["score_diff"] is None:  # checked() would otherwise fall back to chosen_score - rejected_score
        yield "missing field"
        return
    yield checked(helpsteer2_messages(row["prompt"]), row["chosen"], row["rejected"],
                  (row["chosen_score"], row["rejected_score"]), margin=row["score_diff"])


# ---------------------------------------------------------------- argilla/ultrafeedback-binarized-preferences-cleaned
# prompt is a string; chosen / rejected are message lists [user, assistant] whose last (assistant) turn is the
# response; chosen-rating / rejected-rating are mean ratings (margin = their difference).
def last_assistant_turn(messages):
    """Content of the final message when it is an assistant turn, else None."""
    last = messages[-1] if isinstance(messages, list) and messages else None
    return last.get("content") if isinstance(last, dict) and last.get("role") == "assistant" else None


def ultrafeedback(row):
    chosen, rejected = last_assistant_turn(row["chosen"]), last_assistant_turn(row["rejected"])
    if chosen is None or rejected is None:
        yield "no final assistant turn"
        return
    yield checked(user_turn(row["prompt"]), chosen, rejected, (row["chosen-rating"], row["rejected-rating"]))


# ---------------------------------------------------------------- Anthropic/hh-rlhf (data_dir="helpful-base")
# chosen / rejected are whole transcripts "\n\nHuman: ...\n\nAssistant: ...". They share every turn but the last.
_SPEAKERS = (("Human:", "user"), ("Assistant:", "assistant"))


def hh_messages(transcript):
    """Messages of an hh-rlhf transcript. A line starting "Human:" or "Assistant:" opens a turn; any other line
    (a continuation, or a blank line between paragraphs) joins the turn before it. None if text precedes the
    first turn."""
    if not isinstance(transcript, str):
        return None
    messages = []
    for line in transcript.split("\n"):
        speaker = next(((tag, role) for tag, role in _SPEAKERS if line.startswith(tag)), None)
        if speaker is not None:
            messages.append({"role": speaker[1], "content": line[len(speaker[0]):]})
        elif messages:
            messages[-1]["content"] += "\n" + line
        elif line.strip():
            return None
    return [{"role": m["role"], "content": m["content"].strip()} for m in messages]


def hh_rlhf(row):
    chosen, rejected = hh_messages(row["chosen"]), hh_messages(row["rejected"])
    if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        yield "malformed transcript"
    elif chosen[:-1] != rejected[:-1]:
        yield "chosen and rejected prompts differ"
    else:
        yield checked(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


# ---------------------------------------------------------------- HuggingFaceH4/stack-exchange-preferences
# One row per question: question (HTML, kept as is) and answers [{answer_id, pm_score, selected, text, ...}].
def stack_exchange_score(upvotes, accepted):
    """The Askell et al. (2021) preference-model score of an answer from its raw votes:
    round(log2(1 + upvotes)) + (1 if accepted else 0), and -1 (whatever `accepted` is) when upvotes < 0.

    Rounding is half-up (floor(x + 0.5)). For an integer upvotes >= 0, log2(1 + upvotes) is never exactly k + 1/2
    (2^(k+1/2) is irrational), so half-up and Python's round-half-to-even cannot disagree here."""
    if isinstance(upvotes, bool) or not isinstance(upvotes, int):
        raise ValueError(f"stack_exchange_score: upvotes must be an int, got {upvotes!r}")
    if upvotes < 0:
        return -1
    return math.floor(math.log2(1 + upvotes) + 0.5) + (1 if accepted else 0)


def stack_exchange_preferences(row):
    """Pairs within one question, the answer with the higher pm_score chosen. Pairs of tied answers are skipped, and
    answers without text or without a finite number as pm_score (NaN would make every comparison false).
    Which pairs, at most MAX_PAIRS_PER_QUESTION of them: the largest score gaps first (the clearest preferences),
    equal gaps in the order of the answer list (a stable sort), so the choice is deterministic."""
    answers = row["answers"]
    if not isinstance(answers, list):
        yield "missing field"
        return
    usable = [a for a in answers if isinstance(a, dict) and isinstance(a.get("text"), str) and a["text"].strip()
              and is_number(a.get("pm_score")) and is_finite(a["pm_score"])]
    for _ in range(len(answers) - len(usable)):
        yield "unusable answer"
    pairs = [(a, b) for i, a in enumerate(usable) for b in usable[i + 1:]]
    untied = [(a, b) for a, b in pairs if a["pm_score"] != b["pm_score"]]
    for _ in range(len(pairs) - len(untied)):
        yield "tied pair"
    if not untied:
        yield "question without two differently scored answers"
    untied.sort(key=lambda pair: -abs(pair[0]["pm_score"] - pair[1]["pm_score"]))
    for _ in untied[MAX_PAIRS_PER_QUESTION:]:
        yield f"pair beyond {MAX_PAIRS_PER_QUESTION} per question"
    for a, b in untied[:MAX_PAIRS_PER_QUESTION]:
        better, worse = (a, b) if a["pm_score"] > b["pm_score"] else (b, a)
        yield checked(user_turn(row["question"]), better["text"], worse["text"],
                      (better["pm_score"], worse["pm_score"]))


# ---------------------------------------------------------------- lvwerra/stack-exchange-paired
# question, response_j (preferred) and response_k, already paired; no scores.
def stack_exchange_paired(row):
    yield checked(user_turn(row["question"]), row["response_j"], row["response_k"])


# ------------------------------------------------------------ rajpurkar/squad (prompts; the multi-adapter PPO setup)
def squad(row):
    """The question alone (no context paragraph) as a one-turn prompt."""
    prompt = user_turn(row["question"])
    yield prompt_problem(prompt) or {"prompt": prompt}
