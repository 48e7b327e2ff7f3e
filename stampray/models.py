"""The course networks, built by name.

``create_model(name, in_channels, image_size, num_classes, **kwargs)`` builds a registered model;
``list_models()`` names them. Every model returns logits (softmax belongs to the loss and the scorer),
accepts any channel count and any input size at or above its ``min_size``, and splits ``forward`` into
``forward_features`` (the embedding; occlusion and saliency hooks live here) and ``forward_head``.

Layers follow the notebooks in ``shared/seeds`` (Keras or PyTorch); PyTorch defaults stand in for Keras
ones where the notebooks do not set them (initialisation, batch-norm momentum).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: register a model class under ``name``; a duplicate name is refused."""

    def deco(cls):
        if name in _REGISTRY:
            msg = f"a model named {name!r} is already registered"
            raise ValueError(msg)
        _REGISTRY[name] = cls
        cls.model_name = name
        return cls

    return deco


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = (int(s) for s in image_size)
    return h, w


def create_model(name: str, in_channels: int = 1, image_size: int | Sequence[int] = 21, num_classes: int = 2,
                 **kwargs) -> "StampModel":
    """Build the model registered as ``name``.

    Raises
    ------
    ValueError
        When ``name`` is unknown (the message lists the known models) or the input is smaller than the
        model's minimum size.
    """
    if name not in _REGISTRY:
        msg = f"unknown model {name!r}; known models: {', '.join(list_models())}"
        raise ValueError(msg)
    if int(in_channels) < 1 or int(num_classes) < 2:
        msg = f"need in_channels >= 1 and num_classes >= 2, got {in_channels!r} and {num_classes!r}"
        raise ValueError(msg)
    h, w = _hw(image_size)
    cls = _REGISTRY[name]
    if min(h, w) < cls.min_size:
        msg = f"model {name!r} needs stamps of at least {cls.min_size}x{cls.min_size} pixels, got {h}x{w}"
        raise ValueError(msg)
    model = cls(int(in_channels), (h, w), int(num_classes), **kwargs)
    model.model_kwargs = dict(kwargs)
    return model


class StampModel(nn.Module):
    """Base class: ``forward = forward_head(forward_features(x))``."""

    model_name = ""
    source = ""
    min_size = 1

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _flat_size(self, features: nn.Module) -> int:
        """Size of the flattened feature map for this input shape (one dry run on a zero stamp)."""
        with torch.no_grad():
            was = features.training
            features.eval()
            out = features(torch.zeros(1, self.in_channels, *self.image_size))
            features.train(was)
        return int(out.flatten(1).shape[1])


@register_model("dense")
class DenseNet(StampModel):
    """The course's fully connected net (Studio 13; astroML "simple").

    Keras ``Dense(30)`` on an (H, W, C) input acts on the last axis, i.e. per pixel; a 1×1 convolution is the
    same map. Dense(30) → Dense(30) per pixel, flatten, Dense(classes): 27,452 parameters at 1×21×21.
    """

    source = "course notebooks: fully connected net"

    min_size = 1

    def __init__(self, in_channels, image_size, num_classes, hidden: int = 30, batch_norm: bool = False):
        super().__init__(in_channels, image_size, num_classes)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden, 1), nn.ReLU()]
        if batch_norm:
            layers.append(nn.BatchNorm2d(hidden))
        layers += [nn.Conv2d(hidden, hidden, 1), nn.ReLU()]
        if batch_norm:
            layers.append(nn.BatchNorm2d(hidden))
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(hidden * image_size[0] * image_size[1], num_classes)

    def forward_features(self, x):
        return self.features(x)


@register_model("dense_bn")
class DenseBNNet(DenseNet):
    """The dense net with batch normalisation after each hidden layer, as the astroML notebook's text
    describes ("add a batch normalization layer"; its ``simpleBN`` code forgot to add it)."""

    source = "astroML notebook: simpleBN, with its batch norm"

    def __init__(self, in_channels, image_size, num_classes, hidden: int = 30):
        super().__init__(in_channels, image_size, num_classes, hidden=hidden, batch_norm=True)


@register_model("cnn")
class StudioCNN(StampModel):
    """The Studio 13 CNN (UW Astro, after Duarte's PHYS 139): three 3×3 convolutions of 16 filters with
    two 2×2 max-pools, Dense(256), output. 9,666 parameters at 1×21×21, 2 classes."""

    source = "Studio 13: our first CNN"

    min_size = 18

    def __init__(self, in_channels, image_size, num_classes, filters: int = 16, hidden: int = 256):
        super().__init__(in_channels, image_size, num_classes)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, filters, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(filters, filters, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(filters, filters, 3), nn.ReLU(),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(self._flat_size(self.features), hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))

    def forward_features(self, x):
        return self.features(x)


# VGG variants as data (torchvision's habit): numbers are 3×3 conv widths, ("M", k) a k×k max-pool,
# ("D", p) dropout, "B" batch norm over the previous convolution's channels.
VGG_CONFIGS: dict[str, list] = {
    "vgg6": [16, 16, ("M", 2), ("D", 0.25), 32, 32, "B", ("M", 4), ("D", 0.25)],
}


def make_vgg_layers(cfg: list, in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for item in cfg:
        if isinstance(item, int):
            layers += [nn.Conv2d(c, item, 3), nn.ReLU()]
            c = item
        elif item == "B":
            layers.append(nn.BatchNorm2d(c))
        elif item[0] == "M":
            layers.append(nn.MaxPool2d(item[1]))
        elif item[0] == "D":
            layers.append(nn.Dropout(item[1]))
    return nn.Sequential(*layers, nn.Flatten())


@register_model("vgg6")
class VGG6(StampModel):
    """VGG6 from the astroML deep-learning notebook (the ZTF real/bogus architecture, Duev et al. 2019):
    conv16-conv16-pool2-drop, conv32-conv32-BN-pool4-drop, Dense(256)-drop(0.5), output.
    25,394 trainable parameters at 1×21×21, 2 classes."""

    source = "astroML notebook: VGG6 (ZTF real/bogus)"

    min_size = 20

    def __init__(self, in_channels, image_size, num_classes, hidden: int = 256, dropout: float = 0.5):
        super().__init__(in_channels, image_size, num_classes)
        self.features = make_vgg_layers(VGG_CONFIGS["vgg6"], in_channels)
        self.head = nn.Sequential(nn.Linear(self._flat_size(self.features), hidden), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward_features(self, x):
        return self.features(x)


class _Bottleneck(nn.Module):
    """ResNet bottleneck as the notebook's Keras blocks build it: 1×1 (stride s) → f×f → 1×1, each
    convolution with a bias and batch norm; a projection shortcut in the convolutional block."""

    def __init__(self, c_in: int, filters: tuple[int, int, int], stride: int = 1, project: bool = False):
        super().__init__()
        f1, f2, f3 = filters
        self.body = nn.Sequential(
            nn.Conv2d(c_in, f1, 1, stride=stride), nn.BatchNorm2d(f1), nn.ReLU(),
            nn.Conv2d(f1, f2, 3, padding=1), nn.BatchNorm2d(f2), nn.ReLU(),
            nn.Conv2d(f2, f3, 1), nn.BatchNorm2d(f3),
        )
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, f3, 1, stride=stride), nn.BatchNorm2d(f3))
                         if project else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


@register_model("resnet50")
class ResNet50(StampModel):
    """ResNet-50 as the astroML notebook adapts it to small stamps: zero padding 3, a 7×7 stride-2 stem,
    3×3 stride-2 max-pool, bottleneck stages of 3-4-6-3 blocks (stage 2 at stride 1), no average pool,
    flatten and a dense output. 23,532,418 parameters at 1×21×21, 2 classes: 23,528,320 in the body and
    4,098 in the head over the 1×1×2048 map (Keras would also list the batch-norm moving statistics)."""

    source = "astroML notebook: ResNet-50 for small stamps"

    min_size = 5
    STAGES = ((3, (64, 64, 256), 1), (4, (128, 128, 512), 2), (6, (256, 256, 1024), 2), (3, (512, 512, 2048), 2))

    def __init__(self, in_channels, image_size, num_classes):
        super().__init__(in_channels, image_size, num_classes)
        layers: list[nn.Module] = [
            nn.ZeroPad2d(3), nn.Conv2d(in_channels, 64, 7, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, stride=2),
        ]
        c = 64
        for blocks, filters, stride in self.STAGES:
            layers.append(_Bottleneck(c, filters, stride, project=True))
            c = filters[2]
            layers += [_Bottleneck(c, filters) for _ in range(blocks - 1)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(self._flat_size(self.features), num_classes)

    def forward_features(self, x):
        return self.features(x)


@register_model("jet_cnn")
class JetCNN(StampModel):
    """The HEP-for-ML course's ``ConvolutionalClassifier`` (hsf-training deep-learning-intro-for-hep):
    conv 5×5 (5) → pool 2, conv 5×5 (10) → pool 2, Dense 30-20-10, output.
    3,505 parameters at 1×20×20, 5 classes."""

    source = "HEP course: ConvolutionalClassifier"

    min_size = 16

    def __init__(self, in_channels, image_size, num_classes):
        super().__init__(in_channels, image_size, num_classes)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 5, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(5, 10, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(self._flat_size(self.features), 30), nn.ReLU(),
            nn.Linear(30, 20), nn.ReLU(),
            nn.Linear(20, 10), nn.ReLU(),
            nn.Linear(10, num_classes),
        )

    def forward_features(self, x):
        return self.features(x)


@register_model("radio_cnn")
class RadioCNN(StampModel):
    """The VLASS radio-morphology CNN (NRAO notebook): 3×3 "same" convolutions of 75, 50 and 25 filters,
    each with batch norm and a 2×2 "same" max-pool (dropout 0.2 after the second), Dense(512),
    dropout 0.3, output. 867,889 trainable parameters at 1×64×64, 4 classes."""

    source = "VLASS notebook: radio morphology CNN"

    min_size = 1

    def __init__(self, in_channels, image_size, num_classes):
        super().__init__(in_channels, image_size, num_classes)

        def pool():
            return nn.MaxPool2d(2, stride=2, ceil_mode=True)  # Keras padding="same" for pool 2, stride 2

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 75, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(75), pool(),
            nn.Conv2d(75, 50, 3, padding=1), nn.ReLU(), nn.Dropout(0.2), nn.BatchNorm2d(50), pool(),
            nn.Conv2d(50, 25, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(25), pool(),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(self._flat_size(self.features), 512), nn.ReLU(), nn.Dropout(0.3),
                                  nn.Linear(512, num_classes))

    def forward_features(self, x):
        return self.features(x)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_stamp(model: nn.Module, shape: Sequence[int]) -> int:
    """Forward FLOPs for one stamp of ``shape`` (C, H, W), by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    model.train(was)
    return int(counter.get_total_flops())


def describe(shape: Sequence[int] = (1, 21, 21), num_classes: int = 2) -> list[dict]:
    """One row per registered model: name, parameters and FLOPs per stamp at ``shape`` (or why not)."""
    c, h, w = (int(s) for s in shape)
    rows = []
    for name in list_models():
        try:
            model = create_model(name, c, (h, w), num_classes)
        except ValueError as e:
            rows.append({"model": name, "params": None, "flops": None, "note": str(e)})
            continue
        rows.append({"model": name, "params": count_parameters(model), "flops": flops_per_stamp(model, (c, h, w)),
                     "note": model.source})
    return rows
