"""RayLLM prompt formats: their schema (:class:`PromptFormat`), compiled into Jinja chat templates.

A model file's ``generation.prompt_format`` (RayLLM's string templates) becomes the chat
template vLLM's OpenAI app renders (``EngineConfig.vllm_frontend_kwargs``). The template
reproduces RayLLM's algorithm: at most one system message ("developer" counts as one), which
moves to the front or, with ``system_in_user``, into the first user turn; the
``default_system_message`` when the conversation has none; system tags for an empty system
message only with ``add_system_tags_even_if_message_is_empty``; message text stripped with
``strip_whitespace``; ``trailing_assistant`` once at the end when a generation prompt is asked
for. Message content may be a string or a list of ``{"type": "text", "text": ...}`` parts,
which are joined. Two system messages, a tool message or a non-text part make the template
call ``raise_exception``, which vLLM answers with a 400.
"""

from __future__ import annotations

import json
import string

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationInfo,
    field_validator,
    model_validator,
)

ONE_SYSTEM_MESSAGE = "Only one system message is supported by this model's prompt format."
NO_TOOL_MESSAGES = "Tool messages are not supported by this model's prompt format."
TEXT_ONLY = "Only text content is supported by this model's prompt format."


class PromptFormat(BaseModel):
    """RayLLM's prompt format: string templates instead of the tokenizer's chat template."""

    model_config = ConfigDict(extra="forbid", validate_default=True)  # as schema.StrictModel

    system: str = "{instruction}"
    assistant: str = "{instruction}"
    trailing_assistant: str = ""
    user: str = "{instruction}"
    default_system_message: str = ""
    system_in_user: bool = False
    add_system_tags_even_if_message_is_empty: bool = False
    strip_whitespace: bool = True

    @field_validator("system", "assistant", "user")
    @classmethod
    def _needs_instruction(cls, value: str, info: ValidationInfo) -> str:
        allowed = ("instruction", "system") if info.field_name == "user" else ("instruction",)
        shown = "/".join(f"{{{name}}}" for name in allowed)
        try:
            fields = [(name, spec, conversion)
                      for _, name, spec, conversion in string.Formatter().parse(value) if name is not None]
        except ValueError as error:
            raise ValueError(f"is not a valid template ({error}); write literal braces as '{{{{' and '}}}}'") from None
        for name, spec, conversion in fields:
            if name not in allowed or spec or conversion:
                raise ValueError(
                    f"has a placeholder other than {shown} ({{{name}{'!' + conversion if conversion else ''}"
                    f"{':' + spec if spec else ''}}}); write literal braces as '{{{{' and '}}}}'")
        if "instruction" not in {name for name, _, _ in fields}:
            raise ValueError("must contain the placeholder '{instruction}'")
        return value

    @model_validator(mode="after")
    def _system_placeholder(self) -> PromptFormat:
        has_system = "system" in {name for _, name, _, _ in string.Formatter().parse(self.user)}
        if self.system_in_user and not has_system:
            raise ValueError("user must contain '{system}' when system_in_user is true")
        if not self.system_in_user and has_system:
            raise ValueError("user may contain '{system}' only when system_in_user is true")
        return self


def _literal(text: str) -> str:
    """A Jinja string literal for ``text``: JSON escapes, which Jinja's lexer decodes."""
    return json.dumps(text, ensure_ascii=False)


def _format_expression(template: str, **values: str) -> str:
    """A Jinja expression for ``template.format(**values)``; values are Jinja expressions."""
    pieces: list[str] = []
    for literal, field, _, _ in string.Formatter().parse(template):
        if literal:
            pieces.append(_literal(literal))
        if field is not None:
            pieces.append(f"({values[field]})")
    return " ~ ".join(pieces) if pieces else '""'


def _join_content(target: str, message: str) -> str:
    """Statements that set ``target`` to a message's text: a string, or its text parts joined."""
    return (
        f"{{%- if {message}['content'] is none -%}}{{%- set {target} = '' -%}}\n"
        f"{{%- elif {message}['content'] is string -%}}{{%- set {target} = {message}['content'] -%}}\n"
        f"{{%- else -%}}{{%- set {target} = '' -%}}\n"
        f"{{%- for part in {message}['content'] -%}}\n"
        f"{{%- if part['type'] != 'text' -%}}{{{{- raise_exception({_literal(TEXT_ONLY)}) -}}}}{{%- endif -%}}\n"
        f"{{%- set {target} = {target} ~ part['text'] -%}}\n"
        f"{{%- endfor -%}}\n"
        f"{{%- endif -%}}\n"
    )


def chat_template(fmt: PromptFormat) -> str:
    """The Jinja chat template that renders ``fmt`` as RayLLM does.

    ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`` with this
    template gives RayLLM's prompt; without a generation prompt, ``trailing_assistant`` is
    left out. Whether the tokenizer's BOS is added is vLLM's decision, not the template's.
    """
    def clean(expression: str) -> str:
        return f"({expression}) | trim" if fmt.strip_whitespace else expression

    def shown(expression: str) -> str:
        """Whether a system message (not none) gets its tags."""
        if fmt.add_system_tags_even_if_message_is_empty:
            return f"{expression} is not none"
        return f"({expression} is not none and {expression})"

    lines = [
        "{#- Generated by rayllm_app.config.prompt_format.chat_template from a RayLLM prompt_format. -#}\n",
        "{%- set ns = namespace(system=none, systems=0, tool=false, text='', shown_system='') -%}\n",
        "{%- for message in messages -%}\n",
        "{%- if message['role'] in ['system', 'developer'] -%}\n",
        "{%- set ns.systems = ns.systems + 1 -%}\n",
        "{%- if ns.systems == 1 -%}\n",
        _join_content("ns.system", "message"),
        "{%- endif -%}\n",
        "{%- elif message['role'] == 'tool' -%}{%- set ns.tool = true -%}\n",
        "{%- endif -%}\n",
        "{%- endfor -%}\n",
        f"{{%- if ns.systems > 1 -%}}{{{{- raise_exception({_literal(ONE_SYSTEM_MESSAGE)}) -}}}}\n",
        f"{{%- elif ns.tool -%}}{{{{- raise_exception({_literal(NO_TOOL_MESSAGES)}) -}}}}\n",
        "{%- endif -%}\n",
    ]
    if fmt.default_system_message or fmt.add_system_tags_even_if_message_is_empty:
        lines.append(f"{{%- if ns.systems == 0 -%}}{{%- set ns.system = {_literal(fmt.default_system_message)} -%}}"
                     "{%- endif -%}\n")
    if not fmt.system_in_user:
        lines.append(f"{{%- if {shown('ns.system')} -%}}"
                     f"{{{{- {_format_expression(fmt.system, instruction=clean('ns.system'))} -}}}}"
                     "{%- endif -%}\n")
    lines += [
        "{%- for message in messages -%}\n",
        "{%- if message['role'] in ['user', 'assistant'] -%}\n",
        _join_content("ns.text", "message"),
        "{%- if message['role'] == 'user' -%}\n",
    ]
    if fmt.system_in_user:
        lines += [
            f"{{%- if {shown('ns.system')} -%}}"
            f"{{%- set ns.shown_system = {_format_expression(fmt.system, instruction=clean('ns.system'))} -%}}"
            "{%- else -%}{%- set ns.shown_system = '' -%}{%- endif -%}\n",
            f"{{{{- {_format_expression(fmt.user, instruction=clean('ns.text'), system='ns.shown_system')} -}}}}\n",
            "{%- set ns.system = none -%}\n",
        ]
    else:
        lines.append(f"{{{{- {_format_expression(fmt.user, instruction=clean('ns.text'))} -}}}}\n")
    lines += [
        "{%- else -%}\n",
        f"{{{{- {_format_expression(fmt.assistant, instruction=clean('ns.text'))} -}}}}\n",
        "{%- endif -%}\n",
        "{%- endif -%}\n",
        "{%- endfor -%}\n",
        f"{{%- if add_generation_prompt -%}}{{{{- {_literal(fmt.trailing_assistant)} -}}}}{{%- endif -%}}\n",
    ]
    return "".join(lines)
