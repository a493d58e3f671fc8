"""The one money formatter: integer micro-USD to text for people. Never used for arithmetic."""

from __future__ import annotations


def format_usd(micros: int) -> str:
    """-1234567 → '-$1.234567'; whole cents print as cents: 5000000 → '$5.00'."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    digits = f"{fraction:06d}"
    if digits.endswith("0000"):
        digits = digits[:2]
    return f"{sign}${whole:,}.{digits}"
