"""Exact money: USD amounts as integer picodollars, prices as micro-USD per million tokens.

With those units, tokens times price is already picodollars, so costs are exact integers and
only the edges (API input and output) deal in decimal dollars.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

PICO_PER_USD = 10**12
MICRO_PER_USD = 10**6
MAX_USD = Decimal(1_000_000)


class MoneyError(ValueError):
    pass


def _decimal(value: str | int | float | Decimal, what: str) -> Decimal:
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise MoneyError(f"{what} must be a decimal number of US dollars") from None
    if not amount.is_finite() or amount < 0 or amount > MAX_USD:
        raise MoneyError(f"{what} must be between 0 and {MAX_USD} US dollars")
    return amount


def usd_to_pico(value: str | int | float | Decimal, what: str = "amount") -> int:
    amount = _decimal(value, what) * PICO_PER_USD
    if amount != amount.to_integral_value():
        raise MoneyError(f"{what} has more than 12 decimal places")
    return int(amount)


def price_to_micro(value: str | int | float | Decimal, what: str = "price") -> int:
    """A price in USD per million tokens, kept to the micro-dollar."""
    amount = _decimal(value, what) * MICRO_PER_USD
    if amount != amount.to_integral_value():
        raise MoneyError(f"{what} has more than 6 decimal places")
    return int(amount)


def pico_to_usd(pico: int) -> str:
    """A decimal string, so JSON and CSV carry the exact amount."""
    text = format(Decimal(pico) / PICO_PER_USD, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def micro_to_usd(micro: int) -> str:
    return pico_to_usd(micro * MICRO_PER_USD)


@dataclass(slots=True, frozen=True)
class Rates:
    """A model's price: micro-USD per million input, cached input and output tokens."""

    input_micro: int = 0
    cached_input_micro: int = 0
    output_micro: int = 0

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        fresh = max(prompt_tokens - cached_tokens, 0)
        return (fresh * self.input_micro + cached_tokens * self.cached_input_micro
                + completion_tokens * self.output_micro)

    def ceiling(self, prompt_tokens: int, max_completion_tokens: int) -> int:
        """The most a request can cost: no cache discount, every output token produced."""
        return (prompt_tokens * max(self.input_micro, self.cached_input_micro)
                + max_completion_tokens * self.output_micro)

    def discounted(self, percent: int) -> Rates:
        """These rates `percent` lower, rounded down to the micro-dollar (batch prices)."""
        keep = 100 - percent
        return Rates(self.input_micro * keep // 100, self.cached_input_micro * keep // 100,
                     self.output_micro * keep // 100)

    @property
    def free(self) -> bool:
        return not (self.input_micro or self.cached_input_micro or self.output_micro)
