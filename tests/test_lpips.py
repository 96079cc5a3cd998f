"""LPIPS (gensample.metrics.lpips) without torchvision or downloads: the VGG16 / AlexNet trunks laid out as
torchvision's ``features``, loading the public files by their key names (random weights saved under those names),
the distance against a direct computation from the formula, clear errors for wrong files, and CTM with
distance="lpips"."""
from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gensample.metrics.lpips import (
    LPIPS,
    LPIPSWeightsError,
    load_lpips,
    read_lpips_state_dict,
    save_lpips_weights,
)

#: torchvision layouts: (features index, in, out, kernel, stride, padding) of every conv
VGG16_CONVS = [(0, 3, 64, 3, 1, 1), (2, 64, 64, 3, 1, 1), (5, 64, 128, 3, 1, 1), (7, 128, 128, 3, 1, 1),
               (10, 128, 256, 3, 1, 1), (12, 256, 256, 3, 1, 1), (14, 256, 256, 3, 1, 1),
               (17, 256, 512, 3, 1, 1), (19, 512, 512, 3, 1, 1), (21, 512, 512, 3, 1, 1),
               (24, 512, 512, 3, 1, 1), (26, 512, 512, 3, 1, 1), (28, 512, 512, 3, 1, 1)]
VGG16_POOLS = [4, 9, 16, 23]  # 2x2 stride 2; features.30 (after relu5_3) is not needed
ALEX_CONVS = [(0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1), (8, 384, 256, 3, 1, 1),
              (10, 256, 256, 3, 1, 1)]
ALEX_POOLS = [2, 5]  # 3x3 stride 2
TAPS = {"vgg": [3, 8, 15, 22, 29], "alex": [1, 4, 7, 9, 11]}  # relu1_2 .. relu5_3 / relu1 .. relu5
CHANNELS = {"vgg": [64, 128, 256, 512, 512], "alex": [64, 192, 384, 256, 256]}
SIZE = {"vgg": 32, "alex": 64}  # small images: relu5 is 2x2 (VGG) / 3x3 (AlexNet)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_public_state(net: str, seed: int = 0) -> tuple[dict, dict]:
    """(torchvision backbone file, lpips lin file) contents with random values under the public key names."""
    g = torch.Generator().manual_seed(seed)
    convs = VGG16_CONVS if net == "vgg" else ALEX_CONVS
    backbone = {}
    for i, cin, cout, k, _, _ in convs:
        backbone[f"features.{i}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5
        backbone[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.1
    backbone["classifier.6.weight"] = torch.randn(10, 4, generator=g)  # torchvision files carry the classifier too
    backbone["classifier.6.bias"] = torch.randn(10, generator=g)
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(CHANNELS[net])}
    return backbone, lin


@pytest.fixture(scope="module")
def public_files(tmp_path_factory):
    """{net: (backbone .pth, lin .pth, backbone dict, lin dict)}, written with torch.save as the public files are."""
    root = tmp_path_factory.mktemp("lpips")
    files = {}
    for net, (bname, lname) in {"vgg": ("vgg16-397923af.pth", "vgg.pth"),
                                "alex": ("alexnet-owt-7be5be79.pth", "alex.pth")}.items():
        backbone, lin = random_public_state(net)
        torch.save(backbone, root / bname)
        torch.save(lin, root / lname)
        files[net] = (root / bname, root / lname, backbone, lin)
    return files


def images(net: str, n: int = 3, channels: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, channels, SIZE[net], SIZE[net], generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------------------------------
def direct_lpips(x: torch.Tensor, y: torch.Tensor, net: str, backbone: dict, lin: dict) -> torch.Tensor:
    """The formula, written out: ScalingLayer, conv/ReLU/pool trunk from the raw state dict, taps, channel-unit
    normalisation, squared difference weighted by the lin weights, spatial mean, sum over layers."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    convs = {c[0]: c for c in (VGG16_CONVS if net == "vgg" else ALEX_CONVS)}
    pools = VGG16_POOLS if net == "vgg" else ALEX_POOLS

    def taps(img):
        h, out = (img - shift) / scale, []
        for i in range(TAPS[net][-1] + 1):
            if i in convs:
                _, _, _, _, stride, pad = convs[i]
                h = F.conv2d(h, backbone[f"features.{i}.weight"], backbone[f"features.{i}.bias"], stride, pad)
            elif i in pools:
                h = F.max_pool2d(h, 2, 2) if net == "vgg" else F.max_pool2d(h, 3, 2)
            else:
                h = h.clamp_min(0)  # the ReLU after each conv
            if i in TAPS[net]:
                out.append(h)
        return out

    total = torch.zeros(x.shape[0])
    for layer, (fx, fy) in enumerate(zip(taps(x), taps(y))):
        nx = fx / (fx.square().sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.square().sum(1, keepdim=True).sqrt() + 1e-10)
        w = lin[f"lin{layer}.model.1.weight"].view(1, -1, 1, 1)
        total = total + (w * (nx - ny).square()).sum(1).mean((1, 2))
    return total


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_architecture_matches_torchvision_layout_and_lpips_taps(net):
    with torch.device("meta"):  # layout only
        model = LPIPS(net)
    convs = [(i, m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0])
             for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    assert convs == (VGG16_CONVS if net == "vgg" else ALEX_CONVS)
    pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
    assert pools == (VGG16_POOLS if net == "vgg" else ALEX_POOLS)
    relus = [i for i, m in enumerate(model.features) if isinstance(m, nn.ReLU)]
    assert relus == [i + 1 for i, *_ in convs]  # a ReLU after every conv
    assert list(model.taps) == TAPS[net] and set(model.taps) <= set(relus)
    assert len(model.features) == TAPS[net][-1] + 1  # nothing after the last tap
    # tap channel counts = the lin layers' inputs; lin layers are bias-free 1x1 convs to one channel
    out_channels = {i + 1: cout for i, _, cout, *_ in convs}
    assert [out_channels[t] for t in model.taps] == CHANNELS[net] == list(model.channels)
    assert [tuple(lin.weight.shape) for lin in model.lins] == [(1, c, 1, 1) for c in CHANNELS[net]]
    assert all(lin.bias is None for lin in model.lins)
    # the state dict keys are exactly the public names: torchvision's features.* and lpips' lin*.model.1.weight
    expected = [f"features.{i}.{w}" for i, *_ in convs for w in ("weight", "bias")]
    expected += [f"lin{k}.model.1.weight" for k in range(5)]
    assert list(model.state_dict()) == expected
    assert not any(p.requires_grad for p in model.parameters()) and not model.train().training
    # avg pooling (piq replace_pooling) for VGG only
    with torch.device("meta"):
        avg = LPIPS("vgg", pooling="avg")
    assert [i for i, m in enumerate(avg.features) if isinstance(m, nn.AvgPool2d)] == VGG16_POOLS
    with pytest.raises(ValueError, match="VGG"):
        LPIPS("alex", pooling="avg")
    with pytest.raises(ValueError, match="net"):
        LPIPS("squeeze")


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_distance_equals_the_formula_is_zero_on_itself_and_symmetric(net, public_files):
    backbone_path, lin_path, backbone, lin = public_files[net]
    model = load_lpips((backbone_path, lin_path))
    assert model.net == net and model.resize is None
    x, y = images(net, seed=1), images(net, seed=2)
    d = model(x, y)
    assert d.shape == (3,) and (d > 0).all()
    torch.testing.assert_close(d, direct_lpips(x, y, net, backbone, lin), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model(y, x), d, rtol=1e-6, atol=0)
    assert torch.equal(model(x, x), torch.zeros(3))
    # per layer values sum to the distance
    total, layers = model(x, y, per_layer=True)
    assert len(layers) == 5 and torch.equal(total, torch.stack(layers).sum(0))
    # one-channel images are repeated to three channels
    g1, g2 = images(net, channels=1, seed=3), images(net, channels=1, seed=4)
    torch.testing.assert_close(model(g1, g2), model(g1.repeat(1, 3, 1, 1), g2.repeat(1, 3, 1, 1)), rtol=0, atol=0)
    # ScalingLayer on [-1, 1] == ImageNet mean/std on (x + 1)/2 (what sony/ctm feeds piq)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    torch.testing.assert_close(model.prepare(x), ((x + 1) / 2 - mean) / std, rtol=1e-5, atol=1e-5)
    # resize: bilinear (align_corners=False) to resize x resize before everything else
    small_x, small_y = x[:, :, ::2, ::2], y[:, :, ::2, ::2]
    resized = copy.deepcopy(model)
    resized.resize = SIZE[net]
    def up(t):
        return F.interpolate(t, size=SIZE[net], mode="bilinear", align_corners=False)

    torch.testing.assert_close(resized(small_x, small_y), model(up(small_x), up(small_y)), rtol=1e-6, atol=0)
    # gradients reach the input, not the frozen network
    xg = x.clone().requires_grad_()
    model(xg, y).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_combined_safetensors_and_lpips_module_state_dict(public_files, tmp_path):
    backbone_path, lin_path, backbone, lin = public_files["alex"]
    two = load_lpips((lin_path, backbone_path))  # the two files in either order
    path = save_lpips_weights((backbone_path, lin_path), tmp_path / "lpips-alex.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == {k for k in backbone if k.startswith("features.")} | set(lin)
    assert meta == {"format": "gensample-lpips", "net": "alex"}
    one = load_lpips(path)
    assert one.net == "alex" and one.weights_sha256 == two.weights_sha256
    x, y = images("alex", seed=5), images("alex", seed=6)
    assert torch.equal(one(x, y), two(x, y))
    assert save_lpips_weights(one, tmp_path / "again.safetensors").is_file()
    assert load_lpips(tmp_path / "again.safetensors").weights_sha256 == two.weights_sha256
    # the state_dict() of a whole lpips.LPIPS module (net.slice<j>.<torchvision index>.*, scaling_layer.*)
    slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    module_state = {f"net.slice{slices[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v
                    for k, v in backbone.items() if k.startswith("features.")}
    module_state.update(lin)
    module_state.update({"scaling_layer.shift": torch.zeros(1, 3, 1, 1),
                         "scaling_layer.scale": torch.ones(1, 3, 1, 1)})
    torch.save(module_state, tmp_path / "lpips_module.pth")
    assert load_lpips(tmp_path / "lpips_module.pth").weights_sha256 == two.weights_sha256


def test_wrong_files_give_clear_errors(public_files, tmp_path):
    vgg_backbone, vgg_lin, backbone, lin = public_files["vgg"]
    alex_backbone, alex_lin, *_ = public_files["alex"]
    # lin keys under other names (e.g. without lpips' "model.1")
    torch.save({k.replace(".model.1", ""): v for k, v in lin.items()}, tmp_path / "lin_renamed.pth")
    with pytest.raises(LPIPSWeightsError, match=r"lin_renamed\.pth.*unexpected keys.*lin0\.model\.1\.weight"):
        load_lpips((vgg_backbone, tmp_path / "lin_renamed.pth"))
    # backbone keys under other names (a bare Sequential: "0.weight", ...)
    torch.save({k.replace("features.", ""): v for k, v in backbone.items()}, tmp_path / "bare.pth")
    with pytest.raises(LPIPSWeightsError, match=r"bare\.pth.*features\.0\.weight"):
        load_lpips((tmp_path / "bare.pth", vgg_lin))
    # a missing and an unexpected backbone key (e.g. a VGG19 file)
    missing = {k: v for k, v in backbone.items() if k != "features.28.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(LPIPSWeightsError, match=r"missing\.pth.*missing keys \['features\.28\.bias'\].*vgg16"):
        load_lpips((tmp_path / "missing.pth", vgg_lin))
    torch.save({**backbone, "features.30.weight": torch.zeros(512, 512, 3, 3)}, tmp_path / "vgg19ish.pth")
    with pytest.raises(LPIPSWeightsError, match=r"unexpected keys \['features\.30\.weight'\]"):
        load_lpips((tmp_path / "vgg19ish.pth", vgg_lin))
    # a wrong shape
    torch.save({**lin, "lin2.model.1.weight": torch.rand(1, 7, 1, 1)}, tmp_path / "lin_shape.pth")
    with pytest.raises(LPIPSWeightsError, match=r"lin_shape\.pth: lin2\.model\.1\.weight has shape"):
        load_lpips((vgg_backbone, tmp_path / "lin_shape.pth"))
    # mismatched pair, explicit net that the files contradict, two lin files, wrong count
    with pytest.raises(LPIPSWeightsError, match="LPIPS-vgg.*alex backbone"):
        load_lpips((alex_backbone, vgg_lin))
    with pytest.raises(LPIPSWeightsError, match="net='alex'"):
        read_lpips_state_dict((vgg_backbone, vgg_lin), net="alex")
    with pytest.raises(LPIPSWeightsError, match="exactly one set of backbone"):
        load_lpips((vgg_lin, alex_lin))
    with pytest.raises(ValueError, match="two files"):
        load_lpips((vgg_backbone, vgg_lin, alex_lin))
    # unrelated file, missing file, pickled objects (weights_only refuses them), non-tensor values
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(LPIPSWeightsError, match=r"other\.pth holds neither"):
        load_lpips((vgg_backbone, tmp_path / "other.pth"))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        load_lpips((tmp_path / "nope.pth", vgg_lin))
    torch.save({"features.0.weight": argparse.Namespace(a=1)}, tmp_path / "pickled.pth")
    with pytest.raises(LPIPSWeightsError, match=r"pickled\.pth could not be read as a tensors-only"):
        load_lpips((tmp_path / "pickled.pth", vgg_lin))
    torch.save({"features.0.weight": "x"}, tmp_path / "strings.pth")
    with pytest.raises(LPIPSWeightsError, match="flat state dict of tensors"):
        load_lpips((tmp_path / "strings.pth", vgg_lin))
    with pytest.raises(ValueError, match="resize"):
        LPIPS("alex", resize=0)
    with pytest.raises(ValueError, match="1 or 3"):
        load_lpips((alex_backbone, alex_lin))(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))


# ------------------------------------------------------------------------------------------------------------------
# CTM with distance="lpips"
# ------------------------------------------------------------------------------------------------------------------
def test_ctm_step_with_lpips(public_files, tmp_path):
    from test_ctm import edm_teacher

    from gensample.methods.ctm import CTMTraining

    backbone_path, lin_path, *_ = public_files["alex"]
    teacher = edm_teacher()
    with pytest.raises(ValueError, match=r"lpips_weights.*vgg16-397923af\.pth.*lpips"):
        CTMTraining(teacher, num_sigmas=3, distance="lpips")
    with pytest.raises(ValueError, match="distance='lpips'"):
        CTMTraining(teacher, num_sigmas=3, lpips_weights=(backbone_path, lin_path))
    torch.manual_seed(0)
    method = CTMTraining(teacher, num_sigmas=4, max_heun_steps=2, distance="lpips",
                         lpips_weights=(backbone_path, lin_path), lpips_resize=64)
    assert method.lpips.net == "alex" and method.lpips.resize == 64
    # the frozen LPIPS network is not part of the method's state dict (checkpoints), but moves with it
    assert not any("lpips" in k or k.startswith("features.") for k in method.state_dict())
    cfg = method.method_config()
    assert cfg["distance"] == "lpips" and cfg["lpips_net"] == "alex" and cfg["lpips_resize"] == 64
    assert cfg["lpips_weights_sha256"] == method.lpips.weights_sha256 and cfg["lpips_pooling"] == "max"
    a = torch.rand(4, 1, 8, 8) * 2 - 1
    b = (a + 0.2 * torch.randn(4, 1, 8, 8)).requires_grad_()
    assert torch.equal(method.distance(a, a), torch.zeros(4))
    def up(t):
        return F.interpolate(t.repeat(1, 3, 1, 1), size=64, mode="bilinear", align_corners=False)

    torch.testing.assert_close(method.distance(b, a), method.lpips(up(b), up(a)), rtol=1e-6, atol=0)
    method.train()
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    out = method(x0, 0)
    assert torch.isfinite(out["loss"]) and float(out["ctm"]) > 0 and "dsm_weight" in out
    out["loss"].backward()
    grads = [p.grad for p in method.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in method.lpips.parameters())
    method.to(torch.float64)
    assert method.lpips.lins[0].weight.dtype == torch.float64
    method.to(torch.float32)
    # 1- or 3-channel images only: a 4-channel (latent) student is refused
    with pytest.raises(ValueError, match="1- or 3-channel"):
        CTMTraining(edm_teacher(in_channels=4, out_channels=4), num_sigmas=3, distance="lpips",
                    lpips_weights=(backbone_path, lin_path))


def test_cli_ctm_lpips(public_files, tmp_path):
    from test_ctm import edm_teacher

    from gensample.cli.train_ctm import register

    teacher_dir = tmp_path / "teacher"
    edm_teacher().save_pretrained(teacher_dir)
    parser = argparse.ArgumentParser(prog="gensample")
    train_sub = parser.add_subparsers(dest="command").add_parser("train").add_subparsers(dest="method")
    register(train_sub)
    common = ["train", "ctm", "--teacher", str(teacher_dir), "--max-steps", "1", "--batch-size", "4",
              "--num-sigmas", "3", "--num-sample-images", "1", "--sample-steps", "1", "--no-progress",
              "--checkpoint-every", "0", "--distance", "lpips"]
    args = parser.parse_args(common + ["--output", str(tmp_path / "x")])
    with pytest.raises(ValueError, match=r"--lpips-weights.*alexnet-owt-7be5be79\.pth.*lpips"):
        args.func(args)
    combined = save_lpips_weights(public_files["alex"][:2], tmp_path / "alex.safetensors")
    out = tmp_path / "run"
    args = parser.parse_args(common + ["--output", str(out), "--lpips-weights", str(combined), "--lpips-resize",
                                       "32"])
    assert args.func(args)["steps"] == 1
    run = json.loads((out / "run_config.json").read_text())
    assert run["method_config"]["distance"] == "lpips" and run["method_config"]["lpips_resize"] == 32
    assert run["train"]["extra"]["lpips_weights"] == [str(combined)]
