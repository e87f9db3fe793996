"""Turn chat messages into one prompt string: RayLLM's prompt formats or the chat template."""

from __future__ import annotations

from typing import Any, Protocol

from rayllm_app.config import PromptFormat
from rayllm_app.errors import InvalidRequestError
from rayllm_app.protocol import ChatMessage


class ChatTemplateTokenizer(Protocol):
    chat_template: Any

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


def _plain_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    # "developer" is OpenAI's new name for "system"; templates know only the latter.
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages
    ]


def render_prompt_format(fmt: PromptFormat, messages: list[ChatMessage]) -> str:
    """RayLLM's algorithm: at most one system message, optionally folded into the first user turn."""
    plain = _plain_messages(messages)
    system_indexes = [i for i, m in enumerate(plain) if m["role"] == "system"]
    if len(system_indexes) > 1:
        raise InvalidRequestError("Only one system message is supported by this model's prompt format.",
                                  param="messages")
    if any(m["role"] == "tool" for m in plain):
        raise InvalidRequestError("Tool messages are not supported by this model.", param="messages")
    system: str | None = None
    if system_indexes:
        system = plain.pop(system_indexes[0])["content"]
    elif fmt.default_system_message or fmt.add_system_tags_even_if_message_is_empty:
        system = fmt.default_system_message

    def clean(text: str) -> str:
        return text.strip() if fmt.strip_whitespace else text

    parts: list[str] = []
    pending_system = system
    if system is not None and not fmt.system_in_user and (system or fmt.add_system_tags_even_if_message_is_empty):
        parts.append(fmt.system.format(instruction=clean(system)))
    for message in plain:
        content = clean(message["content"])
        if message["role"] == "user":
            if fmt.system_in_user:
                show_system = pending_system is not None and (
                    bool(pending_system) or fmt.add_system_tags_even_if_message_is_empty)
                rendered_system = fmt.system.format(instruction=clean(pending_system)) if show_system else ""
                parts.append(fmt.user.format(instruction=content, system=rendered_system))
                pending_system = None
            else:
                parts.append(fmt.user.format(instruction=content))
        elif message["role"] == "assistant":
            parts.append(fmt.assistant.format(instruction=content))
    parts.append(fmt.trailing_assistant)
    return "".join(parts)


def render_chat_template(tokenizer: ChatTemplateTokenizer, messages: list[ChatMessage]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "This model has no chat template; use /v1/completions, or set "
            "engine_config.generation.prompt_format in its model config.",
            param="messages",
        )
    try:
        return tokenizer.apply_chat_template(
            _plain_messages(messages), tokenize=False, add_generation_prompt=True
        )
    except Exception as error:  # jinja raises for conversations the template rejects
        raise InvalidRequestError(f"The model's chat template rejected these messages: {error}",
                                  param="messages") from None


def render_chat(fmt: PromptFormat | None, tokenizer: ChatTemplateTokenizer,
                messages: list[ChatMessage]) -> tuple[str, bool]:
    """Return the prompt and whether the tokenizer should add its special tokens.

    A chat template writes BOS itself; a RayLLM prompt format relies on the tokenizer.
    """
    if fmt is not None:
        return render_prompt_format(fmt, messages), True
    return render_chat_template(tokenizer, messages), False
