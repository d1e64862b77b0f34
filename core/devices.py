"""Where models compute: the spec's `device` keys (`runner.device`, `training[i].device`) and
`mixed_precision`.

A device is `cpu` (the default), `cuda` (torch's current CUDA device), `cuda:N`, `mps` (Apple
GPUs) or `auto` (cuda if available, else mps if available, else cpu). It is resolved when the
spec is checked against the plugins (spec.check_plugins, which `validate` and every run call
before any work), so a spec asking for a device this machine lacks fails at once, at its key.

Mixed precision autocasts the model's forward pass (and in training the loss, with a gradient
scaler for float16): bfloat16 on the CPU, float16 on CUDA and MPS. A model plugin that must
compute in full precision sets `mixed_precision = False`; asking for it then is an error.

Results on another device or in another precision differ in the last bits (other kernels, other
summation orders), so both enter the cache keys — but only then: the CPU in float32 adds nothing,
so its keys, and every cache made before devices existed, stay valid.
"""

from __future__ import annotations

import contextlib
import re

import attrs

from .errors import PerceptcoreError

_DEVICE = re.compile(r"cpu|cuda|cuda:(?P<index>\d{1,4})|mps|auto")


def resolve(text: str, where: str) -> str:
    """The torch device a spec's device string names on this machine ("cpu", "cuda", "cuda:1", "mps").

    Raises PerceptcoreError at `where` for a malformed string or a device this machine lacks."""
    match = _DEVICE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise PerceptcoreError(f"unknown device {text!r}; expected cpu, cuda, cuda:N, mps or auto", where)
    if text == "cpu":
        return "cpu"
    import torch

    cuda = torch.cuda.is_available()
    mps = _mps_available(torch)
    if text == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if text.startswith("cuda") and not cuda:
        raise PerceptcoreError(f"device {text!r}: CUDA is not available here (torch {torch.__version__}, "
                               f"built {'without' if torch.version.cuda is None else 'with'} CUDA)", where)
    if match["index"] is not None:
        count = torch.cuda.device_count()
        if int(match["index"]) >= count:
            raise PerceptcoreError(f"device {text!r}: this machine has {count} CUDA device"
                                   f"{'' if count == 1 else 's'} (cuda:0 … cuda:{count - 1})", where)
    if text == "mps" and not mps:
        raise PerceptcoreError("device 'mps': Apple's Metal (MPS) backend is not available here", where)
    return text


def _mps_available(torch) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def allows_mixed_precision(model) -> bool:
    """A model computes in mixed precision unless its plugin sets `mixed_precision = False`."""
    return getattr(model, "mixed_precision", True) is not False


def check_mixed_precision(model, key: str, user: str) -> None:
    """Raise at `key` (runner.mixed_precision, training[i].mixed_precision) when the model refuses it."""
    if not allows_mixed_precision(model):
        raise PerceptcoreError(f"model {model.name!r} ({user}) computes in full precision only (its plugin sets "
                               "mixed_precision = False); set this to false", key)


@attrs.frozen
class Placement:
    """A resolved device and whether to autocast: what a work unit or a training job computes with.

    Picklable (plain strings), so work units carry it to worker processes."""

    device: str = "cpu"
    mixed_precision: bool = False

    @classmethod
    def of(cls, section, where: str) -> "Placement":
        """The placement of a `runner` or `training[i]` section (where: "runner", "training[0]")."""
        return cls(resolve(section.device, f"{where}.device"), bool(section.mixed_precision))

    @property
    def type(self) -> str:
        """The device type ("cuda" for cuda:1): what the results depend on, so what cache keys hold."""
        return self.device.split(":")[0]

    @property
    def precision(self) -> str:
        """The autocast dtype's name, or "float32" without mixed precision."""
        if not self.mixed_precision:
            return "float32"
        return "bfloat16" if self.type == "cpu" else "float16"

    def key(self) -> dict | None:
        """What cache keys add for this placement: nothing on the CPU in float32 (the keys of every
        cache written before devices existed), else the device type and the precision."""
        if self.type == "cpu" and not self.mixed_precision:
            return None
        return {"device": self.type, "precision": self.precision}

    def autocast(self):
        """The context the forward pass (and the training loss) runs in."""
        if not self.mixed_precision:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(self.type, dtype=getattr(torch, self.precision))

    def grad_scaler(self):
        """A gradient scaler for float16 training (its small range would flush gradients to zero), else None."""
        if self.precision != "float16":
            return None
        import torch

        return torch.amp.GradScaler(self.type)


def check_spec(spec, model_of) -> None:
    """Resolve `runner.device` and every `training[i].device`, and check that mixed precision is asked
    only of models that allow it. `model_of(name, where)` returns the registered model plugin."""
    resolve(spec.runner.device, "runner.device")
    trainings = {t.name: (i, t) for i, t in enumerate(spec.training)}
    if spec.runner.mixed_precision:
        for i, observer in enumerate(spec.observers):
            if observer.model is not None:
                model = model_of(observer.model, f"observers[{i}].model")
            elif observer.trained in trainings:
                j, training = trainings[observer.trained]
                model = model_of(training.model, f"training[{j}].model")
            else:
                continue  # predictions from a file: nothing computes them
            check_mixed_precision(model, "runner.mixed_precision", f"observer {observer.name!r}")
    for i, training in enumerate(spec.training):
        resolve(training.device, f"training[{i}].device")
        if training.mixed_precision:
            check_mixed_precision(model_of(training.model, f"training[{i}].model"),
                                  f"training[{i}].mixed_precision", f"training {training.name!r}")
