"""`s3d pretrain --method / --recipe / --list-recipes` resolution."""

from __future__ import annotations

import pytest

from s3d.cli import main
from s3d.commands.pretrain import resolve_recipe
from s3d.pretrain import get_recipe


@pytest.mark.parametrize("method, expected", [(None, "s3d-b"), ("mae", "s3d-b"), ("mg", "mg"), ("vf", "vf"),
                                              ("voco", "voco")])
def test_method_picks_its_default_recipe(method, expected) -> None:
    name = resolve_recipe(None, method)
    assert name == expected
    assert get_recipe(name).method == (method or "mae")


def test_recipe_of_another_method_is_an_error() -> None:
    assert resolve_recipe("t1b-ratio-75", "mae") == "t1b-ratio-75"
    with pytest.raises(ValueError, match="'mae' recipe, not --method vf"):
        resolve_recipe("s3d-b", "vf")


def test_list_recipes_and_missing_arguments(capsys) -> None:
    assert main(["pretrain", "--list-recipes"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"s3d-b", "s3d-l", "mg", "vf", "voco", "t1a-densify"} <= set(names)
    assert main(["pretrain", "--method", "mg"]) == 2
    assert "--data and --out" in capsys.readouterr().err
