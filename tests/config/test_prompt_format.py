"""Unit tests for RayLLM prompt formats compiled into Jinja chat templates (rayllm_app.config.prompt_format).

The expected strings are the outputs of the former Python renderer (RayLLM's algorithm,
``render_prompt_format``), kept as literals: the oracle the compiled template must match.
Templates are rendered as transformers and vLLM render them: an immutable sandboxed Jinja
environment with trim_blocks/lstrip_blocks and a ``raise_exception`` global.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rayllm_app.config import PromptFormat, load_model_config, parse_model_config
from rayllm_app.config.prompt_format import chat_template

ROOT = Path(__file__).resolve().parents[2]

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


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
ENV.globals["raise_exception"] = _raise_exception


def msgs(*pairs: tuple[str, Any]) -> list[dict[str, Any]]:
    return [{"role": role, "content": content} for role, content in pairs]


def render(fmt: PromptFormat, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    return ENV.from_string(chat_template(fmt)).render(messages=messages, add_generation_prompt=add_generation_prompt)


# ---------------------------------------------------------------- the oracle: RayLLM's outputs


def test_user_only():
    assert render(TAGGED, msgs(("user", "hello1"))) == "[user] hello1 [/user] [assistant]"


def test_system_then_user():
    prompt = render(TAGGED, msgs(("system", "s1"), ("user", "u1")))
    assert prompt == "[system] s1 [/system] [user] u1 [/user] [assistant]"


def test_multi_turn_with_assistant_turns():
    prompt = render(TAGGED, msgs(
        ("system", "s"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"), ("user", "u3")))
    assert prompt == ("[system] s [/system] [user] u1 [/user] [assistant] a1 [/assistant] "
                      "[user] u2 [/user] [assistant] a2 [/assistant] [user] u3 [/user] [assistant]")


def test_system_message_after_user_moves_to_the_top():
    prompt = render(TAGGED, msgs(("user", "u1"), ("system", "s1")))
    assert prompt == "[system] s1 [/system] [user] u1 [/user] [assistant]"


def test_default_system_message_used_only_without_a_system_message():
    fmt = TAGGED.model_copy(update={"default_system_message": "Default"})
    assert render(fmt, msgs(("user", "u"))) == "[system] Default [/system] [user] u [/user] [assistant]"
    assert render(fmt, msgs(("system", "Mine"), ("user", "u"))) == (
        "[system] Mine [/system] [user] u [/user] [assistant]")


def test_empty_system_message_emits_no_tags_by_default():
    assert render(TAGGED, msgs(("system", ""), ("user", "u"))) == "[user] u [/user] [assistant]"
    # an explicit empty system message also suppresses the default one
    fmt = TAGGED.model_copy(update={"default_system_message": "Default"})
    assert render(fmt, msgs(("system", ""), ("user", "u"))) == "[user] u [/user] [assistant]"


def test_whitespace_only_system_message_keeps_its_tags():
    # RayLLM tests the raw message, then strips it: tags with empty content.
    assert render(TAGGED, msgs(("system", "  "), ("user", "u"))) == (
        "[system]  [/system] [user] u [/user] [assistant]")


def test_add_system_tags_even_if_message_is_empty():
    fmt = TAGGED.model_copy(update={"add_system_tags_even_if_message_is_empty": True})
    assert render(fmt, msgs(("user", "u"))) == "[system]  [/system] [user] u [/user] [assistant]"
    assert render(fmt, msgs(("system", ""), ("user", "u"))) == "[system]  [/system] [user] u [/user] [assistant]"


def test_trailing_assistant_is_appended_once_at_the_end():
    fmt = TAGGED.model_copy(update={"trailing_assistant": "<GO>"})
    prompt = render(fmt, msgs(("user", "u1"), ("assistant", "a1"), ("user", "u2")))
    assert prompt == "[user] u1 [/user] [assistant] a1 [/assistant] [user] u2 [/user] <GO>"


def test_no_generation_prompt_leaves_out_trailing_assistant():
    prompt = render(TAGGED, msgs(("user", "u1"), ("assistant", "a1")), add_generation_prompt=False)
    assert prompt == "[user] u1 [/user] [assistant] a1 [/assistant] "


def test_strip_whitespace_on_and_off():
    conversation = msgs(("user", "hello1 "), ("assistant", " hello2"), ("user", "\nhello3\t"))
    assert render(TAGGED, conversation) == (
        "[user] hello1 [/user] [assistant] hello2 [/assistant] [user] hello3 [/user] [assistant]")
    keep = TAGGED.model_copy(update={"strip_whitespace": False})
    assert render(keep, conversation) == (
        "[user] hello1  [/user] [assistant]  hello2 [/assistant] [user] \nhello3\t [/user] [assistant]")


def test_strip_whitespace_applies_to_the_system_message():
    conversation = msgs(("system", " s \n"), ("user", "u"))
    assert render(TAGGED, conversation) == "[system] s [/system] [user] u [/user] [assistant]"
    keep = TAGGED.model_copy(update={"strip_whitespace": False})
    assert render(keep, conversation) == "[system]  s \n [/system] [user] u [/user] [assistant]"


def test_system_in_user_folds_system_into_first_user_turn_only():
    prompt = render(LLAMA2, msgs(("system", "s1"), ("user", "u1"), ("assistant", "a1"), ("user", "u2")))
    assert prompt == "[INST] <<SYS>>\ns1\n<</SYS>>\n\nu1 [/INST] a1 </s><s> [INST] u2 [/INST] "


def test_system_in_user_without_system_message():
    prompt = render(LLAMA2, msgs(("user", "u1"), ("assistant", "a1"), ("user", "u2")))
    assert prompt == "[INST] u1 [/INST] a1 </s><s> [INST] u2 [/INST] "


def test_system_in_user_uses_default_system_message():
    fmt = LLAMA2.model_copy(update={"default_system_message": "Test"})
    assert render(fmt, msgs(("user", "u1"))) == "[INST] <<SYS>>\nTest\n<</SYS>>\n\nu1 [/INST] "
    # an explicit system message wins over the default
    assert render(fmt, msgs(("system", "Mine"), ("user", "u1"))) == (
        "[INST] <<SYS>>\nMine\n<</SYS>>\n\nu1 [/INST] ")


def test_system_in_user_add_system_tags_even_if_empty():
    fmt = LLAMA2.model_copy(update={"add_system_tags_even_if_message_is_empty": True})
    assert render(fmt, msgs(("user", "hello1"))) == "[INST] <<SYS>>\n\n<</SYS>>\n\nhello1 [/INST] "


def test_system_in_user_empty_system_message_without_tags():
    assert render(LLAMA2, msgs(("system", ""), ("user", "u1"))) == "[INST] u1 [/INST] "


def test_system_in_user_system_after_assistant_turn_lands_in_first_user_turn():
    prompt = render(LLAMA2, msgs(("user", "u1"), ("assistant", "a1"), ("system", "s"), ("user", "u2")))
    assert prompt == "[INST] <<SYS>>\ns\n<</SYS>>\n\nu1 [/INST] a1 </s><s> [INST] u2 [/INST] "


def test_developer_role_is_treated_as_system():
    assert render(TAGGED, msgs(("developer", "d"), ("user", "u"))) == (
        "[system] d [/system] [user] u [/user] [assistant]")
    with pytest.raises(TemplateError, match="one system message"):
        render(TAGGED, msgs(("developer", "d"), ("system", "s"), ("user", "u")))


def test_content_parts_are_joined():
    message = {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}
    assert render(TAGGED, [message]) == "[user] hello [/user] [assistant]"
    system = {"role": "system", "content": [{"type": "text", "text": " s"}, {"type": "text", "text": "1 "}]}
    assert render(LLAMA2, [system, message]) == "[INST] <<SYS>>\ns1\n<</SYS>>\n\nhello [/INST] "


def test_null_content_is_empty():
    assert render(TAGGED, msgs(("user", "u"), ("assistant", None), ("user", "v"))) == (
        "[user] u [/user] [assistant]  [/assistant] [user] v [/user] [assistant]")


def test_braces_and_jinja_syntax_in_message_content_are_literal():
    assert render(TAGGED, msgs(("user", "{instruction} {system} {0}"))) == (
        "[user] {instruction} {system} {0} [/user] [assistant]")
    assert render(TAGGED, msgs(("user", "{{ 7*7 }} {% if x %}"))) == (
        "[user] {{ 7*7 }} {% if x %} [/user] [assistant]")


def test_quotes_newlines_backslashes_jinja_and_unicode_in_the_format_are_literal():
    fmt = PromptFormat(
        system="<s>\"sys\" '{instruction}'\\n\n",
        user="{{% raw %}} {{{{ x }}}} {{# c #}}\t{instruction} é😀\r\n",
        assistant="{instruction}\\",
        trailing_assistant="\"A\":\n",
    )
    prompt = render(fmt, msgs(("system", "S"), ("user", "U"), ("assistant", "B"), ("user", "V")))
    assert prompt == ("<s>\"sys\" 'S'\\n\n{% raw %} {{ x }} {# c #}\tU é😀\r\nB\\"
                      "{% raw %} {{ x }} {# c #}\tV é😀\r\n\"A\":\n")


def test_mistral_example_prompt_format():
    fmt = load_model_config(ROOT / "models" / "mistral-7b-instruct.yaml").engine_config.generation.prompt_format
    assert fmt is not None
    prompt = render(fmt, msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")))
    assert prompt == "[INST] Be brief.\n\nHi [/INST] Hello</s>[INST] Bye [/INST]"


def test_rayllm_readme_prompt_format():
    # The prompt_format of RayLLM's model template (tests/data/rayllm-template.yaml).
    fmt = PromptFormat(
        system="{instruction}\n", assistant="### Response:\n{instruction}\n", trailing_assistant="### Response:\n",
        user="### Instruction:\n{instruction}\n",
        default_system_message="Below is an instruction that describes a task. Write a response that "
                               "appropriately completes the request.",
        strip_whitespace=False,
    )
    assert render(fmt, msgs(("user", "Say hi"))) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n### Instruction:\nSay hi\n### Response:\n")


# ---------------------------------------------------------------- rejected conversations


def test_two_system_messages_raise_through_raise_exception():
    with pytest.raises(TemplateError, match="Only one system message is supported"):
        render(TAGGED, msgs(("system", "a"), ("user", "u"), ("system", "b")))
    with pytest.raises(TemplateError, match="one system message"):
        render(LLAMA2, msgs(("system", "a"), ("system", "b"), ("user", "u")))


def test_two_system_messages_win_over_a_tool_message():
    with pytest.raises(TemplateError, match="one system message"):
        render(TAGGED, msgs(("user", "u"), ("tool", "t"), ("system", "a"), ("system", "b")))


def test_tool_messages_rejected():
    with pytest.raises(TemplateError, match="Tool messages are not supported"):
        render(TAGGED, msgs(("user", "u"), ("tool", "result")))


def test_non_text_content_part_rejected():
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}
    with pytest.raises(TemplateError, match="Only text content"):
        render(TAGGED, [image])


# ---------------------------------------------------------------- prompt format validation


def test_system_placeholder_without_system_in_user_is_rejected():
    with pytest.raises(ValueError, match="only when system_in_user is true"):
        PromptFormat(user="[INST] {system}{instruction} [/INST]", system_in_user=False)


@pytest.mark.parametrize("template", ["{bos}[INST] {instruction} [/INST]", '{"text": "{instruction}"}',
                                      "{instruction!r}", "{instruction:>9}", "{instruction.x}", "{} {instruction}"])
def test_template_with_unknown_placeholder_is_rejected_at_load(template: str):
    with pytest.raises(ValueError, match="placeholder other than"):
        PromptFormat(user=template)


@pytest.mark.parametrize("field", ["system", "assistant"])
def test_system_placeholder_only_in_user(field: str):
    with pytest.raises(ValueError, match=r"placeholder other than \{instruction\} \(\{system\}\)"):
        PromptFormat(**{field: "{system}{instruction}"})


# ---------------------------------------------------------------- real renderers


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_path))


@pytest.mark.parametrize(("fmt", "conversation", "expected"), [
    (TAGGED, msgs(("system", "s"), ("user", " u1 "), ("assistant", "a1"), ("user", "u2")),
     "[system] s [/system] [user] u1 [/user] [assistant] a1 [/assistant] [user] u2 [/user] [assistant]"),
    (LLAMA2.model_copy(update={"default_system_message": "D"}),
     msgs(("user", [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])),
     "[INST] <<SYS>>\nD\n<</SYS>>\n\nab [/INST] "),
    (TAGGED, msgs(("developer", "d"), ("user", "{{ x }}")), "[system] d [/system] [user] {{ x }} [/user] [assistant]"),
], ids=["tagged", "system-in-user", "developer"])
def test_transformers_apply_chat_template_gives_the_same(tiny_tokenizer, fmt, conversation, expected):
    prompt = tiny_tokenizer.apply_chat_template(conversation, chat_template=chat_template(fmt), tokenize=False,
                                                add_generation_prompt=True)
    assert prompt == expected


def test_transformers_apply_chat_template_raises_for_two_system_messages(tiny_tokenizer):
    with pytest.raises(TemplateError, match="one system message"):
        tiny_tokenizer.apply_chat_template(msgs(("system", "a"), ("system", "b"), ("user", "u")),
                                           chat_template=chat_template(TAGGED), tokenize=False,
                                           add_generation_prompt=True)


def test_vllm_passes_content_parts_unjoined():
    """vLLM inspects a template to decide whether messages keep their list of parts ("openai")
    or get them joined with newlines first ("string"); ours joins parts itself, as RayLLM does."""
    hf = pytest.importorskip("vllm.renderers.hf")
    template = chat_template(LLAMA2)
    assert hf._detect_content_format(template, default="string") == "openai"
    assert hf._detect_developer_role_support(template)  # vLLM leaves "developer" to the template


def test_model_config_compiles_prompt_format_into_frontend_chat_template():
    config = parse_model_config({"engine_config": {"model_id": "m", "generation": {
        "prompt_format": LLAMA2.model_dump()}}})
    kwargs = config.engine_config.vllm_frontend_kwargs()
    assert kwargs == {"chat_template": chat_template(LLAMA2)}
    assert "chat_template" not in config.engine_config.vllm_engine_kwargs()
