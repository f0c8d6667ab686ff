"""The scorer of the knowledge probe and the downstream tasks: greedy reply vs the accepted answers, exact match.

A reply matches when its first line, cut at a sentence end, *is* one of the answers once both are normalised:
case folded, accents dropped, punctuation turned into spaces, runs of spaces collapsed. So "Paris." and
"PARIS" match "Paris", "Au. It is a metal." matches "Au", "J.K. Rowling. She ..." matches "J. K. Rowling";
"Paris, France", "The capital is Paris." and "Ag" do not. Only the first sentence can match (a later one never
does): a reply that starts wrong is wrong.
"""

import re
import unicodedata

# A sentence ends at . ! or ? followed by white space or the end of the line ("3.5" and "J.K" do not end one).
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def normalise(text: str) -> str:
    """Case folded, accents dropped (NFKD, combining marks removed), every character that is not a letter or a
    digit made a space, spaces collapsed."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).casefold()
    return " ".join("".join(c if c.isalnum() else " " for c in text).split())


def candidate_spans(reply: str) -> list[str]:
    """The prefixes of the reply's first line that end where a sentence may end, and the whole line."""
    line = reply.strip().split("\n", 1)[0].strip()
    return [line[: m.start()] for m in _SENTENCE_END.finditer(line)] + [line]


def exact_match(reply: str, answers: list[str]) -> bool:
    """True when a sentence-end prefix of the reply's first line equals an accepted answer, normalised."""
    accepted = {normalise(answer) for answer in answers} - {""}
    return any(normalise(span) in accepted for span in candidate_spans(reply))
