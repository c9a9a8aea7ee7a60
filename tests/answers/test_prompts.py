"""The user prompt spells the trace format it asks for, in the grammar's own tokens."""

from __future__ import annotations

import pytest

from tag_lightning.answers.grammar import PAPER, PER_STEP, TRACE_FORMATS
from tag_lightning.answers.prompts import asked_format, format_spec, user_prompt
from tag_lightning.errors import BadValue

LABELS = ("happiness", "anger")


def test_the_per_step_prompt_asks_for_the_au_ids_on_every_step():
    prompt = user_prompt(LABELS)
    assert prompt == user_prompt(LABELS, PER_STEP)
    assert "Choose one of: happiness, anger." in prompt
    assert "\nInspect <region> (AU<id>, ...) → <what you see> → <bbox>[x1,y1,x2,y2]</bbox>\n" in prompt
    assert "\nFinal conclusion: <which AUs indicate which expression>\n<answer> <one label> </answer>" in prompt


def test_the_paper_prompt_asks_for_a_region_per_step_and_the_aus_in_the_conclusion():
    prompt = user_prompt(LABELS, PAPER)
    assert "\nInspect <region> → <what you see> → <bbox>[x1,y1,x2,y2]</bbox>\n" in prompt
    assert "\nFinal conclusion: Combined AU<id> + AU<id> ... indicate <which expression>\n" in prompt
    assert "(AU<id>" not in prompt
    assert prompt.startswith(user_prompt(LABELS).split("Global analysis:")[0])  # one question, two layouts


@pytest.mark.parametrize("trace_format", TRACE_FORMATS)
def test_the_format_a_prompt_asks_for_is_read_back(trace_format):
    assert asked_format(user_prompt(LABELS, trace_format) + "\nThe image is 512x512 pixels.") == trace_format
    assert asked_format("Describe this face.") is None


def test_an_unknown_format_names_the_option_and_the_choices():
    with pytest.raises(BadValue, match="trace_format must be one of per_step, paper, got 'xml'"):
        format_spec("xml")
