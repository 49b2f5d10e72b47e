from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from latentbatch.ids import MAX_ID_LENGTH, InvalidIdError, slug, unique, validate_id, validate_ids


@pytest.mark.parametrize("good", ["a", "mnist5k-00001", "photos_cat-3", "x=1,y@2+z", "Ünïcode"])
def test_safe_ids_pass(good: str) -> None:
    assert validate_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "../x",
        "a/b",
        "a\\b",
        ".hidden",
        "a..b",
        "a.png",
        "nul\x00",
        "sp ace",
        "-lead",
        "x" * 201,
    ],
)
def test_unsafe_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidIdError):
        validate_id(bad)


def test_repeated_ids_are_refused() -> None:
    with pytest.raises(InvalidIdError, match="more than once"):
        validate_ids(["a", "b", "a"])


@given(st.text(max_size=300))
def test_slug_always_gives_a_safe_id(text: str) -> None:
    validate_id(slug(text))


@given(st.lists(st.sampled_from(["a", "b", "a-2", "c" * MAX_ID_LENGTH]), max_size=12))
def test_unique_gives_distinct_safe_ids_in_order(ids: list[str]) -> None:
    out = unique(ids)
    assert len(out) == len(ids) == len(set(out))
    validate_ids(out)
    assert out[:1] == ids[:1]
    assert all(made.startswith(original[:150]) for original, made in zip(ids, out, strict=True))
