"""perceptcore: compare human and machine perception by subgroup-wise perturbation robustness.

    import perceptcore
    results = perceptcore.load("spec.yaml").run(out="runs/first")

`load` is core/pipeline.py's (docs/api.md); it is imported on first use, so that `import
perceptcore` stays light (no NumPy, pandas or torch until a study is loaded)."""

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    if name == "load":
        from .pipeline import load

        return load
    raise AttributeError(f"module 'perceptcore' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"load"})
