"""shared.layout: the named errors are the old exception types (existing handlers still catch
them), HPOErrors (a command prints one ``error:`` line), and name the entry and the fix."""
import numpy as np
import pytest

from shared.errors import HPOError
from shared.layout import LayoutError, ParamLayout, UnknownBlockError

LAYOUT = ParamLayout(("W0", "b0"), ((3, 2), (2,)))


def test_unknown_block_is_a_key_error_naming_the_block_and_the_choices():
    with pytest.raises(KeyError) as e:
        LAYOUT.index("W9")
    assert isinstance(e.value, UnknownBlockError) and isinstance(e.value, HPOError)
    assert str(e.value) == "layout has no block 'W9'; use one of ['W0', 'b0']"


@pytest.mark.parametrize("call, words", [
    (lambda: ParamLayout(("a", "b"), ((1,),)), ["2 block names but 1 shapes", "one shape per name"]),
    (lambda: ParamLayout(("a", "a"), ((1,), (2,))), ["['a']", "its own name"]),
    (lambda: LAYOUT.flatten([np.zeros((3, 2))]), ["expected 2 block arrays (W0, b0)", "got 1"]),
    (lambda: LAYOUT.flatten([np.zeros((2, 3)), np.zeros(2)]), ["'W0'", "(2, 3)", "expected (3, 2)"]),
    (lambda: LAYOUT.unflatten(np.zeros(7)), ["(7,)", "expected (8,)", "another model"]),
    (lambda: LAYOUT.expand(np.zeros(3)), ["(3,)", "expected (2,)", "W0, b0"]),
    (lambda: LAYOUT.reduce(np.zeros(5)), ["last axis 5", "expected 8"]),
    (lambda: ParamLayout.from_json({"names": ["a"]}), ["lacks 'names' or 'shapes'"]),
])
def test_layout_errors_are_value_errors_naming_the_entry(call, words):
    with pytest.raises(ValueError) as e:
        call()
    assert isinstance(e.value, LayoutError) and isinstance(e.value, HPOError)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_layout_round_trips_through_json():
    assert ParamLayout.from_json(LAYOUT.to_json()) == LAYOUT
