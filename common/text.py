"""Radiology report preprocessing: tokenise, remove stop words, lemmatise (spaCy, offline).

spaCy's blank English pipeline gives the tokeniser and stop-word list; the lookup lemmatiser's
tables come from the installed ``spacy-lookups-data`` package, so nothing is downloaded.
"""

from __future__ import annotations

import re
from functools import lru_cache

# spaCy lists these as stop words, but in a report they carry the finding: dropping "no" turns
# "no nodule" into "nodule", the opposite statement; sides and comparisons locate and grade it.
KEEP_WORDS = frozenset(
    {
        "no",
        "not",
        "without",
        "none",
        "nor",
        "neither",
        "never",
        "cannot",
        "n't",
        "less",
        "more",
        "above",
        "below",
        "left",
        "right",
        "both",
        "few",
        "several",
    }
)
_UNIT = re.compile(r"^(mm|cm|ml|cc|hu|%|mm2|mm3|cm2|cm3)$", re.IGNORECASE)
_RANGE = frozenset({"-", "–", "to"})


@lru_cache(maxsize=1)
def _pipeline():
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("lemmatizer", config={"mode": "lookup"})
    nlp.initialize()  # loads the lookup tables from spacy-lookups-data
    return nlp


def preprocess_report(text: str) -> list[str]:
    """Lower-cased lemmas without stop words or punctuation.

    Negations are kept (see KEEP_WORDS); a number or range followed by a unit becomes one token
    ("12 mm" -> "12mm", "4-6 mm" -> "4-6mm", "15%" -> "15%"), a bare number is dropped (list
    markers, series numbers, dates).
    """
    if not isinstance(text, str):
        raise TypeError(f"report text must be a string, got {type(text).__name__}")
    doc = _pipeline()(text.lower())  # the lookup tables are lower-case: "Vessels" -> "vessel"
    out: list[str] = []
    tokens = list(doc)
    n = 0
    while n < len(tokens):
        tok = tokens[n]
        n += 1
        if tok.is_space or tok.is_punct:
            continue
        lower = tok.lower_
        if tok.like_num:
            # A measurement keeps its number: "12 mm" -> "12mm", "4-6 mm" / "4 to 6 mm" -> "4-6mm".
            # A bare number (list marker, series or image number, date part) carries no finding: dropped.
            value, m = lower, n
            if m + 1 < len(tokens) and tokens[m].lower_ in _RANGE and tokens[m + 1].like_num:
                value, m = f"{lower}-{tokens[m + 1].lower_}", m + 2
            if m < len(tokens) and _UNIT.match(tokens[m].text):
                out.append(f"{value}{tokens[m].lower_}")
                n = m + 1
            continue
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
