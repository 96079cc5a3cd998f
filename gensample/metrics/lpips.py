"""LPIPS, the learned perceptual distance of Zhang et al. 2018 ("The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", the ``lpips`` package v0.1), without torchvision and without downloads: the user supplies the
public weight files.

    d(x, y) = sum_l  mean_{h,w}  sum_c  w_{l,c} (xhat_{l,chw} - yhat_{l,chw})^2,
    xhat_l  = f_l(S(x)) / ||f_l(S(x))||_channels,     S(x) = (x - shift) / scale

* inputs in [-1, 1], (N, 3, H, W); one-channel images are repeated to three channels; an optional bilinear resize
  (``align_corners=False``) first (CTM: 224, sony/ctm ``loss_norm='lpips'``);
* ``S``: the ScalingLayer, shift (-.030, -.088, -.188), scale (.458, .448, .450) (= ImageNet mean/std on (x+1)/2);
* ``f_l``: the activations of a frozen ImageNet trunk laid out exactly as torchvision's ``.features`` (so its weight
  keys are ``features.<i>.weight`` / ``.bias``): VGG16 conv layers up to relu5_3, taps relu1_2, relu2_2, relu3_3,
  relu4_3, relu5_3 (features indices 3, 8, 15, 22, 29); or AlexNet, taps relu1..relu5 (indices 1, 4, 7, 9, 11);
* ``w_l``: the learned non-negative 1x1 "lin" layers without bias (keys ``lin<l>.model.1.weight``; the ``lpips``
  package's ``model.0`` is a Dropout used only while fitting them, an Identity here so that the keys match);
* channel norms via :func:`torch.linalg.vector_norm` (+1e-10, as ``lpips.normalize_tensor``), whose backward is 0
  rather than NaN where a feature vector is exactly zero.

Weights (never downloaded; pass the paths):

* backbone: torchvision's ``vgg16-397923af.pth`` (https://download.pytorch.org/models/vgg16-397923af.pth) or
  ``alexnet-owt-7be5be79.pth`` (https://download.pytorch.org/models/alexnet-owt-7be5be79.pth); torchvision keeps them
  in ``~/.cache/torch/hub/checkpoints/``. Their ``classifier.*`` keys are ignored.
* lin layers: ``vgg.pth`` / ``alex.pth`` of the ``lpips`` pip package (``lpips/weights/v0.1/`` in the installed
  package, or https://github.com/richzhang/PerceptualSimilarity/tree/master/lpips/weights/v0.1).
* or one combined ``.safetensors`` written by :func:`save_lpips_weights` (the union of both key sets, plus the
  trunk's name in its metadata), or the ``state_dict()`` of a whole ``lpips.LPIPS`` module saved with ``torch.save``.

``.pth`` files are read with ``torch.load(..., weights_only=True)`` (tensors only, no arbitrary unpickling).

``pooling="avg"`` replaces VGG's max pools by 2x2 average pools, as ``piq.LPIPS(replace_pooling=True)`` does (the
variant sony/ctm trains with); the lin weights were fitted with max pooling, which is the default.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LPIPS", "LPIPS_NETS", "LPIPSWeightsError", "load_lpips", "lpips_weights_help", "read_lpips_state_dict",
           "save_lpips_weights"]

LPIPS_NETS = ("vgg", "alex")
#: ScalingLayer constants of lpips v0.1
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
#: torchvision ``features`` configurations up to the last tapped ReLU: an int is a 3x3 conv (padding 1) + ReLU,
#: "M" a 2x2 max pool (stride 2)
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
#: AlexNet (torchvision ``alexnet``): (out channels, kernel, stride, padding) per conv, "M" = 3x3 max pool stride 2
_ALEX = ((64, 11, 4, 2), "M", (192, 5, 1, 2), "M", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
#: features indices whose outputs are the five LPIPS taps
TAPS = {"vgg": (3, 8, 15, 22, 29), "alex": (1, 4, 7, 9, 11)}
TAP_NAMES = {"vgg": ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"),
             "alex": ("relu1", "relu2", "relu3", "relu4", "relu5")}
CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}
BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
BACKBONE_URLS = {net: f"https://download.pytorch.org/models/{name}" for net, name in BACKBONE_FILES.items()}
LIN_FILES = {"vgg": "vgg.pth", "alex": "alex.pth"}
COMBINED_FORMAT = "gensample-lpips"

WeightsSpec = str | Path | Sequence[str | Path]


class LPIPSWeightsError(ValueError):
    """A weight file that is not (part of) the expected LPIPS format."""


def lpips_weights_help(net: str | None = None) -> str:
    """Where the weight files come from (used in error messages and the CLI)."""
    nets = [net] if net in LPIPS_NETS else list(LPIPS_NETS)
    backbone = " or ".join(f"{BACKBONE_FILES[n]} ({BACKBONE_URLS[n]})" for n in nets)
    lin = " or ".join(LIN_FILES[n] for n in nets)
    return (f"LPIPS needs two public weight files, never downloaded by gensample: the torchvision backbone "
            f"{backbone} (torchvision caches it in ~/.cache/torch/hub/checkpoints/), and the lin layers {lin} of "
            "the `lpips` pip package (lpips/weights/v0.1/ inside the installed package, or "
            "github.com/richzhang/PerceptualSimilarity/tree/master/lpips/weights/v0.1). Pass both paths, or one "
            "combined .safetensors written by gensample.metrics.lpips.save_lpips_weights.")


def build_trunk(net: str, pooling: str = "max") -> nn.Sequential:
    """The torchvision ``features`` layers of ``net`` up to its last LPIPS tap, with torchvision's indices."""
    if net not in LPIPS_NETS:
        raise ValueError(f"LPIPS net must be one of {LPIPS_NETS}, got {net!r}.")
    if pooling not in ("max", "avg"):
        raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}.")
    layers: list[nn.Module] = []
    in_ch = 3
    if net == "vgg":
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2) if pooling == "max" else nn.AvgPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU()]
                in_ch = v
    else:
        if pooling != "max":
            raise ValueError("pooling='avg' (piq's replace_pooling) is defined for the VGG trunk only.")
        for v in _ALEX:
            if v == "M":
                layers.append(nn.MaxPool2d(3, 2))
            else:
                out, k, s, p = v
                layers += [nn.Conv2d(in_ch, out, k, stride=s, padding=p), nn.ReLU()]
                in_ch = out
    return nn.Sequential(*layers)


class _LinLayer(nn.Module):
    """lpips ``NetLinLayer``: ``model.1`` is the bias-free 1x1 conv to one channel (``model.0``: see module doc)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """The LPIPS distance network (frozen, always in eval mode). ``forward(x, y)`` returns one distance per sample.

    Args:
        net: "vgg" (VGG16) or "alex" (AlexNet).
        resize: bilinearly resize inputs to ``resize x resize`` first (None: as they come).
        pooling: "max" (LPIPS) or "avg" (VGG only; ``piq.LPIPS(replace_pooling=True)``).

    Built with PyTorch's default (random) initialisation; load weights with :func:`load_lpips` or
    ``load_state_dict`` of :func:`read_lpips_state_dict`.
    """

    def __init__(self, net: str = "vgg", resize: int | None = None, pooling: str = "max"):
        super().__init__()
        if resize is not None and (not isinstance(resize, int) or resize < 1):
            raise ValueError(f"resize must be a positive int or None, got {resize!r}.")
        self.net, self.resize, self.pooling = net, resize, pooling
        self.features = build_trunk(net, pooling)
        self.taps = TAPS[net]
        self.channels = CHANNELS[net]
        for i, c in enumerate(self.channels):
            self.add_module(f"lin{i}", _LinLayer(c))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()
        self.weights_sha256: str | None = None

    @property
    def lins(self) -> list[nn.Conv2d]:
        return [getattr(self, f"lin{i}").model[1] for i in range(len(self.channels))]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] image batch -> scaled 3-channel network input (resize, gray -> RGB, ScalingLayer)."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS takes (N, 1 or 3, H, W) images in [-1, 1], got shape {tuple(x.shape)}.")
        x = x.to(self.shift.dtype)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if self.resize is not None and tuple(x.shape[-2:]) != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return (x - self.shift) / self.scale

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five tapped activations of the (already prepared) input."""
        out, taps = [], set(self.taps)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in taps:
                out.append(x)
        return out

    @staticmethod
    def normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + eps)

    def forward(self, x: torch.Tensor, y: torch.Tensor, per_layer: bool = False):
        if x.shape != y.shape:
            raise ValueError(f"LPIPS compares images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
        n = x.shape[0]
        feats = self.feature_maps(torch.cat([self.prepare(x), self.prepare(y)]))
        layers = []
        for f, lin in zip(feats, self.lins):
            diff = (self.normalize(f[:n]) - self.normalize(f[n:])).square()
            layers.append(lin(diff).mean((2, 3)).flatten())
        total = torch.stack(layers).sum(0)
        return (total, layers) if per_layer else total

    def train(self, mode: bool = True) -> LPIPS:
        """Always eval: the network is a fixed distance."""
        return super().train(False)


# -- weights ----------------------------------------------------------------------------------------------------------
def _backbone_keys(net: str) -> list[str]:
    with torch.device("meta"):  # layout only
        trunk = build_trunk(net)
    return [f"features.{i}.{w}" for i, m in enumerate(trunk) if isinstance(m, nn.Conv2d) for w in ("weight", "bias")]


def _lin_keys(net: str = "vgg") -> list[str]:
    return [f"lin{i}.model.1.weight" for i in range(len(CHANNELS[net]))]


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weight file {path} does not exist. {lpips_weights_help()}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
        except Exception as e:  # re-raised with the file and the expected format
            raise LPIPSWeightsError(f"{path} could not be read as a safetensors file ({e}). "
                                    f"{lpips_weights_help()}") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no arbitrary unpickling
    except Exception as e:  # re-raised with the file and the expected format
        raise LPIPSWeightsError(f"{path} could not be read as a tensors-only torch state dict ({e}). "
                                f"{lpips_weights_help()}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LPIPSWeightsError(f"{path} does not hold a flat state dict of tensors (got {type(state).__name__}). "
                                f"{lpips_weights_help()}")
    return _from_lpips_module(dict(state)), {}


def _from_lpips_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of a whole ``lpips.LPIPS`` module (``net.slice<j>.<i>.weight``, ``scaling_layer.*``,
    ``lin<l>.model.1.weight``) -> our keys (its slices keep torchvision's layer indices); other dicts unchanged."""
    if not any(k.startswith("net.slice") for k in state):
        return state
    out = {}
    for k, v in state.items():
        m = re.fullmatch(r"net\.slice\d+\.(\d+)\.(weight|bias)", k)
        if m:
            out[f"features.{m.group(1)}.{m.group(2)}"] = v
        elif not k.startswith("scaling_layer."):
            out[k] = v
    return out


def _infer_net(keys: set[str], path: Path) -> str:
    features = {k for k in keys if k.startswith("features.")}
    for net in LPIPS_NETS:
        if features == set(_backbone_keys(net)):
            return net
    if "features.28.weight" in features:
        return "vgg"
    if "features.10.weight" in features:
        return "alex"
    raise LPIPSWeightsError(
        f"{path} holds no VGG16 or AlexNet backbone weights: expected torchvision's keys features.0.weight, "
        f"features.0.bias, ... (VGG16 conv indices up to features.28, AlexNet up to features.10). "
        f"{lpips_weights_help()}")


def _check(state: dict[str, torch.Tensor], expected: list[str], path: Path, what: str, allowed_prefixes=()) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = sorted(k for k in state if k not in expected and not k.startswith(tuple(allowed_prefixes)))
    if missing or unexpected:
        msg = f"{path} is not a valid {what} file:"
        if missing:
            msg += f" missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''};"
        if unexpected:
            msg += f" unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''};"
        raise LPIPSWeightsError(f"{msg} expected {expected[0]}, {expected[1]}, ... {expected[-1]}. "
                                f"{lpips_weights_help()}")


def read_lpips_state_dict(weights: WeightsSpec, net: str | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(net, state dict of :class:`LPIPS`) from the public files or a combined file, checked key by key.

    ``weights``: one path (a combined file of :func:`save_lpips_weights`, or any single file holding both key
    sets), or two paths in either order (backbone + lin). ``net``: "vgg" / "alex", or None to infer it from the
    backbone's keys (an explicit value must match them)."""
    paths = [Path(weights)] if isinstance(weights, (str, Path)) else [Path(p) for p in weights]
    if not 1 <= len(paths) <= 2:
        raise ValueError(f"LPIPS weights: pass one combined file or two files (backbone, lin), got {len(paths)}. "
                         f"{lpips_weights_help(net)}")
    loaded = [(p, *_read(p)) for p in paths]
    lin_files = [(p, s) for p, s, _ in loaded if any(k.startswith("lin") for k in s)]
    backbone_files = [(p, s) for p, s, _ in loaded if any(k.startswith("features.") for k in s)]
    for p, s, _ in loaded:
        if not any(k.startswith(("lin", "features.")) for k in s):
            raise LPIPSWeightsError(
                f"{p} holds neither LPIPS lin weights (lin0.model.1.weight, ...) nor torchvision backbone weights "
                f"(features.0.weight, ...); its keys start with {sorted(s)[:4]}. {lpips_weights_help(net)}")
    if len(lin_files) != 1 or len(backbone_files) != 1:
        names = ", ".join(str(p) for p in paths)
        raise LPIPSWeightsError(
            f"LPIPS weights {names}: need exactly one set of backbone weights (features.*) and one set of lin "
            f"weights (lin*.model.1.weight); found {len(backbone_files)} and {len(lin_files)}. "
            f"{lpips_weights_help(net)}")
    (bpath, bstate), (lpath, lstate) = backbone_files[0], lin_files[0]
    for p, _, meta in loaded:
        if meta.get("format") == COMBINED_FORMAT and net is not None and meta.get("net") not in (None, net):
            raise LPIPSWeightsError(f"{p} holds LPIPS-{meta.get('net')} weights, not {net}.")
    inferred = _infer_net(set(bstate), bpath)
    if net is not None and net != inferred:
        raise LPIPSWeightsError(f"{bpath} holds {inferred} backbone weights but net={net!r} was asked for.")
    net = inferred
    lin1 = lstate.get("lin1.model.1.weight")
    lin_net = next((n for n in LPIPS_NETS if lin1 is not None and lin1.ndim == 4 and lin1.shape[1] == CHANNELS[n][1]),
                   None)
    if lin_net is not None and lin_net != net:
        raise LPIPSWeightsError(f"{lpath} holds lin weights for LPIPS-{lin_net} ({LIN_FILES[lin_net]}) but {bpath} "
                                f"is a {net} backbone; pass the matching pair. {lpips_weights_help()}")
    combined = bpath == lpath
    backbone_keys, lin_keys = _backbone_keys(net), _lin_keys(net)
    if combined:
        _check(bstate, backbone_keys + lin_keys, bpath, f"combined LPIPS-{net} weights ({COMBINED_FORMAT})")
    else:
        _check(bstate, backbone_keys, bpath, f"torchvision {net} backbone ({BACKBONE_FILES[net]})",
               allowed_prefixes=("classifier.",))
        _check(lstate, lin_keys, lpath, f"lpips lin-layer ({LIN_FILES[net]} of the lpips package, v0.1)")
    state = {k: bstate[k] for k in backbone_keys}
    state.update({k: lstate[k] for k in lin_keys})
    with torch.device("meta"):  # shapes only: no initialisation of the real-size network
        reference = LPIPS(net).state_dict()
    for k, v in state.items():
        if tuple(v.shape) != tuple(reference[k].shape):
            src = lpath if k.startswith("lin") else bpath
            raise LPIPSWeightsError(f"{src}: {k} has shape {tuple(v.shape)}, LPIPS-{net} expects "
                                    f"{tuple(reference[k].shape)}. {lpips_weights_help(net)}")
    return net, {k: v.float() for k, v in state.items()}


def load_lpips(weights: WeightsSpec, net: str | None = None, resize: int | None = None, pooling: str = "max",
               device: str | torch.device | None = None) -> LPIPS:
    """:class:`LPIPS` with the weights of ``weights`` (see :func:`read_lpips_state_dict`), frozen, in eval mode.
    ``model.weights_sha256`` identifies the weights independently of the files they came from."""
    from ._extractor_contract import state_dict_sha256

    net, state = read_lpips_state_dict(weights, net)
    model = LPIPS(net, resize=resize, pooling=pooling)
    model.load_state_dict(state, strict=True)
    model.weights_sha256 = state_dict_sha256(model)
    return model.to(device or "cpu")


def save_lpips_weights(source: LPIPS | WeightsSpec, path: str | Path) -> Path:
    """Write one combined ``.safetensors`` (torchvision backbone keys + lpips lin keys, metadata format/net) from an
    :class:`LPIPS` or from the two public files; :func:`load_lpips` reads it back."""
    from safetensors.torch import save_file

    if isinstance(source, LPIPS):
        net, state = source.net, source.state_dict()
    else:
        net, state = read_lpips_state_dict(source)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_lpips_weights writes a .safetensors file, got {path}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path),
              metadata={"format": COMBINED_FORMAT, "net": net})
    return path
