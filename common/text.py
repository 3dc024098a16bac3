"""Radiology report preprocessing: tokenise, remove stop words, lemmatise (spaCy, offline).

spaCy's blank English pipeline gives the tokeniser and stop-word list; the lookup lemmatiser's
tables come from the installed ``spacy-lookups-data`` package, so nothing is downloaded.
"""

from __future__ import annotations

import re
from functools import lru_cache

# Negations and comparison words change a finding's meaning ("no nodule", "not enlarged"), so
# they stay even though spaCy lists them as stop words.
KEEP_WORDS = frozenset({"no", "not", "without", "none", "nor", "neither", "never", "cannot", "n't", "less", "more", "above", "below", "left", "right", "both", "few", "several"})
_UNIT = re.compile(r"^(mm|cm|ml|hu|%)$", re.IGNORECASE)


@lru_cache(maxsize=1)
def _pipeline():
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("lemmatizer", config={"mode": "lookup"})
    nlp.initialize()  # loads the lookup tables from spacy-lookups-data
    return nlp


def preprocess_report(text: str) -> list[str]:
    """Lower-cased lemmas without stop words or punctuation.

    Negations are kept (see KEEP_WORDS); a number followed by a unit becomes one token
    ("12 mm" -> "12mm"), a bare number is dropped (list markers, dates).
    """
    if not isinstance(text, str):
        raise TypeError(f"report text must be a string, got {type(text).__name__}")
    doc = _pipeline()(text.lower())  # the lookup tables are lower-case: "Vessels" -> "vessel"
    out: list[str] = []
    tokens = list(doc)
    for n, tok in enumerate(tokens):
        if tok.is_space or tok.is_punct:
            continue
        lower = tok.lower_
        if tok.like_num:
            nxt = tokens[n + 1] if n + 1 < len(tokens) else None
            if nxt is not None and _UNIT.match(nxt.text):
                out.append(f"{lower}{nxt.lower_}")
            continue
        if _UNIT.match(tok.text) and n > 0 and tokens[n - 1].like_num:
            continue  # already joined to its number
        if lower in KEEP_WORDS:  # kept as written: the lookup would turn "left" into "leave"
            out.append("not" if lower == "n't" else lower)
            continue
        if tok.is_stop:
            continue
        out.append((tok.lemma_ or lower).lower())
    return out


def clean_report(text: str) -> str:
    """``preprocess_report`` joined by spaces: the text given to the text encoder."""
    return " ".join(preprocess_report(text))
