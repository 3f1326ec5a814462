"""The edit evals' cases and judge (``sdmaker eval --task img2img|inpaint``), without a model: a render of the
target scene passes, the unedited input fails."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdmaker.training import render
from sdmaker.training._edit_eval import edit_cases, score_edit


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_cases_are_deterministic_and_held_out(task: str) -> None:
    cases = edit_cases(task, 16)
    assert cases == edit_cases(task, 16)
    assert len({c.prompt for c in cases}) > 8
    for case in cases:
        if task == "img2img":
            assert case.source.shapes[0].color == "red" and "blue circle" in case.prompt
        else:
            assert "yellow star" in case.prompt and len(case.target.shapes) == 2


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_the_target_passes_and_the_input_fails(task: str) -> None:
    for case in edit_cases(task, 8):
        source, target = render(case.source), render(case.target)
        assert score_edit(task, case, source, target)["pass"] == 1.0
        assert score_edit(task, case, source, source)["pass"] == 0.0


def test_inpaint_fails_when_the_kept_half_changes() -> None:
    case = edit_cases("inpaint", 1)[0]
    source, target = render(case.source), np.asarray(render(case.target)).copy()
    target[:, :32] = 255 - target[:, :32]
    scores = score_edit("inpaint", case, source, Image.fromarray(target))
    assert scores["unchanged"] == 0.0 and scores["pass"] == 0.0
