"""Assistant-only labels, built turn by turn with the chat template.

For each assistant turn the template renders (a) the conversation before it with the generation prompt
(`...<|im_start|>assistant\n`) and (b) the conversation through it. The tokens that (b) adds to (a) are the
answer and its end-of-turn token; trailing whitespace-only tokens after that (ChatML's "\n") are not trained.
Everything else (system, user turns, role headers, BOS) gets -100. Both renders must tokenize to a prefix
of the whole conversation's tokens; a template or tokenizer that breaks this is an error, never a silent
misalignment.
"""

from pesc.data.formats import RowError

IGNORE_INDEX = -100


class ConversationTokenizer:
    """Tokenize conversations with one template into (input_ids, labels); one instance per tokenizer."""

    def __init__(self, tokenizer, template: str):
        self.tokenizer = tokenizer
        self.template = template
        self._blank: dict[int, bool] = {}

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as exc:  # jinja errors (raise_exception in the template, bad syntax)
            raise RowError(f"the chat template failed on this conversation: {exc}") from exc

    def _is_blank(self, token_id: int) -> bool:
        if token_id not in self._blank:
            self._blank[token_id] = self.tokenizer.decode([token_id]).strip() == ""
        return self._blank[token_id]

    def _spans(self, messages: list[dict]) -> tuple[str, list[tuple[str, str]]]:
        """The full text and, per assistant turn, (text before its answer, text through its answer)."""
        full = self.render(messages, False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            through = full if i == len(messages) - 1 else self.render(messages[: i + 1], False)
            before = self.render(messages[:i], True)
            if not through.startswith(before):  # a template without a generation prompt
                before = self.render(messages[:i], False)
            if not through.startswith(before) or not full.startswith(through):
                raise RowError(
                    f"the chat template does not render message {i + 1} (assistant) as an extension of the "
                    "conversation before it (it rewrites earlier turns), so its tokens cannot be masked"
                )
            spans.append((before, through))
        return full, spans

    def __call__(self, conversations: list[list[dict]], sequence_len: int | None = None):
        """Returns input_ids and labels lists, one per conversation (truncated to sequence_len if given)."""
        rendered = [self._spans(messages) for messages in conversations]
        texts = []
        for full, spans in rendered:
            texts.append(full)
            for before, through in spans:
                texts += [before, through]
        ids = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"])
        all_ids, all_labels = [], []
        for full, spans in rendered:
            full_ids = next(ids)
            labels = [IGNORE_INDEX] * len(full_ids)
            for turn, _ in enumerate(spans):
                before_ids, through_ids = next(ids), next(ids)
                if full_ids[: len(before_ids)] != before_ids or full_ids[: len(through_ids)] != through_ids:
                    raise RowError(
                        f"assistant answer {turn + 1}: the text before or through it does not tokenize to a prefix "
                        "of the whole conversation (a token merges across the turn boundary); "
                        "try another chat_template"
                    )
                start, end = len(before_ids), len(through_ids)
                while end > start and self._is_blank(full_ids[end - 1]):
                    end -= 1
                labels[start:end] = full_ids[start:end]
            if sequence_len is not None:
                full_ids, labels = full_ids[:sequence_len], labels[:sequence_len]
            all_ids.append(full_ids)
            all_labels.append(labels)
        return all_ids, all_labels


def tokenize_conversation(messages: list[dict], tokenizer, template: str, sequence_len: int | None = None):
    """One conversation -> (input_ids, labels) with assistant-only labels; see the module docstring."""
    ids, labels = ConversationTokenizer(tokenizer, template)([messages], sequence_len)
    return ids[0], labels[0]
