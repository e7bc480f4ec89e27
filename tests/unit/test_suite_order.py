"""The suite's scheduling list names real modules (a renamed module would silently lose its place)."""

from pathlib import Path

from tests.conftest import LONGEST_FIRST

REPO = Path(__file__).resolve().parents[2]


def test_every_module_scheduled_first_exists_once():
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    missing = [m for m in LONGEST_FIRST if not (REPO / m).is_file()]
    assert not missing, missing
