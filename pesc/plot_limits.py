"""Axis limits around a reference value (a uniform router's entropy, a balanced router's aux loss).

Autoscaling alone either hides the data (an axis from 0 flattens values near the reference) or inflates
noise (an axis fitted to 1.031-1.038 draws a trend); these limits hold the data and the reference, and
never span less than reference ± half_span, so variation smaller than that looks small.
"""


def reference_limits(values: list[float], reference: float, half_span: float) -> tuple[float, float]:
    """(low, high) holding every value and reference ± half_span, with 5% of the span as margin."""
    low = min(min(values), reference - half_span)
    high = max(max(values), reference + half_span)
    margin = 0.05 * (high - low)
    return low - margin, high + margin
