import pytest

from tag_lightning.au.taxonomy import ACTION_UNITS, AU_BY_ID, EMOTION_PROTOTYPES, REGIONS, parse_au_key

REQUIRED = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 24, 25, 26)


def test_taxonomy_covers_the_required_aus_with_text_and_region():
    assert set(REQUIRED) <= set(AU_BY_ID)
    for au in ACTION_UNITS:
        assert au.name and au.description and au.region in REGIONS
        assert au.key == f"AU{au.id}"


def test_prototypes_use_known_aus():
    for emotion, aus in EMOTION_PROTOTYPES.items():
        assert set(aus) <= set(AU_BY_ID), emotion
    assert EMOTION_PROTOTYPES["happiness"] == (6, 12)


def test_parse_au_key():
    assert parse_au_key(" au12 ") == 12
    for bad in ("AU3", "12", "AUx", ""):
        with pytest.raises(ValueError):
            parse_au_key(bad)
