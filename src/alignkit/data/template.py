"""Chat messages -> text segments (prompt text, response texts), through the tokenizer's chat template."""

from __future__ import annotations

from alignkit.errors import DataError

# Used when a tokenizer has no chat template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list | None = None) -> str:
    """tools: function schemas (TRL's `tools` column), handed to the template as apply_chat_template's `tools`."""
    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )


def render(tokenizer, prompt, responses: list, where: tuple[str, int | None] = ("<memory>", None),
           fields: list[str] | None = None, tools: list | None = None) -> tuple[str, list[str]]:
    """(prompt text, texts each response adds after the prompt).

    All plain strings: used verbatim, EOS appended to each response (so the model learns to stop).
    Any message list: the example is a chat; a string prompt becomes a user turn, a string response an
    assistant turn; each response's text is its rendering after the prompt with the prompt's rendering
    (including the generation prompt) cut off. A DataError names `where` (source, row) and the response's field."""
    fields = fields or [f"responses[{i}]" for i in range(len(responses))]
    if isinstance(prompt, str) and all(isinstance(r, str) for r in responses):
        eos = tokenizer.eos_token or ""
        return prompt, [r + eos for r in responses]
    prompt_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    head = render_chat(tokenizer, prompt_messages, add_generation_prompt=True, tools=tools)
    texts = []
    for response, field in zip(responses, fields):
        turn = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
        full = render_chat(tokenizer, [*prompt_messages, *turn], add_generation_prompt=False, tools=tools)
        if not full.startswith(head):
            raise DataError(*where, field, "the chat template does not render the prompt as a prefix of "
                            "prompt + response", hint="use a chat template whose generation prompt starts the assistant turn")
        texts.append(full[len(head):])
    return head, texts


def render_chat_turns(tokenizer, messages: list[dict], where: tuple[str, int | None] = ("<memory>", None),
                      field: str = "messages", tools: list | None = None) -> list[tuple[str, bool]]:
    """A whole conversation as consecutive text pieces (text, trained): trained pieces are the assistant turns
    (what each adds after the conversation so far, rendered with its generation prompt), every other piece is
    the text between them (system and user turns, generation prompts). Messages after the last assistant turn
    carry no loss and are dropped. The pieces concatenate to the template's rendering of the kept messages."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    pieces: list[tuple[str, bool]] = []
    done = ""  # rendering of the conversation up to the end of the previous assistant turn
    for i, message in enumerate(messages[:last + 1]):
        if message["role"] != "assistant":
            continue
        head = render_chat(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        full = render_chat(tokenizer, messages[:i + 1], add_generation_prompt=False, tools=tools)
        if not head.startswith(done) or not full.startswith(head):
            raise DataError(*where, f"{field}[{i}]", "the chat template does not render the conversation so far "
                            "as a prefix of the conversation with this turn",
                            hint="use a chat template that renders earlier turns the same way in every prefix")
        if len(head) > len(done):
            pieces.append((head[len(done):], False))
        pieces.append((full[len(head):], True))
        done = full
    return pieces
