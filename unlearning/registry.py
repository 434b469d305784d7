"""Name → function registries whose parameter schema is the function's keyword-only arguments.

A method, metric or merge is a small function registered under a lowercase name. Its hyper-parameters
are its typed keyword-only arguments with defaults; `Registry.validate` turns a config's parameters
into checked, typed values (or a list of problems naming the valid keys), so that typos fail at load
time rather than deep inside a training job.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pydantic

from unlearning.errors import UserError


@dataclass(frozen=True)
class Entry:
    """A registered function, its keyword-only hyper-parameters and free-form metadata."""

    name: str
    fn: Callable[..., Any]
    params: dict[str, inspect.Parameter]
    meta: dict[str, Any] = field(default_factory=dict)

    def defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.params.items() if p.default is not inspect.Parameter.empty}

    @functools.cached_property
    def schema(self) -> type[pydantic.BaseModel]:
        hints = typing.get_type_hints(self.fn, include_extras=True)  # Annotated bounds (Field(ge=...)) kept
        fields: dict[str, Any] = {}
        for key, p in self.params.items():
            default = ... if p.default is inspect.Parameter.empty else p.default
            fields[key] = (hints.get(key, Any), default)
        config = pydantic.ConfigDict(extra="forbid", strict=False, allow_inf_nan=False)
        return pydantic.create_model(f"{self.name}_params", __config__=config, **fields)


class Registry:
    """Functions of one kind (methods, metrics, merges) registered by name.

    Args:
        kind: what the entries are, used in error messages ("method", "metric").
        check: called with each new entry at registration; raises ValueError when the entry is malformed.
    """

    def __init__(self, kind: str, check: Callable[[Entry], None] | None = None):
        self.kind = kind
        self._check = check
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering `fn` under `name`; keyword-only arguments become its parameters."""
        if name != name.lower() or " " in name:
            raise ValueError(f"{self.kind} names are lowercase snake case, got {name!r}")

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            sig = inspect.signature(fn)
            params = {k: p for k, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
            entry = Entry(name, fn, params, dict(meta))
            if self._check is not None:
                self._check(entry)
            self._entries[name] = entry
            return fn

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}")
        return self._entries[name]

    def validate(self, name: str, params: dict[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
        """Check `params` against `name`'s keyword-only arguments.

        Returns:
            (typed params with defaults filled in, problems); problems are one line each, naming the
            offending key as `where.key` and listing the valid keys.
        """
        if name not in self._entries:
            return {}, [f"{where}.name: unknown {self.kind} {name!r}; valid: {', '.join(self.names())}"]
        entry = self._entries[name]
        try:
            return entry.schema(**params).model_dump(), []
        except pydantic.ValidationError as e:
            valid = ", ".join(entry.params) or "(none)"
            problems = []
            for err in e.errors():
                key = ".".join(str(p) for p in err["loc"])
                if err["type"] == "extra_forbidden":
                    problems.append(f"{where}.{key}: not a parameter of {self.kind} {name!r}; valid: {valid}")
                elif err["type"] == "missing":
                    problems.append(f"{where}.{key}: {self.kind} {name!r} needs it (it has no default); set it")
                else:
                    problems.append(f"{where}.{key}: {err['msg']} (got {err.get('input')!r})")
            return {}, problems
