"""The credential endpoint's ?format= parameter: spellings it takes and how it refuses."""

from __future__ import annotations

import pytest

from phabmesh.endpoint import app


@pytest.mark.parametrize(
    ("value", "wanted"),
    [
        (None, None),
        ("phorge-token", app.PHORGE_TOKEN),
        ("Phorge-Token", app.PHORGE_TOKEN),
        ("PhorgeToken", app.PHORGE_TOKEN),
        ("phorge_token", app.PHORGE_TOKEN),
        ("jwt", app.JWT),
        ("JWT", app.JWT),
        (" jwt ", app.JWT),
    ],
)
def test_known_formats_in_any_case(value: str | None, wanted: str | None) -> None:
    assert app.requested_format(value) == wanted


@pytest.mark.parametrize("value", ["", "pem", "jwt2", "phorge", "x" * 10_000])
def test_unknown_formats_name_the_parameter_and_the_choices(value: str) -> None:
    with pytest.raises(ValueError, match="query parameter 'format'") as refused:
        app.requested_format(value)
    assert "phorge-token or jwt" in str(refused.value)
    assert len(str(refused.value)) < 200  # a long value is not echoed whole
