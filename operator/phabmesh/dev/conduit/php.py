"""PHP's reading of Conduit parameters, as Phorge does it: its parameter types' checks
and PHP 8's loose comparisons, with the error each raises (pure)."""

from __future__ import annotations

import re
from typing import Any


class Failure(Exception):
    """A Conduit error: its code and its info, as Phorge answers them."""

    def __init__(self, code: str, info: str) -> None:
        super().__init__(info)
        self.code = code
        self.info = info


BOOL_STRINGS = {"0": False, "1": True, "false": False, "true": True}


def invalid(key: str, message: str) -> Failure:
    """Phorge's parameter types raise a plain exception, which Conduit reports as CORE."""
    return Failure("ERR-CONDUIT-CORE", f'Error while reading "{key}": {message}')


def read_bool(key: str, value: Any, strict: bool) -> bool:
    """``ConduitBoolParameterType``: "true"/"1"/"false"/"0" only from form fields."""
    if not strict and isinstance(value, str) and value.lower() in BOOL_STRINGS:
        return BOOL_STRINGS[value.lower()]
    if isinstance(value, bool):
        return value
    raise invalid(key, "Expected boolean (true or false), got something else.")


def read_int(key: str, value: Any, strict: bool) -> int:
    if not strict and isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise invalid(key, "Expected integer, got something else.")


def read_string(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    raise invalid(key, "Expected string, got something else.")


def read_list(key: str, value: Any, *, allow_empty: bool = True) -> list[Any]:
    """``ConduitListParameterType``: a PHP array with keys 0..n-1."""
    if isinstance(value, dict):
        if list(value) != [str(i) for i in range(len(value))]:
            raise invalid(key, "Expected a list, but value is an object.")
        value = list(value.values())
    if not isinstance(value, list):
        raise invalid(key, "Expected a list, but value is not a list.")
    if not value and not allow_empty:
        raise invalid(key, "Expected a nonempty list, but value is an empty list.")
    return value


def php_lt(value: Any, number: int) -> bool:
    """PHP 8's ``$value < $number``: numeric strings compare as numbers, others as strings."""
    numeric = php_number(value)
    if numeric is not None:
        return numeric < number
    return php_string(value) < str(number)


def php_gt(value: Any, number: int) -> bool:
    numeric = php_number(value)
    if numeric is not None:
        return numeric > number
    return php_string(value) > str(number)


def php_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip()) if value.strip() else None
        except ValueError:
            return None
    return None


def php_string(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list | dict):
        return "Array"
    return "" if value is None else str(value)


def php_intval(value: Any) -> int:
    """``(int)$value``: leading digits of a string, 0 when there are none."""
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        return int(value)
    match = re.match(r"\s*([+-]?\d+)", value) if isinstance(value, str) else None
    return int(match.group(1)) if match else 0
