"""Chat templates: how a conversation becomes one prompt, rendered by one function.

A :class:`ChatTemplate` is stored with the tokenizer (``text2llm-tokenizer.json``, key
``chat_template``; set it when training the tokenizer with ``[tokenizer.chat_template]`` or edit
the file) and :func:`render_chat` turns ``[{"role", "content"}, ...]`` into the prompt text that
``text2llm generate --chat`` and the server's ``/v1/chat/completions`` decode from.
:func:`chat_template_jinja` writes the same template as Jinja, for transformers'
``tokenizer_config.json`` and GGUF's ``tokenizer.chat_template``, so ``apply_chat_template`` in
those tools gives the same text.

Floor 0: only pydantic and json are imported (the ONNX Runtime path uses this without torch).
"""

from __future__ import annotations

import json
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from text2llm.errors import UserError

CHAT_ROLES = ("system", "user", "assistant")


class ChatTemplate(BaseModel):
    """How a conversation becomes one prompt: each turn is its role's string with ``{content}``
    replaced by the message, in order, then ``generation_prompt`` (where the reply starts).
    The default suits a base model (plain role-prefixed lines, no special tokens)::

        System: You are terse.
        User: Hi!
        Assistant: Hello.
        User: Tell me a story.
        Assistant:

    Replies stop at EOS or at any of ``stop`` (the model starting the next turn by itself).
    Stored in the tokenizer dir (``text2llm-tokenizer.json``, key ``chat_template``); rendered by
    :func:`render_chat` and exported as the equivalent Jinja template (:func:`chat_template_jinja`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    system: str = Field("System: {content}\n", description="a system turn; {content} is the message")
    user: str = Field("User: {content}\n", description="a user turn")
    assistant: str = Field("Assistant: {content}\n", description="an assistant turn (earlier replies)")
    generation_prompt: str = Field("Assistant:", description="appended after the turns: the model writes the reply after it")
    stop: list[str] = Field(default_factory=lambda: ["\nUser:", "\nSystem:"],
                            description="texts that end a reply (the model beginning another turn)")

    @model_validator(mode="after")
    def _one_content_slot(self) -> "ChatTemplate":
        for role in CHAT_ROLES:
            if getattr(self, role).count("{content}") != 1:
                raise ValueError(f"chat_template.{role}: must contain '{{content}}' exactly once")
        if any(not s for s in self.stop):
            raise ValueError("chat_template.stop: holds an empty string")
        return self


def render_chat(template: ChatTemplate, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """A conversation (``[{"role": "system" | "user" | "assistant", "content": str}, ...]``) as one
    prompt: each message's role string with ``{content}`` replaced, then (``add_generation_prompt``)
    the template's ``generation_prompt``. The one renderer: the server, ``generate --chat`` and the
    exported Jinja template (:func:`chat_template_jinja`) all give this text."""
    parts = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in CHAT_ROLES:
            raise UserError(f"messages[{i}].role: {role!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(m.get("content"), str):
            raise UserError(f"messages[{i}].content: must be a string")
        parts.append(getattr(template, role).replace("{content}", m["content"]))
    if add_generation_prompt:
        parts.append(template.generation_prompt)
    return "".join(parts)


def chat_template_jinja(template: ChatTemplate) -> str:
    """The Jinja template (transformers' ``chat_template``, GGUF's ``tokenizer.chat_template``)
    that renders what :func:`render_chat` renders. Every literal is a Jinja string expression on
    one line, so the renderer's whitespace options (``trim_blocks``, ``lstrip_blocks``) change nothing."""

    def text(s: str) -> str:  # a JSON string is a valid Jinja string literal (same escapes)
        return "{{ " + json.dumps(s, ensure_ascii=False) + " }}" if s else ""

    branches = []
    for k, role in enumerate(CHAT_ROLES):
        before, after = getattr(template, role).split("{content}")
        branches.append(f"{{% {'if' if k == 0 else 'elif'} message['role'] == '{role}' %}}"
                        f"{text(before)}{{{{ message['content'] }}}}{text(after)}")
    return ("{% for message in messages %}" + "".join(branches)
            + "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}{% endfor %}"
            + "{% if add_generation_prompt %}" + text(template.generation_prompt) + "{% endif %}")
