"""Instruction data: load files or Hub datasets, convert to chat messages, tokenize, mask, collate.

One concept per module: `formats` (row -> messages), `templates` (named chat templates),
`masking` (assistant-only labels), `packing` (collators), `loading` (the pipeline).
"""

from pesc.data.formats import DATASET_TYPES
from pesc.data.loading import DATASET_KEYS, check_dataset_entry, load_training_data
from pesc.data.masking import tokenize_conversation
from pesc.data.packing import make_collator
from pesc.data.templates import CHAT_TEMPLATES, resolve_chat_template

__all__ = [
    "CHAT_TEMPLATES",
    "DATASET_KEYS",
    "DATASET_TYPES",
    "check_dataset_entry",
    "load_training_data",
    "make_collator",
    "resolve_chat_template",
    "tokenize_conversation",
]
