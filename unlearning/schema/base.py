"""What every config section shares: strict validation, the number types, the no-repeats check."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

Fraction = Annotated[float, Field(gt=0, lt=1, description="a fraction strictly between 0 and 1")]
PositiveFloat = Annotated[float, Field(gt=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def no_repeats(values: list[Any], problem: str) -> list[Any]:
    """`values` unchanged, or a validation error naming them and the `problem` when one repeats."""
    if len(set(values)) != len(values):
        raise ValueError(f"{values} {problem}")
    return values
