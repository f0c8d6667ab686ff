"""Named chat templates, and resolving the `chat_template` setting to a Jinja string."""

from pesc.errors import PescError

# The Camelidae/PESC reference prompt: `### System:\n{system}\n### Human:\n{input}\n### Assistant:\n{output}<eos>`.
# The system block is left out when there is no (or an empty) system prompt, as in the reference code; later
# turns follow the EOS directly. BOS is written by the template (tokenize with add_special_tokens=False).
CAMELIDAE_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] %}{{ '### System:\n' + message['content'] + '\n' }}{% endif %}"
    "{% elif message['role'] == 'user' %}"
    "{{ '### Human:\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Assistant:\n' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)

# ChatML: every turn is `<|im_start|>role\ncontent<|im_end|>\n`; the tokenizer should have <|im_end|> as a
# special token (and as its EOS for generation to stop).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {
    "camelidae": CAMELIDAE_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
}


def resolve_chat_template(tokenizer, chat_template: str | None) -> str:
    """None: the tokenizer's own template; a name from CHAT_TEMPLATES; otherwise a literal Jinja string."""
    if chat_template is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if not own:
            raise PescError(
                "the tokenizer has no chat template: set chat_template to one of "
                f"{', '.join(CHAT_TEMPLATES)} or to a Jinja template string"
            )
        return own
    if not isinstance(chat_template, str) or not chat_template.strip():
        raise PescError(f"chat_template must be a template name or a Jinja string, got {chat_template!r}")
    if chat_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[chat_template]
    if "{{" not in chat_template and "{%" not in chat_template:
        raise PescError(
            f"unknown chat_template {chat_template!r}: use one of {', '.join(CHAT_TEMPLATES)}, "
            "leave it unset for the tokenizer's own, or give a Jinja template string"
        )
    return chat_template
