"""A transcription of NYU's published GMIC forward pass (nyukat/GMIC, `src/modeling/gmic.py`,
`src/modeling/modules.py`, `src/utilities/tools.py`), kept as the yardstick that
`benchmarks/gmic_forward.py` times our plugin against and that tests/test_gmic.py checks its outputs
against.

It is written anew, but it keeps what decides speed and float rounding in the published code:
the module tree (so the published checkpoints, and ours, load by name), the order of operations,
which ReLUs work in place (those of the residual blocks and of the local stem) and which do not
(the one after the global network's final BN), the in-place residual adds, the ROI search on the
CPU through float masks built from repeated `arange`s, positions handed around as NumPy arrays, each
crop written into a tensor of ones after filling it with the image's minimum, and a NumPy copy of
the crops kept on the model. It is the inference path only (no training code was published) and
runs under `torch.no_grad()` as the published `run_model.py` does.

One deliberate departure: the published `get_max_window` divides the flat argmax by the pooled
width with `//`, which on the torch versions of the time was floor division of integer tensors;
`torch.div(..., rounding_mode="floor")` says the same thing on any version.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def _conv3x3(inputs: int, outputs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlockV2(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(x))
        if self.downsample is not None:
            residual = self.downsample(out)
        out = self.conv1(out)
        out = self.relu(self.bn2(out))
        out = self.conv2(out)
        out += residual
        return out


class BasicBlockV1(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class ResNetV2(nn.Module):
    """The global network: stem conv and max-pool, then stages of pre-activation blocks whose first
    block always has a 1x1 shortcut conv, a final BN and a ReLU that does not work in place."""

    def __init__(self, input_channels=1, num_filters=16, first_layer_kernel_size=(7, 7), first_layer_conv_stride=2,
                 first_layer_padding=3, first_pool_size=3, first_pool_stride=2, first_pool_padding=0,
                 blocks_per_layer_list=(2, 2, 2, 2, 2), block_strides_list=(1, 2, 2, 2, 2), growth_factor=2):
        super().__init__()
        self.first_conv = nn.Conv2d(input_channels, num_filters, kernel_size=first_layer_kernel_size,
                                    stride=first_layer_conv_stride, padding=first_layer_padding, bias=False)
        self.first_pool = nn.MaxPool2d(kernel_size=first_pool_size, stride=first_pool_stride,
                                       padding=first_pool_padding)
        self.layer_list = nn.ModuleList()
        self.inplanes = filters = num_filters
        for blocks, stride in zip(blocks_per_layer_list, block_strides_list):
            self.layer_list.append(self._make_layer(filters, blocks, stride))
            filters *= growth_factor
        self.final_bn = nn.BatchNorm2d(filters // growth_factor)
        self.relu = nn.ReLU()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False))
        layers = [BasicBlockV2(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlockV2(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        h = self.first_pool(self.first_conv(x))
        for layer in self.layer_list:
            h = layer(h)
        return self.relu(self.final_bn(h))


class ResNetV1(nn.Module):
    """The local network: torchvision's ResNet layout without pooling head or fc."""

    def __init__(self, initial_filters=64, layers=(2, 2, 2, 2), input_channels=3):
        super().__init__()
        self.inplanes = initial_filters
        self.num_layers = len(layers)
        self.conv1 = nn.Conv2d(input_channels, initial_filters, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(initial_filters)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, blocks in enumerate(layers):
            setattr(self, f"layer{i + 1}", self._make_layer(initial_filters * 2**i, blocks, 1 if i == 0 else 2))

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlockV1(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlockV1(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


class PostProcessingStandard(nn.Module):
    def __init__(self, channels: int = 256, classes: int = 2):
        super().__init__()
        self.gn_conv_last = nn.Conv2d(channels, classes, (1, 1), bias=False)

    def forward(self, x_out):
        return torch.sigmoid(self.gn_conv_last(x_out))


# ----------------------------------------------------------------------------- tools.py

def get_max_window(image, window_shape):
    """Upper-left (row, col) of the window with the largest mean, per map: (N, C, 2) long."""
    n, c, _, _ = image.size()
    pool_map = F.avg_pool2d(image, window_shape, stride=1)
    width = pool_map.size(3)
    _, flat = torch.max(pool_map.view(n, c, -1), -1)
    row = torch.div(flat, width, rounding_mode="floor")
    col = flat - row * width
    return torch.cat([row.unsqueeze(-1), col.unsqueeze(-1)], dim=-1)


def generate_mask_uplft(image, window_shape, upper_left):
    """A float mask, 0 inside each chosen window and 1 elsewhere, built as published from
    repeated aranges compared as floats."""
    n, c, h, w = image.size()
    rows_from, cols_from = upper_left[:, :, 0], upper_left[:, :, 1]
    rows_to, cols_to = rows_from + window_shape[0], cols_from + window_shape[1]
    mask_rows = torch.arange(0, h).view(-1, 1).repeat(n, c, 1, w).to(image.device)
    mask_cols = torch.arange(0, w).view(1, -1).repeat(n, c, h, 1).to(image.device)
    in_rows = ((mask_rows.float() >= rows_from[..., None, None].float())
               * (mask_rows.float() < rows_to[..., None, None].float()))
    in_cols = ((mask_cols.float() >= cols_from[..., None, None].float())
               * (mask_cols.float() < cols_to[..., None, None].float()))
    return 1 - (in_rows * in_cols).float()


def crop_pytorch(image, crop_shape, crop_position, out):
    """Write the crop whose upper-left corner is `crop_position` into `out`; whatever lies past
    the image keeps the image's minimum (the published background value)."""
    height, width = image.shape
    top, left = int(np.round(crop_position[0])), int(np.round(crop_position[1]))
    bottom, right = int(np.round(crop_position[0] + crop_shape[0])), int(np.round(crop_position[1] + crop_shape[1]))
    top, bottom = min(max(top, 0), height), min(max(bottom, 0), height)
    left, right = min(max(left, 0), width), min(max(right, 0), width)
    out[:, :] = image.min()
    origin_row, origin_col = crop_shape[0] - (bottom - top), crop_shape[1] - (right - left)
    out[origin_row:, origin_col:] = image[top:bottom, left:right]


# ----------------------------------------------------------------------------- GMIC

class NyuGmic(nn.Module):
    """GMIC as published, for the released weights' configuration (ResNet-22 V2 global network).

    `parameters` uses the published names: cam_size, K, crop_shape, percent_t."""

    def __init__(self, parameters: dict):
        super().__init__()
        self.experiment_parameters = parameters
        self.cam_size = tuple(parameters["cam_size"])
        # Registration order is the published state-dict order.
        self.ds_net = ResNetV2()
        self.left_postprocess_net = PostProcessingStandard()
        self.dn_resnet = ResNetV1()
        self.mil_attn_V = nn.Linear(512, 128, bias=False)
        self.mil_attn_U = nn.Linear(512, 128, bias=False)
        self.mil_attn_w = nn.Linear(128, 1, bias=False)
        self.classifier_linear = nn.Linear(512, 2, bias=False)
        self.fusion_dnn = nn.Linear(768, 2)

    # -- TopTPercentAggregationFunction
    def _aggregate(self, cam):
        n, c, h, w = cam.size()
        top_t = int(round(w * h * self.experiment_parameters["percent_t"]))
        return cam.view(n, c, -1).topk(top_t, dim=2)[0].mean(dim=2)

    # -- RetrieveROIModule
    def _retrieve_roi(self, x_original, h_small):
        _, _, height, width = x_original.size()
        h, w = self.cam_size
        n, c, h_h, w_h = h_small.size()
        assert (h_h, w_h) == (h, w), "the saliency map must be cam_size"
        crop_shape = self.experiment_parameters["crop_shape"]
        window = (int(np.round(crop_shape[0] * h / height)), int(np.round(crop_shape[1] * w / width)))
        highest = h_small.view(n, c, -1).max(dim=2, keepdim=True)[0].unsqueeze(-1)
        lowest = h_small.view(n, c, -1).min(dim=2, keepdim=True)[0].unsqueeze(-1)
        current = ((h_small - lowest) / (highest - lowest)).sum(dim=1, keepdim=True)
        positions = []
        for _ in range(self.experiment_parameters["K"]):
            best = get_max_window(current, window)
            positions.append(best)
            current = current * generate_mask_uplft(current, window, best)
        return torch.cat(positions, dim=1).data.cpu().numpy()

    def _convert_crop_position(self, small_positions, x_original):
        h, w = self.cam_size
        _, _, height, width = x_original.size()
        rows, cols = small_positions[:, :, 0] / h, small_positions[:, :, 1] / w
        assert 0.0 <= np.min(rows) and np.max(rows) <= 1.0 and 0.0 <= np.min(cols) and np.max(cols) <= 1.0
        return np.concatenate([np.expand_dims(np.around(rows * height), -1),
                               np.expand_dims(np.around(cols * width), -1)], axis=-1)

    def _retrieve_crop(self, x_original, positions):
        n, k, _ = positions.shape
        crop_h, crop_w = self.experiment_parameters["crop_shape"]
        output = torch.ones((n, k, crop_h, crop_w), device=x_original.device)
        for i in range(n):
            for j in range(k):
                crop_pytorch(x_original[i, 0, :, :], (crop_h, crop_w), positions[i, j, :], output[i, j, :, :])
        return output

    # -- AttentionModule
    def _attend(self, h_crops):
        n, k, dim = h_crops.size()
        flat = h_crops.view(n * k, dim)
        projection = torch.sigmoid(self.mil_attn_U(flat)) * torch.tanh(self.mil_attn_V(flat))
        attn = F.softmax(self.mil_attn_w(projection).view(n, k), dim=1)
        z = torch.sum(attn.unsqueeze(-1) * h_crops, 1)
        return z, attn, torch.sigmoid(self.classifier_linear(z))

    def forward(self, x_original):
        h_g = self.ds_net(x_original)
        self.saliency_map = self.left_postprocess_net(h_g)
        self.y_global = self._aggregate(self.saliency_map)
        small_positions = self._retrieve_roi(x_original, self.saliency_map)
        self.patch_locations = self._convert_crop_position(small_positions, x_original)
        crops = self._retrieve_crop(x_original, self.patch_locations)
        self.patches = crops.data.cpu().numpy()
        n, k, rows, cols = crops.size()
        crops = crops.view(n * k, rows, cols).unsqueeze(1)
        h_crops = self.dn_resnet(crops.expand(-1, 3, -1, -1))
        h_crops = h_crops.mean(dim=2).mean(dim=2).view(n, k, -1)
        z, self.patch_attns, self.y_local = self._attend(h_crops)
        g1, _ = torch.max(h_g, dim=2)
        global_vec, _ = torch.max(g1, dim=2)
        self.y_fusion = torch.sigmoid(self.fusion_dnn(torch.cat([global_vec, z], dim=1)))
        return self.y_fusion


def published_parameters(cam_size=(46, 30), crop_shape=(256, 256), K=6, percent_t=0.02) -> dict:
    """run_model.py's settings for the released models (model 1's t by default)."""
    return {"cam_size": cam_size, "crop_shape": crop_shape, "K": K, "percent_t": percent_t}
