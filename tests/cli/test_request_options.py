"""The generate/invoke request options are derived from the schema: a new field is an option at once."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from pydantic import Field
from typer.main import get_command
from typer.testing import CliRunner

from sdmaker.cli import app
from sdmaker.cli._request_options import ALIASES, request_from_options, request_options
from sdmaker.schema import GenerateRequest, request_fields

runner = CliRunner()


def _option_names(command: str) -> set[str]:
    click_command = get_command(app).commands[command]  # type: ignore[attr-defined]
    return {opt for param in click_command.params for opt in param.opts}


@pytest.mark.parametrize("command", ["generate", "invoke"])
def test_every_schema_field_is_an_option_under_its_own_name_and_the_old_ones(command: str) -> None:
    names = _option_names(command)
    for spec in request_fields():
        assert spec.option in names, f"{command} lacks {spec.option}"
    assert {alias for aliases in ALIASES.values() for alias in aliases} <= names
    assert {"--steps", "--guidance-scale", "--deep-cache", "-p", "--prompt", "--negative-prompt", "--seed",
            "--scheduler", "--height", "--width", "--format", "--num-images"} <= names


class _WithStyle(GenerateRequest):
    style_strength: float | None = Field(default=None, ge=0.0, le=1.0, strict=True,
                                         description="How strongly the style applies.")


def _app(seen: list[GenerateRequest]) -> typer.Typer:
    test_app = typer.Typer()

    @test_app.command()
    @request_options(schema=_WithStyle)
    def make(request_values: dict[str, Any], out: str = "x") -> None:
        seen.append(request_from_options(request_values, schema=_WithStyle))

    return test_app


def test_a_field_added_to_the_schema_is_an_option_at_once() -> None:
    seen: list[GenerateRequest] = []
    test_app = _app(seen)
    res = runner.invoke(test_app, ["--help"], env={"COLUMNS": "120"})
    assert res.exit_code == 0 and "--style-strength" in res.output and "How strongly" in res.output
    res = runner.invoke(test_app, ["-p", "a", "-p", "b", "--style-strength", "0.5", "--steps", "3"])
    assert res.exit_code == 0, res.output
    (request,) = seen
    assert request.style_strength == 0.5 and request.prompt == ["a", "b"]  # type: ignore[attr-defined]
    assert request.num_inference_steps == 3
    bad = runner.invoke(test_app, ["-p", "a", "--style-strength", "2"])
    assert bad.exit_code != 0 and "style_strength" in repr(bad.exception)  # the schema's own check


def test_an_alias_and_its_full_name_are_one_option() -> None:
    seen: list[GenerateRequest] = []
    test_app = _app(seen)
    assert runner.invoke(test_app, ["-p", "a", "--num-inference-steps", "4"]).exit_code == 0
    assert runner.invoke(test_app, ["-p", "a", "--deep-cache-interval", "2"]).exit_code == 0
    assert [r.num_inference_steps for r in seen] == [4, None]
    assert seen[1].deep_cache_interval == 2
    both = runner.invoke(test_app, ["-p", "a", "--steps", "4", "--num-inference-steps", "5"])
    assert both.exit_code == 2 and "not both" in both.output


def test_options_left_unset_keep_the_recipe_values() -> None:
    request = request_from_options({"prompt": None, "seed": 9, "height": None},
                                   {"prompt": "from the recipe", "height": 64})
    assert (request.prompt, request.seed, request.height) == ("from the recipe", 9, 64)
    with pytest.raises(typer.BadParameter, match="give --prompt"):
        request_from_options({"prompt": [], "seed": 1})
