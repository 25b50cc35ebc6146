"""How the tests compare numbers: elementwise against a reference, or norm-wise where a whole
tensor's accumulated rounding is what is bounded.

    assert_close(actual, expected, rtol=1e-5, atol=1e-7)
        every element: |actual - expected| <= atol + rtol * |expected| (numpy.isclose's rule),
        in float64; a failure lists the first mismatches (index, actual, expected, error) and
        their count, as llm.c's check_tensor prints them
    norm_rel_err(actual, expected) -> ||actual - expected|| / ||expected|| (Frobenius)
        for a network's logits or gradients, where single elements may cancel to near zero
        and only the error of the whole tensor has a bound
"""
import numpy as np

SHOWN = 5       # mismatches listed in a failure


def assert_close(actual, expected, rtol, atol, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    actual, expected = np.atleast_1d(actual), np.atleast_1d(expected)
    error = np.abs(actual - expected)
    bad = ~(error <= atol + rtol * np.abs(expected))        # NaN anywhere is a mismatch
    if not bad.any():
        return
    lines = [f"{what + ': ' if what else ''}{int(bad.sum())} of {bad.size} elements differ "
             f"(rtol {rtol:g}, atol {atol:g}); the first {min(SHOWN, int(bad.sum()))}:"]
    for index in list(zip(*np.nonzero(bad)))[:SHOWN]:
        index = tuple(int(i) for i in index)
        lines.append(f"  {index}: {actual[index]!r} vs {expected[index]!r}, error {error[index]:.3g}")
    raise AssertionError("\n".join(lines))


def norm_rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
