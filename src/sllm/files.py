"""Safe reads of the files sllm is given or keeps: damage is one clear line, never a traceback.

Damaged or hostile files fail in ways the standard readers do not report as bad input (non-UTF-8
bytes, `RecursionError` from deep nesting, `ValueError` from a 5,000-digit integer).
`loads_json` turns the JSON ones into `json.JSONDecodeError`, which every caller handles; the
`read_*` functions raise a `UserError` naming the file and the fix. `typed` checks parsed JSON
against a dataclass's annotations, for every format declared as dataclasses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Any

import yaml

from sllm.errors import UserError


class _DepthSafeDecoder(json.JSONDecoder):
    def raw_decode(self, s: str, idx: int = 0) -> tuple[Any, int]:
        try:
            return super().raw_decode(s, idx)
        except json.JSONDecodeError:
            raise
        except RecursionError:
            raise json.JSONDecodeError("nested too deeply", s, idx) from None
        except ValueError:  # an integer of more digits than Python converts
            raise json.JSONDecodeError("a number too long", s, idx) from None


JSON = _DepthSafeDecoder()
loads_json = JSON.decode  # json.loads whose every failure is a json.JSONDecodeError


def loads_json_line(line: str) -> Any:
    """`loads_json` of one JSONL line, by the decoder's C scanner directly when the line is one
    value and whitespace: short records otherwise spend half their parse time in Python layers."""
    try:
        value, end = JSON.scan_once(line, 0)
    except Exception:  # no value at 0, too deep, a number too long: the full decoder says which
        return loads_json(line)
    if line[end:].strip(" \t\r\n"):
        return loads_json(line)  # extra data: the full decoder raises
    return value


def read_text(path: Path, fix: str) -> str:
    """The file's UTF-8 text; unreadable or not UTF-8 is a UserError ending in `fix`."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}; {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is damaged (not UTF-8 text); {fix}") from None


def read_json(path: Path, fix: str) -> Any:
    try:
        return loads_json(read_text(path, fix))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is damaged (invalid JSON: {exc.msg}); {fix}") from None


def read_yaml(path: Path, fix: str) -> Any:
    """yaml.safe_load of the file (no tags that build objects)."""
    try:
        return yaml.safe_load(read_text(path, fix))
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
    except RecursionError:
        problem = "nested too deeply"
    except ValueError as exc:  # a date, number or tagged value that does not convert
        problem = f"a value that does not convert: {str(exc).split(':')[0]}"
    raise UserError(f"{path} is not valid YAML ({problem}); {fix}")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class FieldError(Exception):
    """A field of the wrong type or a missing one; callers name the file."""


def typed(value: Any, hint: Any, where: str = "") -> Any:
    """`value` (parsed JSON) checked against `hint` and converted to it; `where` names the field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _typed_dataclass(value, hint, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return typed(value, inner, where)
    if origin is list:
        _expect(isinstance(value, list), value, "a list", where)
        return [typed(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is tuple and args[-1] is Ellipsis:
        return tuple(typed(value, list[args[0]], where))
    if origin is tuple:
        _expect(isinstance(value, list) and len(value) == len(args), value, f"a list of {len(args)}", where)
        return tuple(
            typed(item, arg, f"{where}[{i}]") for i, (item, arg) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        _expect(isinstance(value, dict), value, "an object", where)
        return {key: typed(item, args[1], f"{where}.{key}") for key, item in value.items()}
    if hint is float:
        _expect(type(value) in (int, float), value, "a number", where)
        return float(value)
    names = {int: "an integer", str: "a string"}
    _expect(type(value) is hint, value, names[hint], where)
    return value


def _typed_dataclass(value: Any, cls: type, where: str) -> Any:
    """Fields missing from `value` take their defaults; keys the class does not declare are dropped."""
    _expect(isinstance(value, dict), value, "an object", where or "the file")
    hints = typing.get_type_hints(cls)
    prefix = f"{where}." if where else ""
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.name not in value and f.default is f.default_factory is MISSING]
    if missing:
        raise FieldError(f"field {prefix}{missing[0]} is missing")
    return cls(
        **{f.name: typed(value[f.name], hints[f.name], prefix + f.name) for f in fields if f.name in value}
    )


def _expect(ok: bool, value: Any, expected: str, where: str) -> None:
    if not ok:
        raise FieldError(f"field {where} should be {expected}, not {kind_of(value)}")


def kind_of(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}
    if value is None:
        return "null"
    return kinds.get(type(value), "an object")
