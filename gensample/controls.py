"""Control models p(c | x) for Noise Consistency Training (NCT, Luo et al. 2025, sec. 3.2: "c ~ p(c|x) from a
condition model": Canny, HED, depth, a downsampler for super-resolution) and the measurement h(x) that checks a
generated image against its control (sec. 4: consistency = ||h(x) - c||).

Each control maps images x in [-1, 1] of shape (B, C, H, W) to controls, and says what its adapter takes:

| name | c | kind | error(x, c), per sample |
| --- | --- | --- | --- |
| ``class`` | a label drawn from the digits classifier's softmax, c ~ p(c | x) | class | 1 if argmax h(x) != c |
| ``lowres`` | the image average-pooled by ``factor`` (super-resolution), values in [-1, 1] | image | RMS(h(x) - c) |
| ``edges`` | the Sobel gradient magnitude of the [0, 1] image, divided by its maximum 4 sqrt(2) | image | RMS(h(x) - c) |
| callable | ``fn(x)``, any user function returning labels or images | given | ``measure(x, c)`` if given |

(RMS = sqrt of the mean over the control's elements: the paper does not say how its ||h(x) - c|| is normalised.)
Controls are ``nn.Module`` s, so a method's ``.to(device)`` moves the classifier with it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CONTROL_NAMES", "CallableControl", "ClassControl", "Control", "EdgeControl", "LowResControl",
           "get_control", "sobel_magnitude"]

CONTROL_NAMES = ("class", "lowres", "edges")


class Control(nn.Module):
    """c = control(x) ~ p(c | x) for images x in [-1, 1]; ``error(x, c)`` = per-sample mismatch of h(x) and c."""

    name: str = "control"
    #: "class" (integer labels (B,)) or "image" (float (B, C, h, w))
    kind: str = "image"
    num_classes: int | None = None
    #: the range of an image control's values (used to read control images from files)
    value_range: tuple[float, float] = (-1.0, 1.0)

    def control_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, ...]:
        """The shape of one control for images of shape (C, H, W): () for a label."""
        raise NotImplementedError

    def error(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """What defines the control (recorded with the method's settings)."""
        return {"name": self.name}

    def train(self, mode: bool = True) -> Control:
        return super().train(False)  # a fixed measurement: never in training mode (no dropout)


class ClassControl(Control):
    """A class label from a classifier: c ~ softmax(logits / temperature) (``sample=True``, the paper's c ~ p(c|x)) or
    c = argmax (``sample=False``). Default classifier: the shipped digits CNN."""

    name = "class"
    kind = "class"

    def __init__(self, classifier: nn.Module | None = None, sample: bool = True, temperature: float = 1.0,
                 num_classes: int | None = None):
        super().__init__()
        if classifier is None:
            from .metrics.features import load_digits_classifier

            classifier = load_digits_classifier()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.classifier = classifier.eval().requires_grad_(False)
        self.sample, self.temperature = bool(sample), float(temperature)
        self.num_classes = num_classes or getattr(getattr(classifier, "fc2", None), "out_features", None)
        if self.num_classes is None:
            raise ValueError("pass num_classes for a classifier without an `fc2` layer.")

    def control_shape(self, image_shape):
        return ()

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.float())

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        if not self.sample:
            return logits.argmax(1)
        return torch.multinomial(F.softmax(logits / self.temperature, dim=1), 1).squeeze(1)

    @torch.no_grad()
    def error(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (self.logits(x).argmax(1) != c.to(x.device)).float()

    def config(self):
        return {"name": self.name, "sample": self.sample, "temperature": self.temperature,
                "num_classes": self.num_classes}


class LowResControl(Control):
    """Super-resolution control: h(x) = average pooling by ``factor`` (8x8 -> 4x4 for factor 2)."""

    name = "lowres"

    def __init__(self, factor: int = 2):
        super().__init__()
        if not isinstance(factor, int) or factor < 2:
            raise ValueError(f"factor must be an integer >= 2, got {factor!r}.")
        self.factor = factor

    def control_shape(self, image_shape):
        c, h, w = image_shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"lowres factor {self.factor} does not divide the image size {h}x{w}.")
        return (c, h // self.factor, w // self.factor)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x.float(), self.factor)

    @torch.no_grad()
    def error(self, x, c):
        return (self(x) - c.to(x.device)).flatten(1).square().mean(1).sqrt()

    def config(self):
        return {"name": self.name, "factor": self.factor}


def sobel_magnitude(x01: torch.Tensor) -> torch.Tensor:
    """Per-channel-mean Sobel gradient magnitude of images in [0, 1], replicate padding, divided by its largest
    possible value 4 sqrt(2), so the map lies in [0, 1]."""
    gray = x01.float().mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=gray.device)
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    return g.square().sum(1, keepdim=True).sqrt() / (4 * math.sqrt(2))


class EdgeControl(Control):
    """Edge-map control: h(x) = Sobel gradient magnitude of (x + 1) / 2 in [0, 1] (a soft, differentiable stand-in
    for Canny on 8x8 images, where Canny's thresholds and thinning have a few pixels to work with)."""

    name = "edges"
    value_range = (0.0, 1.0)

    def control_shape(self, image_shape):
        return (1, image_shape[1], image_shape[2])

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sobel_magnitude((x.float() + 1) / 2)

    @torch.no_grad()
    def error(self, x, c):
        return (self(x) - c.to(x.device)).flatten(1).square().mean(1).sqrt()


class CallableControl(Control):
    """Any ``fn(x) -> c`` (a label tensor (B,) for ``kind="class"``, an image tensor (B, C, h, w) otherwise), with an
    optional ``measure(x, c) -> (B,)`` for :meth:`error`."""

    name = "callable"

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], kind: str = "image", num_classes: int | None = None,
                 measure: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 value_range: tuple[float, float] = (-1.0, 1.0)):
        super().__init__()
        if not callable(fn):
            raise ValueError(f"control_model must be callable as control_model(x) -> c, got {type(fn).__name__}.")
        if kind not in ("class", "image"):
            raise ValueError(f"kind must be 'class' or 'image', got {kind!r}.")
        if kind == "class" and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"a class control needs num_classes >= 2, got {num_classes!r}.")
        self.fn, self.kind, self.num_classes, self.measure = fn, kind, num_classes, measure
        self.value_range = tuple(value_range)
        if isinstance(fn, nn.Module):
            self.module = fn  # moved with the method

    def control_shape(self, image_shape):
        if self.kind == "class":
            return ()
        with torch.no_grad():
            return tuple(self.fn(torch.zeros(1, *image_shape)).shape[1:])

    @torch.no_grad()
    def forward(self, x):
        return self.fn(x)

    def error(self, x, c):
        if self.measure is None:
            raise ValueError("this callable control has no `measure`; pass measure=fn(x, c) -> per-sample error.")
        return self.measure(x, c)


def get_control(name: str | Control | Callable, **kwargs: Any) -> Control:
    """"class", "lowres" (``factor=``), "edges", a :class:`Control`, or any callable (wrapped by
    :class:`CallableControl` with ``kwargs``)."""
    if isinstance(name, Control):
        return name
    if isinstance(name, str):
        if name == "class":
            return ClassControl(**kwargs)
        if name == "lowres":
            return LowResControl(**kwargs)
        if name == "edges":
            return EdgeControl(**kwargs)
        raise ValueError(f"unknown control {name!r}; choose one of {CONTROL_NAMES} or pass a callable "
                         "control_model(x) -> c.")
    if callable(name):
        return CallableControl(name, **kwargs)
    raise ValueError(f"control must be one of {CONTROL_NAMES}, a Control or a callable, got {type(name).__name__}.")
