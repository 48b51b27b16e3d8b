"""How far a parallel result is from its single-process reference, on the scale of the reference.

    from agreement import scaled_difference   # pytest puts tests/ on sys.path
    assert scaled_difference(grad, reference_grad) <= 3e-6

The largest absolute difference divided by the reference's largest magnitude: float rounding of a differently
ordered sum stays a few 1e-7 of a tensor's scale in fp32, whatever the size of its single elements, while a
wrong factor of (1 + e) shows as about e. Identical values give 0; any difference from an all-zero reference
gives inf.
"""
import torch


def scaled_difference(value, reference) -> float:
    value, reference = torch.as_tensor(value, dtype=torch.float64), torch.as_tensor(reference, dtype=torch.float64)
    if value.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(value.shape)} against the reference's {tuple(reference.shape)}")
    difference = (value - reference).abs().max()
    if difference == 0:
        return 0.0
    return (difference / reference.abs().max()).item()
