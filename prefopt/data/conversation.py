"""The one text format every public loader produces: HH-style transcripts
(written only by `render_conversation`)

    {system}\\n\\nHuman: {user}\\n\\nAssistant: {assistant}\\n\\nHuman: ...

A prompt always ends with "\\n\\nAssistant:" and each response starts with a
space, so prompt + response is exactly the rendered conversation, as in HH
itself (the reference DPO repo trains on HH text as it is). Chat-message rows
(UltraFeedback, conversational JSONL) become a prompt and two responses here."""
from __future__ import annotations

from typing import Mapping, Sequence

from prefopt.data.types import PreferenceExample, check_unicode, json_type, show
from utils import ConfigError

HUMAN = "\n\nHuman:"


ASSISTANT = "\n\nAssistant:"


ROLES = ("system", "user", "assistant")


def render_conversation(messages: Sequence[Mapping[str, str]]) -> str:
    """Render chat messages as HH-style text: each user turn as
    "\\n\\nHuman: {content}", each assistant turn as "\\n\\nAssistant: {content}",
    a system message as a plain paragraph (the first one with no blank line
    before it). Contents are kept as they are."""
    parts = []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            parts.append(content if i == 0 else "\n\n" + content)
        elif role == "user":
            parts.append(f"{HUMAN} {content}")
        elif role == "assistant":
            parts.append(f"{ASSISTANT} {content}")
        else:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    return "".join(parts)


def prompt_text(prompt_messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt for the assistant's next turn: ends with "\\n\\nAssistant:"."""
    return render_conversation(prompt_messages) + ASSISTANT


def response_text(content: str) -> str:
    return " " + content


def row_messages(value, name: str, where: str, hint: str) -> list[dict[str, str]]:
    """A validated message list, reduced to {"role", "content"} dicts."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f'{where}: field "{name}" must be a list of {{"role", "content"}} messages, '
                          f"got {json_type(value)}; {hint}")
    if not value:
        raise ConfigError(f'{where}: field "{name}" is an empty message list; {hint}')
    out = []
    for i, message in enumerate(value, start=1):
        at = f'{where}: field "{name}", message {i}'
        if not isinstance(message, Mapping):
            raise ConfigError(f'{at} must be an object {{"role", "content"}}, got {json_type(message)}')
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ConfigError(f'{at} has role {show(role)}; use "system", "user" or "assistant"')
        if not isinstance(content, str):
            raise ConfigError(f'{at}: "content" must be a string, got {json_type(content)}')
        out.append({"role": role, "content": check_unicode(content, f'{at}: "content"')})
    return out


def last_turn(messages: list[dict[str, str]], name: str, where: str,
               require_response: bool) -> tuple[list[dict[str, str]], str]:
    """(the messages before the final assistant turn, that turn's content)."""
    last = messages[-1]
    if last["role"] != "assistant":
        raise ConfigError(f'{where}: field "{name}" ends with a {last["role"]} message; '
                          "its last message must be the assistant's response")
    if require_response and not last["content"].strip():
        raise ConfigError(f'{where}: field "{name}": the final assistant message is empty')
    return messages[:-1], last["content"]


def first_difference(a: Sequence, b: Sequence) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def conversation_pair(chosen: list[dict[str, str]], rejected: list[dict[str, str]], where: str,
                       require_response: bool) -> PreferenceExample:
    """Two full conversations that share everything but the final assistant
    turn: the shared part is the prompt, the final turns the responses."""
    chosen_prompt, chosen_reply = last_turn(chosen, "chosen", where, require_response)
    rejected_prompt, rejected_reply = last_turn(rejected, "rejected", where, require_response)
    if chosen_prompt != rejected_prompt:
        k = first_difference(chosen_prompt, rejected_prompt) + 1
        raise ConfigError(f'{where}: "chosen" and "rejected" differ at message {k}, before their last turn; '
                          'both must continue the same conversation (or give the shared part as "prompt")')
    if not chosen_prompt:
        raise ConfigError(f'{where}: "chosen" and "rejected" hold only the assistant reply and there is no "prompt"; '
                          'add "prompt" or the user turn before each reply')
    return PreferenceExample(prompt_text(chosen_prompt), response_text(chosen_reply), response_text(rejected_reply))
