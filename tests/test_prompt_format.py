"""Unit tests for RayLLM prompt formats and the chat-template path (rayllm_app.prompt_format)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayllm_app.config import PromptFormat, load_model_config
from rayllm_app.errors import InvalidRequestError
from rayllm_app.prompt_format import render_chat, render_chat_template, render_prompt_format
from rayllm_app.protocol import ChatMessage

ROOT = Path(__file__).resolve().parents[1]

TAGGED = PromptFormat(
    system="[system] {instruction} [/system] ",
    assistant="[assistant] {instruction} [/assistant] ",
    trailing_assistant="[assistant]",
    user="[user] {instruction} [/user] ",
)
LLAMA2 = PromptFormat(
    system="<<SYS>>\n{instruction}\n<</SYS>>\n\n",
    assistant=" {instruction} </s><s> ",
    trailing_assistant=" ",
    user="[INST] {system}{instruction} [/INST]",
    system_in_user=True,
)


def msgs(*pairs: tuple[str, object]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=content) for role, content in pairs]


# ---------------------------------------------------------------- RayLLM prompt formats


def test_user_only():
    assert render_prompt_format(TAGGED, msgs(("user", "hello1"))) == "[user] hello1 [/user] [assistant]"


def test_system_then_user():
    prompt = render_prompt_format(TAGGED, msgs(("system", "s1"), ("user", "u1")))
    assert prompt == "[system] s1 [/system] [user] u1 [/user] [assistant]"


def test_multi_turn_with_assistant_turns():
    prompt = render_prompt_format(TAGGED, msgs(
        ("system", "s"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"), ("user", "u3")))
    assert prompt == ("[system] s [/system] [user] u1 [/user] [assistant] a1 [/assistant] "
                      "[user] u2 [/user] [assistant] a2 [/assistant] [user] u3 [/user] [assistant]")


def test_system_message_after_user_moves_to_the_top():
    prompt = render_prompt_format(TAGGED, msgs(("user", "u1"), ("system", "s1")))
    assert prompt == "[system] s1 [/system] [user] u1 [/user] [assistant]"


def test_default_system_message_used_only_without_a_system_message():
    fmt = TAGGED.model_copy(update={"default_system_message": "Default"})
    assert render_prompt_format(fmt, msgs(("user", "u"))) == "[system] Default [/system] [user] u [/user] [assistant]"
    assert render_prompt_format(fmt, msgs(("system", "Mine"), ("user", "u"))) == (
        "[system] Mine [/system] [user] u [/user] [assistant]")


def test_empty_system_message_emits_no_tags_by_default():
    assert render_prompt_format(TAGGED, msgs(("system", ""), ("user", "u"))) == "[user] u [/user] [assistant]"


def test_add_system_tags_even_if_message_is_empty():
    fmt = TAGGED.model_copy(update={"add_system_tags_even_if_message_is_empty": True})
    assert render_prompt_format(fmt, msgs(("user", "u"))) == "[system]  [/system] [user] u [/user] [assistant]"


def test_trailing_assistant_is_appended_once_at_the_end():
    fmt = TAGGED.model_copy(update={"trailing_assistant": "<GO>"})
    prompt = render_prompt_format(fmt, msgs(("user", "u1"), ("assistant", "a1"), ("user", "u2")))
    assert prompt.endswith("[user] u2 [/user] <GO>")
    assert prompt.count("<GO>") == 1


def test_strip_whitespace_on_and_off():
    conversation = msgs(("user", "hello1 "), ("assistant", " hello2"), ("user", "\nhello3\t"))
    assert render_prompt_format(TAGGED, conversation) == (
        "[user] hello1 [/user] [assistant] hello2 [/assistant] [user] hello3 [/user] [assistant]")
    keep = TAGGED.model_copy(update={"strip_whitespace": False})
    assert render_prompt_format(keep, conversation) == (
        "[user] hello1  [/user] [assistant]  hello2 [/assistant] [user] \nhello3\t [/user] [assistant]")


def test_system_in_user_folds_system_into_first_user_turn_only():
    prompt = render_prompt_format(LLAMA2, msgs(
        ("system", "s1"), ("user", "u1"), ("assistant", "a1"), ("user", "u2")))
    assert prompt == "[INST] <<SYS>>\ns1\n<</SYS>>\n\nu1 [/INST] a1 </s><s> [INST] u2 [/INST] "
    assert prompt.count("<<SYS>>") == 1


def test_system_in_user_without_system_message():
    prompt = render_prompt_format(LLAMA2, msgs(("user", "u1"), ("assistant", "a1"), ("user", "u2")))
    assert prompt == "[INST] u1 [/INST] a1 </s><s> [INST] u2 [/INST] "


def test_system_in_user_uses_default_system_message():
    fmt = LLAMA2.model_copy(update={"default_system_message": "Test"})
    assert render_prompt_format(fmt, msgs(("user", "u1"))) == "[INST] <<SYS>>\nTest\n<</SYS>>\n\nu1 [/INST] "
    # an explicit system message wins over the default
    assert render_prompt_format(fmt, msgs(("system", "Mine"), ("user", "u1"))) == (
        "[INST] <<SYS>>\nMine\n<</SYS>>\n\nu1 [/INST] ")


def test_system_in_user_add_system_tags_even_if_empty():
    fmt = LLAMA2.model_copy(update={"add_system_tags_even_if_message_is_empty": True})
    assert render_prompt_format(fmt, msgs(("user", "hello1"))) == "[INST] <<SYS>>\n\n<</SYS>>\n\nhello1 [/INST] "


def test_two_system_messages_are_a_400():
    with pytest.raises(InvalidRequestError) as info:
        render_prompt_format(TAGGED, msgs(("system", "a"), ("user", "u"), ("system", "b")))
    assert info.value.status_code == 400
    assert info.value.param == "messages"
    assert "one system message" in info.value.message


def test_developer_role_is_treated_as_system():
    assert render_prompt_format(TAGGED, msgs(("developer", "d"), ("user", "u"))) == (
        "[system] d [/system] [user] u [/user] [assistant]")
    with pytest.raises(InvalidRequestError):
        render_prompt_format(TAGGED, msgs(("developer", "d"), ("system", "s"), ("user", "u")))


def test_tool_messages_rejected():
    with pytest.raises(InvalidRequestError) as info:
        render_prompt_format(TAGGED, msgs(("user", "u"), ("tool", "result")))
    assert info.value.status_code == 400


def test_content_parts_are_joined():
    message = ChatMessage(role="user", content=[{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}])
    assert render_prompt_format(TAGGED, [message]) == "[user] hello [/user] [assistant]"


def test_braces_in_message_content_are_literal():
    assert render_prompt_format(TAGGED, msgs(("user", "{instruction} {system} {0}"))) == (
        "[user] {instruction} {system} {0} [/user] [assistant]")


def test_mistral_example_prompt_format():
    fmt = load_model_config(ROOT / "models" / "mistral-7b-instruct.yaml").engine_config.generation.prompt_format
    assert fmt is not None
    prompt = render_prompt_format(fmt, msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"),
                                            ("user", "Bye")))
    assert prompt == "[INST] Be brief.\n\nHi [/INST] Hello</s>[INST] Bye [/INST]"


def test_system_placeholder_without_system_in_user_is_rejected_or_rendered():
    try:
        fmt = PromptFormat(user="[INST] {system}{instruction} [/INST]", system_in_user=False)
    except ValueError:
        return  # rejected when the config loads: fine
    prompt = render_prompt_format(fmt, msgs(("system", "sys"), ("user", "usr")))
    assert "usr" in prompt and prompt.count("sys") == 1


@pytest.mark.parametrize("template", ["{bos}[INST] {instruction} [/INST]", '{"text": "{instruction}"}'])
def test_template_with_unknown_placeholder_is_rejected_at_load(template: str):
    with pytest.raises(ValueError):
        PromptFormat(user=template)


# ---------------------------------------------------------------- chat template (real tokenizer)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_path))


def test_chat_template_renders_with_generation_prompt(tiny_tokenizer):
    prompt = render_chat_template(tiny_tokenizer, msgs(("system", "S"), ("user", "hi")))
    assert prompt == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_chat_template_sees_developer_as_system(tiny_tokenizer):
    prompt = render_chat_template(tiny_tokenizer, msgs(("developer", "D"), ("user", "hi")))
    assert prompt.startswith("<|im_start|>system\nD<|im_end|>\n")
    assert "developer" not in prompt


def test_render_chat_picks_the_path_and_special_tokens_flag(tiny_tokenizer):
    conversation = msgs(("user", "hi"))
    prompt, add_special = render_chat(None, tiny_tokenizer, conversation)
    assert prompt.startswith("<|im_start|>user") and add_special is False
    prompt, add_special = render_chat(TAGGED, tiny_tokenizer, conversation)
    assert prompt == "[user] hi [/user] [assistant]" and add_special is True


def test_tokenizer_without_chat_template_is_a_clear_400(tiny_model_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_path))
    tokenizer.chat_template = None
    with pytest.raises(InvalidRequestError) as info:
        render_chat(None, tokenizer, msgs(("user", "hi")))
    assert info.value.status_code == 400
    assert "prompt_format" in info.value.message
    assert "chat template" in info.value.message


def test_chat_template_exception_becomes_a_400(tiny_model_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_path))
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    assert render_chat_template(tokenizer, msgs(("user", "ok"))) == "ok"
    with pytest.raises(InvalidRequestError) as info:
        render_chat_template(tokenizer, msgs(("assistant", "a"), ("user", "u")))
    assert info.value.status_code == 400
    assert "must start with user" in info.value.message
