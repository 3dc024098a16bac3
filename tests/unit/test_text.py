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
    assert preprocess_report("Nodules of 4-6 mm and 2 to 3 cm; 15% emphysema below -950 HU.") == [
        "nodule",
        "4-6mm",
        "2-3cm",
        "15%",
        "emphysema",
        "below",
        "-950hu",
    ]


def test_pipeline_is_built_once_and_offline():
    from common.text import _pipeline

    nlp = _pipeline()
    assert nlp is _pipeline()  # module-level cache
    assert nlp.pipe_names == ["lemmatizer"] and nlp.get_pipe("lemmatizer").mode == "lookup"


def test_clean_report_joins():
    assert clean_report("Vessels are unremarkable.") == "vessel unremarkable"
