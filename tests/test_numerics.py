"""tests/numerics.py, the judge of the kernel tests: it must fail where it should."""
import pytest
import torch

from numerics import assert_close, check_close, tolerance


def test_element_wise_bound_names_the_worst_element():
    e = torch.tensor([[1000.0, 1e-3], [0.0, -2.0]])
    check_close(e * (1 + 5e-5), e, 1e-5, 1e-4)  # within rtol everywhere
    a = e.clone()
    a[0, 1] = 1e-3 + 2e-5  # a small entry: no scaling by the tensor's largest value lets it through
    with pytest.raises(AssertionError, match=r"x: 1 of 4 elements .* worst at index \[0, 1\]"):
        check_close(a, e, 1e-5, 1e-4, "x")


def test_non_finite_pattern_must_match():
    e = torch.tensor([1.0, float("nan"), float("inf")])
    check_close(e.clone(), e, 0.0, 0.0)
    with pytest.raises(AssertionError, match=r"NaN pattern differs .* index \[1\]"):
        check_close(torch.tensor([1.0, 0.0, float("inf")]), e, 1.0, 1.0)
    with pytest.raises(AssertionError, match=r"\+inf pattern"):
        check_close(torch.tensor([1.0, float("nan"), 1e30]), e, 1.0, 1.0)


def test_tolerances_by_dtype():
    assert tolerance(torch.bfloat16) == (1e-2, 2e-2) and tolerance(torch.int64) == tolerance(torch.float32)
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(2), torch.zeros(3))
    assert_close(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([1.015]))  # 1.5e-2 <= 1e-2 + 2e-2
