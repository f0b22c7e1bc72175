"""Prompt formats: a messages list -> the exact text the model is asked to continue with its answer.

With template=None the tokenizer's own chat template renders the messages, with add_generation_prompt=True so the
text ends where the assistant's reply begins (the SmolLM2 + HelpSteer2 setup). Base models without a chat template
use a named plain template. One user question q renders as (␣ marks a trailing space):

    "question-answer"  ### Question: {q}\\n\\n### Answer:                     (the QLoRA DPO workshop)
    "qa"               Question: {q}\\n\\nAnswer:␣                            (the StackLLaMA setup)
    "llama3"           (the multi-adapter PPO setup; one line in reality)
                       <|begin_of_text|>[<|start_header_id|>system<|end_header_id|>\\n\\n{sys}<|eot_id|>]
                       <|start_header_id|>user<|end_header_id|>\\n\\n{q}<|eot_id|>
                       <|start_header_id|>assistant<|end_header_id|>\\n\\n

Multi-turn conversations: every turn is rendered with its role's pattern and the turns are joined by the template's
separator, so earlier exchanges read as completed question / answer blocks, e.g. for "qa":

    Question: {u1}\\n\\nAnswer: {a1}\\n\\nQuestion: {u2}\\n\\nAnswer:␣

A system message (put it first) is written as its own block: plain text in "question-answer" and "qa", a system
header in "llama3" (which is how the multi-adapter PPO setup's optional system prompt is given). Contents are used
verbatim. `system_prompt` (the scripts' --system-prompt) puts one system message before every prompt's messages,
except where the data's messages already start with a system message: that prompt keeps its own (a data set that
carries a system message per prompt knows better than one flag for all of them).

The text is later tokenised as written (no special tokens added, see tokenize.py), so it must carry any BOS token
itself: chat templates and "llama3" write theirs; "question-answer" and "qa" start with the tokenizer's BOS token
when the tokenizer puts one before plain text (as Llama tokenizers do; seen by tokenising ""), else with nothing.
"""
from dataclasses import dataclass

from ..errors import InputError
from .schema import prompt_problem


@dataclass(frozen=True)
class PlainTemplate:
    turns: dict           # role -> pattern with {content}
    separator: str        # between turns
    generation: str       # after the last (user) turn: opens the assistant's answer
    prefix: str = ""      # before everything (llama3's BOS)


_LLAMA3_TURN = "<|start_header_id|>{role}<|end_header_id|>\n\n{{content}}<|eot_id|>"
TEMPLATES = {
    "question-answer": PlainTemplate(
        {"system": "{content}", "user": "### Question: {content}", "assistant": "### Answer: {content}"},
        separator="\n\n", generation="\n\n### Answer:"),
    "qa": PlainTemplate(
        {"system": "{content}", "user": "Question: {content}", "assistant": "Answer: {content}"},
        separator="\n\n", generation="\n\nAnswer: "),
    "llama3": PlainTemplate(
        {role: _LLAMA3_TURN.format(role=role) for role in ("system", "user", "assistant")},
        separator="", generation="<|start_header_id|>assistant<|end_header_id|>\n\n", prefix="<|begin_of_text|>"),
}


def format_prompt(tokenizer, messages, template=None, system_prompt=None):
    """The prompt text for `messages` (a list of {"role", "content"} ending with a user turn): the tokenizer's chat
    template when template is None, else the named plain template (TEMPLATES). system_prompt: see
    with_system_prompt (None: the messages as they are)."""
    problem = prompt_problem(messages)
    if problem:
        raise ValueError(f"format_prompt: messages must be a list of {{'role', 'content'}} dicts ending with a "
                         f"non-empty user turn ({problem})")
    messages = with_system_prompt(messages, system_prompt)
    if template is None:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InputError(f"the tokenizer has no chat template: pass --template with one of "
                             f"{', '.join(TEMPLATES)}")
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja2's TemplateError: e.g. "System role not supported" (Gemma's template)
            if system_prompt is None or type(e).__name__ != "TemplateError":
                raise
            raise InputError(f"--system-prompt: the tokenizer's chat template refuses a system message ({e})") from None
    if template not in TEMPLATES:
        raise InputError(f"--template: unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    plain = TEMPLATES[template]
    body = plain.separator.join(plain.turns[m["role"]].format(content=m["content"]) for m in messages)
    return _bos(tokenizer, plain) + plain.prefix + body + plain.generation


def with_system_prompt(messages, system_prompt):
    """`messages` with {"role": "system", "content": system_prompt} put first, unless system_prompt is None or the
    messages already start with a system message (the data's own is kept)."""
    if system_prompt is None or messages[0]["role"] == "system":
        return messages
    if not isinstance(system_prompt, str) or not system_prompt.strip():
        raise InputError(f"--system-prompt: expected some text, got {system_prompt!r} (leave the flag out for none)")
    return [{"role": "system", "content": system_prompt}] + list(messages)


def _bos(tokenizer, plain):
    """The tokenizer's BOS text when a plain template without its own prefix needs it (see the module docstring)."""
    if plain.prefix or tokenizer is None or tokenizer.bos_token is None:
        return ""
    adds_bos = tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    return tokenizer.bos_token if adds_bos else ""
