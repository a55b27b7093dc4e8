"""Tests for allspark.ids."""

from __future__ import annotations

import pytest

from allspark.ids import ID_PATTERN, is_valid_id, new_id


@pytest.mark.parametrize(
    "value",
    ["a", "node-1", "user@example.com", "srv:8080", "a.b_c-d", "x" * 128, "AZaz09_.:@-"],
)
def test_valid_ids(value: str) -> None:
    assert is_valid_id(value)
    assert ID_PATTERN.match(value)


@pytest.mark.parametrize(
    "value",
    ["", "x" * 129, "has space", "slash/", "new\nline", "trailing\n", "ünicode", "a#b", "None?"],
)
def test_invalid_strings(value: str) -> None:
    assert not is_valid_id(value)


@pytest.mark.parametrize("value", [None, 1, 1.5, b"node", ["node"], {"a": 1}, True])
def test_non_strings_are_invalid(value: object) -> None:
    assert not is_valid_id(value)


def test_new_id_is_valid_and_random() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(is_valid_id(i) for i in ids)


def test_new_id_prefix() -> None:
    value = new_id("sess-")
    assert value.startswith("sess-")
    assert is_valid_id(value)
    assert len(value) > len("sess-") + 16


def test_new_id_bad_prefix() -> None:
    with pytest.raises(ValueError):
        new_id("bad prefix")
    with pytest.raises(ValueError):
        new_id("x" * 120)
