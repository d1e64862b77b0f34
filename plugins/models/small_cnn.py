"""A small convolutional observer: enough network to be a real machine observer in tests and
demos, small enough to train on a CPU in seconds.

Each image is reduced to `input_size` x `input_size` pixels by area averaging, standardised
(mean 0, sd 1 per image), and passed through four conv-BN-ReLU-pool stages, a global
max pool and a linear head; a case's P(positive) is the mean of its images' probabilities. Trainable by
`perceptcore train` (binary cross-entropy of the case probabilities).
Checkpoints are plain state dicts (`torch.save(model.state_dict(), path)`), loaded with
`weights_only=True`, so a checkpoint can never run code.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from perceptcore.errors import PerceptcoreError
from perceptcore.plugins import hookimpl


def _at_least_16(instance, attribute, value):
    if value < 16 or value % 16:
        raise ValueError(f"{attribute.name} must be a multiple of 16 (four 2x poolings), got {value}")


@attrs.frozen
class Options:
    input_size: int = attrs.field(default=64, validator=_at_least_16)
    width: int = 8  # channels of the first stage; doubled at each stage


class SmallCnnNetwork(nn.Module):
    def __init__(self, options: Options):
        super().__init__()
        self.input_size = options.input_size
        channels = [1] + [options.width * 2**i for i in range(4)]
        # Batch normalisation: without it the network idles at the base rate for many epochs.
        self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b))
                                    for a, b in zip(channels, channels[1:]))
        self.head = nn.Linear(channels[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B,) of standardised images (B, 1, input_size, input_size)."""
        for stage in self.stages:
            x = F.max_pool2d(F.relu(stage(x)), 2)
        # The strongest response anywhere, not the mean: a lesion is small and may lie anywhere.
        return self.head(x.amax(dim=(2, 3))).squeeze(1)


def prepare(pixels: torch.Tensor, max_value: float, size: int) -> torch.Tensor:
    """One image (H, W) in grey levels -> (1, size, size), standardised per image.

    Standardised rather than divided by the grey-level range: an image's overall brightness is
    a nuisance the network would otherwise spend its first training steps learning to ignore."""
    small = F.adaptive_avg_pool2d(pixels.to(torch.float32)[None, None] / max_value, size)[0]
    return (small - small.mean()) / small.std().clamp_min(1e-5)


class SmallCnn:
    name = "small_cnn"
    Options = Options

    def load(self, checkpoint: Path, options: Options, device: str) -> SmallCnnNetwork:
        network = SmallCnnNetwork(options)
        try:
            state = torch.load(checkpoint, map_location=device, weights_only=True)
            network.load_state_dict(state)
        except Exception as exc:  # wrong file, wrong options, or a pickle that is not a plain state dict
            raise PerceptcoreError(f"{checkpoint}: not a small_cnn checkpoint for these options "
                                   f"({type(exc).__name__}: {str(exc).splitlines()[0]})", "observers.checkpoints") from None
        return network.to(device).eval()

    def predict(self, loaded: SmallCnnNetwork, cases: list) -> np.ndarray:
        return case_probabilities(loaded, cases).double().cpu().numpy()

    # Training (perceptcore train): binary cross-entropy of the case probabilities.
    def network(self, options: Options) -> SmallCnnNetwork:
        return SmallCnnNetwork(options)

    def loss(self, network: SmallCnnNetwork, cases: list, labels: torch.Tensor) -> torch.Tensor:
        probabilities = case_probabilities(network, cases).clamp(1e-7, 1 - 1e-7)
        # In float32 outside autocast (mixed precision): CUDA's autocast refuses binary_cross_entropy.
        with torch.autocast(probabilities.device.type, enabled=False):
            return F.binary_cross_entropy(probabilities, labels.to(probabilities.device))

    def checkpoint(self, network: SmallCnnNetwork) -> dict:
        return network.state_dict()


def case_probabilities(network: SmallCnnNetwork, cases: list) -> torch.Tensor:
    """P(positive) per case: the mean of its images' probabilities."""
    inputs, owner = [], []
    for i, case in enumerate(cases):
        for view in case.images:
            inputs.append(prepare(view.pixels, view.max_value, network.input_size))
            owner.append(i)
    device = next(network.parameters()).device
    # float32 logits: under mixed precision the head computes in half precision, the probabilities not.
    probabilities = torch.sigmoid(network(torch.stack(inputs).to(device)).float())
    owner = torch.tensor(owner, device=device)
    return torch.stack([probabilities[owner == i].mean() for i in range(len(cases))])


@hookimpl
def perceptcore_register_models(register):
    register(SmallCnn())
