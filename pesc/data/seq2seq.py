"""Encoder-decoder examples: a conversation becomes (source ids, target ids), and a batch pads each side apart.

The target is the conversation's last assistant answer; the source is everything before it. With a chat template
(`chat_template` set), the source is that template's render of the turns before the answer with its generation
prompt: the prompt exactly as the decoder path renders it, without the answer. Without one, the source is the turns'
text as it is (a system prompt and the user's text joined by a blank line), which is how T0 / Flan-T5 were trained;
a row with an earlier answer then needs a template to say how that answer reads.

Both sides end with the tokenizer's EOS, as T5's own tokenizer ends every sequence. The source is cut to
`sequence_len` tokens and the target to `target_len`, each keeping its EOS. `labels` are the target ids alone: the
model makes its decoder input by shifting them right (T5ForConditionalGeneration does so from `labels`), so the loss
is on the target and on nothing of the source; padding is -100.
"""

import torch

from pesc.data.formats import RowError
from pesc.data.masking import IGNORE_INDEX, ConversationTokenizer
from pesc.data.sample_fields import sample_tensors
from pesc.errors import PescError


class Seq2SeqTokenizer:
    """Tokenize conversations into (input_ids: the source, labels: the target); one instance per tokenizer."""

    def __init__(self, tokenizer, template: str | None):
        if tokenizer.eos_token_id is None:
            raise PescError("the tokenizer has no EOS token, which ends every source and target of an encoder-decoder "
                            "(T5): give a tokenizer with one")
        self.tokenizer = tokenizer
        self.template = None if template is None else ConversationTokenizer(tokenizer, template)

    def source_text(self, before: list[dict]) -> str:
        """The source text of the turns before an answer (what `pesc generate` feeds the encoder too)."""
        if self.template is not None:
            return self.template.render(before, generation_prompt=True)
        if any(message["role"] == "assistant" for message in before):
            raise RowError("it holds more than one answer: set chat_template, which renders the earlier turns into "
                           "the source (an encoder-decoder trains on the last answer)")
        return "\n\n".join(message["content"] for message in before if message["content"])

    def source_ids(self, text: str, length: int | None = None) -> list[int]:
        """The text's tokens (no special tokens) cut to `length` with EOS (None: uncut)."""
        return self._ended(self.tokenizer(text, add_special_tokens=False)["input_ids"], length)

    def _ended(self, ids: list[int], length: int | None) -> list[int]:
        """`ids` cut to `length` - 1 tokens (None: uncut), then EOS."""
        return (ids if length is None else ids[: length - 1]) + [self.tokenizer.eos_token_id]

    def source_and_target(self, messages: list[dict]) -> tuple[str, str]:
        """(the source text, the target text) of one conversation (whose last turn is an answer: formats.py)."""
        return self.source_text(messages[:-1]), messages[-1]["content"]

    def __call__(self, conversations: list[list[dict]], source_len: int, target_len: int):
        """input_ids (sources) and labels (targets), one per conversation, each cut to its length and ended by EOS."""
        texts = [text for messages in conversations for text in self.source_and_target(messages)]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return ([self._ended(ids, source_len) for ids in encoded[0::2]],
                [self._ended(ids, target_len) for ids in encoded[1::2]])


class Seq2SeqCollator:
    """Right-pads the sources (input_ids with the pad id, attention_mask 1 on real tokens) and, to their own longest
    length, the targets (labels with -100); the model shifts the labels into its decoder input."""

    def __init__(self, pad_token_id: int, sample_fields: tuple[str, ...] = ()):
        self.pad_token_id = pad_token_id
        self.sample_fields = sample_fields

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = _padded([f["input_ids"] for f in features], self.pad_token_id)
        labels = _padded([f["labels"] for f in features], IGNORE_INDEX)
        attention_mask = _padded([[1] * len(f["input_ids"]) for f in features], 0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                **sample_tensors(features, self.sample_fields)}


def _padded(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(row) for row in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out
