"""perceptcore: compare human and machine perception by subgroup-wise perturbation robustness."""

__version__ = "0.1.0"
