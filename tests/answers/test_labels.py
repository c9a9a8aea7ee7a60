import pytest
from hypothesis import given
from hypothesis import strategies as st

from tag_lightning.answers.labels import (
    AFFECTNET_LABELS,
    AFFECTNET_NON_EXPRESSIONS,
    DATASET_CLASSES,
    EMOTION_INDEX,
    EMOTIONS,
    FERPLUS_EMOTION_COLUMNS,
    FERPLUS_VOTE_COLUMNS,
    RAFDB_LABELS,
    normalize_label,
)


def test_unified_space_is_the_seven_basic_expressions_plus_contempt():
    assert EMOTIONS == ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt")
    assert all(EMOTIONS[index] == name for name, index in EMOTION_INDEX.items())


def test_rafdb_codes_follow_the_dataset_readme():
    assert RAFDB_LABELS == {
        1: "surprise", 2: "fear", 3: "disgust", 4: "happiness", 5: "sadness", 6: "anger", 7: "neutral",
    }


def test_affectnet_codes_and_excluded_non_expressions():
    assert [AFFECTNET_LABELS[code] for code in range(8)] == [
        "neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt",
    ]
    assert set(AFFECTNET_NON_EXPRESSIONS) == {8, 9, 10}
    assert not set(AFFECTNET_LABELS) & set(AFFECTNET_NON_EXPRESSIONS)


def test_ferplus_columns_in_file_order():
    assert FERPLUS_VOTE_COLUMNS == (
        "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF",
    )
    assert set(FERPLUS_EMOTION_COLUMNS) == set(EMOTIONS)


def test_dataset_classes_say_which_subset_each_dataset_has():
    assert len(DATASET_CLASSES["rafdb"]) == 7 and "contempt" not in DATASET_CLASSES["rafdb"]
    assert DATASET_CLASSES["ferplus"] == EMOTIONS
    assert DATASET_CLASSES["affectnet"] == EMOTIONS
    for classes in DATASET_CLASSES.values():
        assert list(classes) == sorted(classes, key=EMOTION_INDEX.__getitem__)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("happy", "happiness"),
        ("Sad", "sadness"),
        ("ANGRY", "anger"),
        ("surprised", "surprise"),
        ("disgusted", "disgust"),
        ("fearful", "fear"),
        ("contemptuous", "contempt"),
        ("  Neutral\n", "neutral"),
        ("happiness", "happiness"),
    ],
)
def test_normalize_label_accepts_names_and_synonyms(text, expected):
    assert normalize_label(text) == expected


@pytest.mark.parametrize("text", ["", "joyful", "7", "happy sad", "neutral2"])
def test_normalize_label_rejects_anything_else_with_the_accepted_names(text):
    with pytest.raises(ValueError, match="unknown emotion label.*neutral, happiness"):
        normalize_label(text)


@given(
    st.sampled_from(EMOTIONS),
    st.lists(st.booleans(), min_size=12, max_size=12),
    st.sampled_from(["", " ", "\t", " \n"]),
)
def test_normalize_label_ignores_case_and_surrounding_whitespace(name, upper, pad):
    mixed = "".join(char.upper() if flip else char for char, flip in zip(name, upper))
    assert normalize_label(pad + mixed + pad) == name
