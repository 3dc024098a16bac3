"""Report text preprocessing: tokens, stop words, lemmas, negations kept, offline."""

from common.text import clean_report, preprocess_report


def test_stop_words_removed_and_lemmatised():
    tokens = preprocess_report("The lungs were clear, with no nodules seen. Bronchi were dilated.")
    assert tokens == ["lung", "clear", "no", "nodule", "see", "bronchus", "dilate"]
    assert not {"the", "were", "with"} & set(tokens)


def test_negations_and_sides_are_kept():
    tokens = preprocess_report("The heart isn't enlarged. There is not any effusion on the left.")
    assert "not" in tokens and "left" in tokens and tokens.count("not") == 2
    assert "enlarge" in tokens and "effusion" in tokens


def test_measurements_join_their_unit():
    assert preprocess_report("A 12 mm nodule, 3. series 4") == ["12mm", "nodule", "series"]


def test_clean_report_joins():
    assert clean_report("Vessels are unremarkable.") == "vessel unremarkable"
