"""``phabmesh dev-cluster --delays``: how long KWOK's simulated pods take."""

from __future__ import annotations

import pytest

from phabmesh import cli
from phabmesh.dev.devcluster import Delays


def test_named_delays() -> None:
    assert Delays.parse("none") == Delays()
    assert Delays.parse("") == Delays()
    assert Delays.parse("realistic") == Delays.realistic()


def test_a_subset_of_fields_keeps_the_others_immediate() -> None:
    assert Delays.parse("start=200, stop=50") == Delays(start=200, complete=0, stop=50, jitter=0)
    assert Delays.parse("start=1,complete=2,stop=3,jitter=4") == Delays(1, 2, 3, 4)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("slow", "'slow'"),
        ("start", "'start'"),
        ("begin=10", "'begin=10'"),
        ("start=-1", "start"),
        ("stop=1e3", "stop"),
        ("jitter=99999999", "jitter"),
    ],
)
def test_bad_delays_name_what_is_wrong(text: str, names: str) -> None:
    with pytest.raises(ValueError, match="delays") as err:
        Delays.parse(text)
    assert names in str(err.value)


def test_the_command_refuses_bad_delays_before_starting_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["dev-cluster", "--delays", "start=soon"]) == 2
    assert "start must be milliseconds" in capsys.readouterr().err
