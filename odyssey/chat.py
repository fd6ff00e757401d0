"""Chat messages -> the model's prompt, through one Jinja chat template: the one the Hugging Face export
ships as the tokenizer's `chat_template` (odyssey/hf.py), so that `transformers`' `apply_chat_template`
renders the very text the server prompts with.

    plain model ("odyssey"):   <|bos|>system:\\n...\\n\\nuser:\\n...\\n\\nassistant:\\n      the model goes on
    a task ("odyssey:code"):    <|bos|><|code|>{the last user message}<|sep|>            the task's format

A task is chosen by the template variable `task` (the server takes it from the model id; in
`transformers`: `apply_chat_template(messages, task="code")`). Control tokens come from the template
alone: `chat_ids` renders it with a placeholder for each message's text, so it knows which control
tokens are the template's: "<|eos|>" typed in a message stays seven characters, never the control token.
(`transformers`' tokenizer parses control-token spellings wherever they occur in the rendered string:
there, strip them from untrusted text first.)
"""

from __future__ import annotations

import re
from functools import cache

from odyssey.errors import OdysseyError
from odyssey.tasks import BOS, SPECIAL_TOKENS
from odyssey.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
CHAT_TASKS = ("summarize", "code")  # the tasks whose answer is text to read (moderate/find have endpoints)

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if task is defined and task and task != 'lm' -%}"
    "{%- set asks = messages | selectattr('role', 'equalto', 'user') | list -%}"
    "{{- '<|' ~ task ~ '|>' ~ (asks[-1]['content'] if asks else '') ~ '<|sep|>' -}}"
    "{%- else -%}"
    "{%- for message in messages -%}"
    "{{- message['role'] ~ ':\\n' ~ message['content'] ~ '\\n\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant:\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)
# In the plain format a reply ends at the end-of-text token, or where the model starts the next turn.
TURN_STOPS = ("\n\nuser:\n", "\n\nsystem:\n")

_PLACEHOLDER = re.compile("\x00(\\d+)\x00")
_CONTROL = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


@cache
def _template():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # As transformers renders chat templates: sandboxed, trim_blocks and lstrip_blocks.
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE)


def check(messages: list[dict], task: str = "lm") -> None:
    """What the template cannot render well is refused here, naming the message at fault."""
    if task != "lm" and task not in CHAT_TASKS:
        raise OdysseyError(f"no chat format for task {task!r}; chat tasks: lm, {', '.join(CHAT_TASKS)}")
    if not messages:
        raise OdysseyError("messages: give at least one message")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise OdysseyError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise OdysseyError(f"messages[{i}].content must be text")
    if task != "lm" and not any(m["role"] == "user" for m in messages):
        raise OdysseyError(f"messages: the {task} task answers a user message; none was given")


def render(messages: list[dict], task: str = "lm", add_generation_prompt: bool = True) -> str:
    """The prompt as text: what `transformers`' apply_chat_template(..., tokenize=False) returns."""
    check(messages, task)
    return _template().render(
        messages=messages, task=task, add_generation_prompt=add_generation_prompt, bos_token=BOS
    )


def chat_ids(tokenizer: Tokenizer, messages: list[dict], task: str = "lm") -> list[int]:
    """The prompt as token ids: the rendered text's, as `transformers` encodes it (split at control
    tokens, each stretch of text between them encoded whole), except that only the template's own
    control tokens are control tokens: in message text their spellings stay text."""
    check(messages, task)
    held = [{"role": m["role"], "content": f"\x00{i}\x00"} for i, m in enumerate(messages)]
    shape = _template().render(messages=held, task=task, add_generation_prompt=True, bos_token=BOS)
    ids: list[int] = []
    text = ""  # the stretch since the last control token
    for n, piece in enumerate(_PLACEHOLDER.split(shape)):
        if n % 2:  # a message's text
            text += messages[int(piece)]["content"]
            continue
        at = 0
        for match in _CONTROL.finditer(piece):  # the template's own text: control tokens by id
            ids += [
                *tokenizer.encode(text + piece[at : match.start()]),
                tokenizer.hf.token_to_id(match.group()),
            ]
            text, at = "", match.end()
        text += piece[at:]
    return ids + tokenizer.encode(text) if text else ids
