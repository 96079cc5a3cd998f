"""Train the FID-digits feature network (gensample.metrics.features.DigitsClassifier) on the digits TRAIN split.

    python scripts/train_digits_classifier.py            # writes assets/digits_classifier.safetensors + .json

Deterministic for a fixed --seed (single thread, torch.use_deterministic_algorithms). Inputs are quantised to 8 bits
exactly as at evaluation time (round(255 x) / 127.5 - 1). Augmentation: random shifts of up to --max-shift pixels
(background-padded). A fixed number of epochs; the held-out split is only evaluated once at the end (no model
selection on it), and its accuracy is written to the .json next to the weights.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gensample.data import load_digits
from gensample.metrics.features import DigitsClassifier, state_dict_sha256

REPO = Path(__file__).resolve().parents[1]


def quantise(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> the 8-bit grid the FID extractor sees: round(255 (x + 1) / 2) / 127.5 - 1."""
    return ((x + 1) / 2 * 255).round() / 127.5 - 1


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by (dy, dx) in [-max_shift, max_shift]^2, filling with the background value -1."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    rows = (offsets[:, 0, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (offsets[:, 1, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).double().mean().item()


def train(seed: int = 0, epochs: int = 60, batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 1e-4,
          max_shift: int = 1, width: int = 32) -> tuple[DigitsClassifier, dict]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x, y = load_digits("train", return_labels=True)
    x = quantise(x)
    model = DigitsClassifier(width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], max_shift, generator)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {total / len(x):.4f}  train acc {accuracy(model, x, y):.4f}")
    return model.eval(), {"train_accuracy": accuracy(model, x, y)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--max-shift", type=int, default=1)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--output", type=Path, default=REPO / "assets" / "digits_classifier.safetensors")
    args = p.parse_args(argv)

    from safetensors.torch import save_file

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    model, info = train(args.seed, args.epochs, args.batch_size, args.lr, args.weight_decay, args.max_shift,
                        args.width)
    seconds = time.perf_counter() - start
    xh, yh = load_digits("heldout", return_labels=True)
    heldout = accuracy(model, quantise(xh), yh)
    print(f"held-out accuracy {heldout:.4f} ({len(yh)} images), training {seconds:.1f} s")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.output), metadata={"format": "pt"})  # one key: safetensors' header order is random
    args.output.chmod(0o644)
    meta = {
        "model": "gensample.metrics.features.DigitsClassifier",
        "config": model.config,
        "feature_layer": "fc1 (pre-activation), 64-d",
        "input": "float (N, 1, 8, 8) in [-1, 1]; quantised to 8 bits, round(255 (x + 1) / 2) / 127.5 - 1",
        "train_split": "train (1500 images)",
        "heldout_split": "heldout (297 images), evaluated once after training",
        "heldout_accuracy": heldout,
        "train_accuracy": info["train_accuracy"],
        "seed": args.seed,
        "hyperparameters": {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay",
                                                         "max_shift", "width")},
        "command": " ".join(["python scripts/train_digits_classifier.py", *(sys.argv[1:] if argv is None else argv)]),
        "torch_version": torch.__version__,
        "training_seconds": round(seconds, 1),
        "sha256": hashlib.sha256(args.output.read_bytes()).hexdigest(),
        "weights_sha256": state_dict_sha256(model),
    }
    args.output.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.output} and {args.output.with_suffix('.json')}")


if __name__ == "__main__":
    main()
