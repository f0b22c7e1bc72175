"""Prompt formats: exact strings for the chat template and each named plain template, single- and multi-turn."""
import pytest
from conftest import make_chat_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from minirlhf.data.templates import TEMPLATES, format_prompt

ONE = [{"role": "user", "content": "What is 2+2?"}]
MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]


def test_chat_template_with_generation_prompt(chat_tokenizer):
    assert format_prompt(chat_tokenizer, ONE) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt(chat_tokenizer, MULTI) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi.<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("template, one, multi", [
    ("question-answer", "### Question: What is 2+2?\n\n### Answer:",
     "Be brief.\n\n### Question: Hi.\n\n### Answer: Hello!\n\n### Question: What is 2+2?\n\n### Answer:"),
    ("qa", "Question: What is 2+2?\n\nAnswer: ",
     "Be brief.\n\nQuestion: Hi.\n\nAnswer: Hello!\n\nQuestion: What is 2+2?\n\nAnswer: "),
    ("llama3",
     "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n",
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nHi.<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_plain_templates(chat_tokenizer, template, one, multi):
    assert sorted(TEMPLATES) == ["llama3", "qa", "question-answer"]
    # a named template wins over the tokenizer's chat template; no tokenizer is needed for one
    assert format_prompt(chat_tokenizer, ONE, template) == format_prompt(None, ONE, template) == one
    assert format_prompt(None, MULTI, template) == multi


def test_braces_in_content_are_kept():
    assert format_prompt(None, [{"role": "user", "content": "Fill {x} and {}"}], "qa") == \
        "Question: Fill {x} and {}\n\nAnswer: "


def bos_tokenizer():
    """A word-level tokenizer that, like Llama's, puts <s> before plain text."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", "Question:", "Answer:", "hi"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_plain_templates_start_with_bos_only_when_the_tokenizer_adds_one(chat_tokenizer):
    tokenizer, hi = bos_tokenizer(), [{"role": "user", "content": "hi"}]
    text = format_prompt(tokenizer, hi, "qa")
    assert text == "<s>Question: hi\n\nAnswer: "
    # tokenised as written, it gives exactly what the tokenizer itself makes of the plain text
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer("Question: hi\n\nAnswer: ")["input_ids"]
    assert format_prompt(tokenizer, hi, "llama3").startswith("<|begin_of_text|><|start_header_id|>")  # its own BOS
    assert format_prompt(chat_tokenizer, hi, "qa") == "Question: hi\n\nAnswer: "  # no BOS token at all


def test_no_chat_template_asks_for_template():
    with pytest.raises(ValueError, match="no chat template: pass --template with one of question-answer, qa, llama3"):
        format_prompt(make_chat_tokenizer(chat_template=None), ONE)
    with pytest.raises(ValueError, match="no chat template"):
        format_prompt(None, ONE)


@pytest.mark.parametrize("messages, template, message", [
    (ONE, "alpaca", "unknown template 'alpaca'; expected one of question-answer, qa, llama3"),
    ([], "qa", "empty prompt|malformed prompt"),
    (ONE + [{"role": "assistant", "content": "4"}], "qa", "not ending with a user turn"),
    ([{"role": "user", "content": "  "}], "qa", "empty prompt"),
    ([{"role": "robot", "content": "hi"}], "qa", "malformed prompt"),
    ("What is 2+2?", "qa", "malformed prompt"),
])
def test_bad_input(messages, template, message):
    with pytest.raises(ValueError, match=message) as error:
        format_prompt(None, messages, template)
    assert "\n" not in str(error.value)


# ---- --system-prompt: one system message before every prompt, unless the data's prompt starts with its own
SYSTEM = "You are a helpful, concise assistant."


def test_system_prompt_in_the_chat_template(chat_tokenizer):
    assert format_prompt(chat_tokenizer, ONE, system_prompt=SYSTEM) == (
        "<|im_start|>system\nYou are a helpful, concise assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    # the data's own system message is kept; None changes nothing
    assert format_prompt(chat_tokenizer, MULTI, system_prompt=SYSTEM) == format_prompt(chat_tokenizer, MULTI)
    assert format_prompt(chat_tokenizer, ONE, system_prompt=None) == format_prompt(chat_tokenizer, ONE)


@pytest.mark.parametrize("template, expected", [
    ("llama3", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
               "You are a helpful, concise assistant.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("qa", "You are a helpful, concise assistant.\n\nQuestion: What is 2+2?\n\nAnswer: "),
])
def test_system_prompt_in_the_plain_templates(template, expected):
    assert format_prompt(None, ONE, template, system_prompt=SYSTEM) == expected
    assert format_prompt(None, MULTI, template, system_prompt=SYSTEM) == format_prompt(None, MULTI, template)
    assert ONE == [{"role": "user", "content": "What is 2+2?"}]  # the data's messages are not modified


def test_a_chat_template_without_a_system_role_and_an_empty_system_prompt_are_one_line():
    refusing = make_chat_tokenizer(chat_template="{% if messages[0]['role'] == 'system' %}"
                                                 "{{ raise_exception('System role not supported') }}{% endif %}")
    with pytest.raises(ValueError, match="--system-prompt: the tokenizer's chat template refuses a system message "
                                         r"\(System role not supported\)"):
        format_prompt(refusing, ONE, system_prompt=SYSTEM)
    with pytest.raises(ValueError, match="--system-prompt: expected some text"):
        format_prompt(None, ONE, "qa", system_prompt="  ")
