"""Chat templates for the output tokenizer (docs/vocabulary.md): built-in formats, `auto`, literal Jinja.

The built-in templates are written for this project; each renders the conversation format
its name stands for. Roles other than the ones a format knows are refused with
``raise_exception`` (transformers provides it to chat templates).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import jinja2

from mksuite.common.errors import RecipeError

# Special tokens may be unset on a tokenizer; `x or ''` keeps "None" out of the prompt.
_BOS = "{{- bos_token or '' -}}"

ALPACA = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\\n\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}"
    "{%- elif message['role'] == 'input' -%}{{- '### Input:\\n' + message['content'] + '\\n\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '### Response:\\n' + message['content'] + (eos_token or '') + '\\n\\n' -}}"
    "{%- else -%}{{- raise_exception('alpaca chat: unknown role ' + message['role']"
    " + ' (use system, user, input or assistant)') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
)

CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LLAMA3 = (
    _BOS + "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + (message['content'] | trim) + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# [INST] user [/INST] answer</s>[INST] ... with a leading system message folded into the first
# instruction; anything but strict user/assistant alternation is refused.
MISTRAL = (
    "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' -%}"
    "{%- set turns = messages[1:] if messages and messages[0]['role'] == 'system' else messages -%}"
    + _BOS
    + "{%- for message in turns -%}"
    "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
    "{{- raise_exception('mistral chat: after an optional system message, roles must alternate"
    " user, assistant, user, ...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '[INST] ' + (system + '\\n\\n' if loop.first and system else '') + message['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- ' ' + message['content'] + (eos_token or '') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# [|role|]content[|endofturn|]\n per turn, preceded by an empty system turn when none is given.
EXAONE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}{{- '[|system|][|endofturn|]\\n' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '[|' + message['role'] + '|]' + message['content'] + '[|endofturn|]\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}"
)

BUILTIN_TEMPLATES = {"alpaca": ALPACA, "chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "exaone": EXAONE}


def template_of(tokenizer) -> str | None:
    """A tokenizer's chat template, whitespace-stripped; the ``default`` entry of a named set."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str) or not template.strip():
        return None
    return template.strip()


def most_common_template(tokenizers: Iterable[object]) -> str | None:
    """`auto`: the template most of the tokenizers carry (the first seen on a tie), or None."""
    counts = Counter(t for t in map(template_of, tokenizers) if t is not None)
    if not counts:
        return None
    return max(counts, key=counts.__getitem__)  # Counter keeps first-seen order; max keeps the first maximum


def check_jinja(template: str, *, line: int | None) -> str:
    """``template`` if it parses as Jinja; RecipeError at ``chat_template`` otherwise."""
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as error:
        raise RecipeError(
            f"the chat template is not valid Jinja: {error.message} (template line {error.lineno})",
            field="chat_template",
            line=line,
            hint="built-in names: auto, " + ", ".join(BUILTIN_TEMPLATES),
        ) from None
    return template
