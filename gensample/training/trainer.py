"""Trainer on accelerate: optimizers per method group, mixed precision, gradient accumulation, evaluation EMA,
atomic checkpoints with a retention limit, exact resume, logging, periodic sample grids, final pipeline export."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..images import plot_curve, save_image_grid
from ..methods.base import TrainingMethod
from . import checkpoint as ckpt
from . import snapshots
from .ema import EMA
from .lr_schedule import check_lr_schedule, lr_multiplier

logger = logging.getLogger("gensample.train")


@dataclass
class TrainConfig:
    output_dir: str
    max_steps: int = 1000
    batch_size: int = 64  # per process, per micro-batch
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_warmup_steps: int = 0
    #: "constant", or "cosine" / "linear" decay from the base rate to ``lr_final_fraction`` of it at max_steps
    lr_schedule: str = "constant"
    lr_final_fraction: float = 0.0
    lr_decay_steps: int | None = None  # None: decay over max_steps (set it when a run is trained in legs)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    ema_rate: float = 0.999
    ema_warmup: bool = True
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    seed: int = 0
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 3
    sample_every: int = 0  # 0: only at the end
    #: every N steps (and at the last step) keep the raw weights of the method's ``ema_modules()`` in
    #: ``snapshots/`` (weights only, for LCSC); 0: off
    snapshot_every: int = 0
    num_sample_images: int = 64
    sample_steps: tuple[int, ...] = (1, 2)
    log_every: int = 10
    report_to: str | None = None  # accelerate tracker name ("tensorboard", "wandb", ...)
    cpu: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form, recorded in the run config
    #: per-group overrides {group: {"lr", "betas", "weight_decay"}} on top of the method's
    #: ``optimizer_settings()`` (which in turn override learning_rate / adam_betas / weight_decay above)
    group_optimizer_settings: dict = field(default_factory=dict)

    @property
    def lr_decay_horizon(self) -> int:
        """The step at which a decaying LR schedule ends: ``lr_decay_steps``, else ``max_steps``."""
        return self.lr_decay_steps or self.max_steps


OPTIMIZER_KEYS = ("lr", "betas", "weight_decay")


def resolve_optimizer_settings(method: TrainingMethod, config: TrainConfig) -> dict[str, dict]:
    """{group: {"lr", "betas", "weight_decay"}} for every optimizer group of ``method``: the config's defaults,
    then the method's :meth:`~gensample.methods.base.TrainingMethod.optimizer_settings`, then
    ``config.group_optimizer_settings``; unknown groups or keys and invalid values raise a ValueError."""
    groups = list(method.trainable_groups())
    resolved = {g: {"lr": float(config.learning_rate), "betas": tuple(float(b) for b in config.adam_betas),
                    "weight_decay": float(config.weight_decay)} for g in groups}
    for source, overrides in (("the method's optimizer_settings()", method.optimizer_settings() or {}),
                              ("TrainConfig.group_optimizer_settings", config.group_optimizer_settings or {})):
        for group, settings in overrides.items():
            if group not in resolved:
                raise ValueError(f"{source} names optimizer group {group!r}, but the method has the groups {groups}.")
            unknown = set(settings) - set(OPTIMIZER_KEYS)
            if unknown:
                raise ValueError(f"{source} for group {group!r}: unknown keys {sorted(unknown)}; allowed: "
                                 f"{list(OPTIMIZER_KEYS)}.")
            for key, value in settings.items():
                resolved[group][key] = tuple(float(b) for b in value) if key == "betas" else float(value)
    for group, st in resolved.items():
        b = st["betas"]
        if not st["lr"] > 0 or st["weight_decay"] < 0 or len(b) != 2 or not all(0.0 <= x < 1.0 for x in b):
            raise ValueError(f"optimizer group {group!r}: need lr > 0, weight_decay >= 0 and two betas in [0, 1), "
                             f"got {st}.")
    return resolved


class BatchSampler:
    """Endless shuffled mini-batches of an in-memory tensor (and its labels, if given: then each batch is the tuple
    ``(images, labels)``); its whole state (generator, permutation, position) is checkpointed, so a resumed run sees
    exactly the batches the uninterrupted run would have seen."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int, labels: torch.Tensor | None = None):
        if len(data) == 0:
            raise ValueError("the dataset is empty.")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (len(data),) or labels.dtype != torch.int64:
                raise ValueError(f"labels must be an int64 tensor of shape ({len(data)},) (one per image), got "
                                 f"{labels.dtype} {tuple(labels.shape)}.")
        self.data, self.labels, self.batch_size = data, labels, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(len(data), generator=self.generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        idx, count = [], 0
        while count < self.batch_size:
            if self.pos >= len(self.perm):
                self.perm = torch.randperm(len(self.data), generator=self.generator)
                self.pos = 0
            take = min(self.batch_size - count, len(self.perm) - self.pos)
            idx.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            count += take
        idx = torch.cat(idx)
        return self.data[idx] if self.labels is None else (self.data[idx], self.labels[idx])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state().tolist(), "perm": self.perm.tolist(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.perm = torch.tensor(state["perm"], dtype=torch.long)
        self.pos = int(state["pos"])


def _rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# -- what a resume may change ------------------------------------------------------------------------------------
#: TrainConfig fields that define the run: the checkpoint's optimizer state, EMA and data order belong to them, so a
#: resume with other values is refused (with the list of differences).
RUN_DEFINING_FIELDS = ("batch_size", "gradient_accumulation_steps", "ema_rate", "ema_warmup", "mixed_precision",
                       "max_grad_norm")
#: TrainConfig fields a resume may change without a warning (each change is noted in the log): the run's length and
#: its bookkeeping. (``seed``: a resume restores the checkpoint's RNG and data-order state; the seed only fixes the
#: sample grids' noise.) The LR schedule, the optimizer settings, the method's settings (e.g. the curriculum's total
#: steps) and the process count may change with a warning; everything else is refused.
RESUME_FREE_FIELDS = ("max_steps", "checkpoint_every", "checkpoints_total_limit", "sample_every", "snapshot_every",
                      "num_sample_images", "sample_steps", "log_every", "report_to", "cpu", "progress", "seed",
                      "output_dir")
#: TrainConfig fields compared by their own checks: the optimizer settings (the checkpoint's are restored, with a
#: warning), the LR schedule and its horizon (a warning), ``extra`` (per key). Any other field that changes is warned.
_RESUME_CHECKED_ELSEWHERE = {"learning_rate", "adam_betas", "weight_decay", "group_optimizer_settings",
                             "lr_schedule", "lr_decay_steps", "extra"}
#: the files a resumable training checkpoint must list in its manifest
CHECKPOINT_FILES = ("trainer_state.json", "networks.safetensors", "optimizers.pt")
#: test-only crash hook: ``point:step`` (a point of PAUSE_POINTS) makes the main process write OUTPUT/.test-paused and
#: sleep there, so that a crash test can SIGKILL a real training process at a known point. Unset: no effect.
TEST_PAUSE_ENV = "GENSAMPLE_TEST_PAUSE_AT"
#: step:N = inside the optimizer step N -> N+1 (after backward, before the update); checkpoint-write:N = the staging
#: folder of checkpoint N holds the network weights only; checkpoint-renamed:N = checkpoint N renamed into place, not
#: yet pruned; pipeline-write:N = the final pipeline written to its temporary folder, not yet renamed
PAUSE_POINTS = ("step", "checkpoint-write", "checkpoint-renamed", "pipeline-write")
_PIPELINE_STAGING_RE = re.compile(r"^\.tmp-pipeline-[a-z0-9_]{8}$")


def _to_device(batch, device):
    """A batch (a tensor, or the tuple ``(images, labels)``) on ``device``."""
    if isinstance(batch, tuple):
        return tuple(t.to(device) for t in batch)
    return batch.to(device)


def data_fingerprint(data: torch.Tensor) -> dict:
    """Shape, dtype and sha256 of a dataset tensor: what a checkpoint records of its training data."""
    t = data.detach()
    t = (t if t.device.type == "cpu" else t.cpu()).contiguous()
    h = hashlib.sha256()
    flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    chunk = 1 << 26
    for i in range(0, flat.numel(), chunk):
        h.update(memoryview(flat[i:i + chunk].numpy()))
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "sha256": h.hexdigest()}


def _network_configs(module: torch.nn.Module) -> dict:
    """{submodule path: its diffusers config} of every ConfigMixin network inside ``module`` (JSON-normalised)."""
    try:
        from diffusers.configuration_utils import ConfigMixin
    except ImportError:  # pragma: no cover
        return {}
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, ConfigMixin):
            out[name or "."] = {k: v for k, v in dict(m.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(out, default=str))


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)


def _architecture_differences(saved: dict, mine: dict, what: str) -> list[str]:
    """A one-line summary of how two {tensor name: shape} tables differ (empty when they agree)."""
    only_saved, only_mine = sorted(set(saved) - set(mine)), sorted(set(mine) - set(saved))
    shapes = sorted(k for k in set(saved) & set(mine) if list(saved[k]) != list(mine[k]))
    parts = []
    if only_saved:
        parts.append(f"{len(only_saved)} tensors only in the checkpoint (e.g. {', '.join(only_saved[:3])})")
    if only_mine:
        parts.append(f"{len(only_mine)} tensors only in this model (e.g. {', '.join(only_mine[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} tensors of another shape (e.g. " + ", ".join(
            f"{k} {tuple(saved[k])} in the checkpoint vs {tuple(mine[k])}" for k in shapes[:2]) + ")")
    return [f"{what}: another architecture ({'; '.join(parts)}; another --model?)"] if parts else []


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


class NothingToResume(ckpt.CheckpointError):
    """``--resume`` found no valid checkpoint (``what`` says why)."""

    def __init__(self, what: str):
        self.what = what
        super().__init__(f"nothing to resume: {what}. Check --output (or the --resume path); to start from step 0 "
                         "when a run has no checkpoint yet, pass --resume auto (Trainer.train(resume='auto')).")


class Trainer:
    """Runs a :class:`TrainingMethod` on a dataset tensor (N, C, H, W) in [-1, 1].

    Under ``accelerate launch`` each process draws its own batches (seed + rank) and gradients are averaged by DDP;
    the effective batch is ``batch_size * num_processes * gradient_accumulation_steps``. The LR schedule is stepped
    once per optimizer step (not once per process).
    """

    def __init__(self, method: TrainingMethod, dataset: torch.Tensor, config: TrainConfig,
                 evaluate: Callable | None = None, evaluate_every: int = 0, labels: torch.Tensor | None = None):
        self.config = config
        check_lr_schedule(config.lr_schedule, config.lr_warmup_steps, config.lr_decay_horizon,
                          config.lr_final_fraction)
        for name in ("checkpoint_every", "sample_every", "checkpoints_total_limit", "snapshot_every"):
            value = getattr(config, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0 (0: off / keep all), got {value!r}.")
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        find_unused = len(method.trainable_groups()) > 1
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            cpu=config.cpu,
            log_with=config.report_to,
            project_dir=str(self.output_dir),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
        )
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        torch.manual_seed(config.seed + self.rank)
        np.random.seed((config.seed + self.rank) % 2**32)
        random.seed(config.seed + self.rank)

        self.method = method.to(acc.device)
        self.group_names = list(method.trainable_groups())
        self.optimizer_settings = resolve_optimizer_settings(method, config)
        self.optimizers, self.lr_schedulers = [], []
        group_params: dict[str, set[int]] = {}
        for name, module in method.trainable_groups().items():
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"method group {name!r} has no trainable parameters.")
            group_params[name] = {id(p) for p in params}
            st = self.optimizer_settings[name]
            opt = torch.optim.Adam(params, lr=st["lr"], betas=st["betas"], weight_decay=st["weight_decay"])
            # a plain lambda, so the scheduler's state_dict stays the step count alone
            self.lr_schedulers.append(torch.optim.lr_scheduler.LambdaLR(opt, lambda s, c=config: lr_multiplier(
                s, c.lr_schedule, c.lr_warmup_steps, c.lr_decay_horizon, c.lr_final_fraction)))
            self.optimizers.append(opt)
        prepared = acc.prepare(self.method, *self.optimizers)
        self.model, self.optimizers = prepared[0], list(prepared[1:])
        self.emas = {name: EMA(m, config.ema_rate, config.ema_warmup) for name, m in method.ema_modules().items()}
        #: per EMA, the optimizer groups that hold its parameters: the EMA is updated only after a step in which one
        #: of them took an optimizer step (a discriminator-only step leaves the generator's EMA alone). An EMA whose
        #: parameters no group optimises (changed by hooks, if at all) is updated after every step.
        self.ema_groups = {name: [g for g, ids in group_params.items() if ids & {id(p) for p in m.parameters()}]
                           for name, m in method.ema_modules().items()}
        self.sampler = BatchSampler(dataset, config.batch_size, seed=config.seed * 1000 + self.rank, labels=labels)
        self._data_record: dict | None = None  # data_fingerprint(dataset), computed when first needed
        self.step = 0
        self.history: list[tuple[int, float]] = []
        self.evaluate, self.evaluate_every = evaluate, evaluate_every
        self._log_file = None

    # -- state ----------------------------------------------------------------------------------------------------
    def _run_config(self) -> dict:
        cfg = asdict(self.config)
        cfg["adam_betas"] = list(cfg["adam_betas"])
        cfg["sample_steps"] = list(cfg["sample_steps"])
        optimizers = {g: {**st, "betas": list(st["betas"])} for g, st in self.optimizer_settings.items()}
        return {"method": self.method.method_name, "method_config": self.method.method_config(), "train": cfg,
                "optimizers": optimizers, "num_processes": self.world}

    def _run_definition(self) -> dict:
        """What a checkpoint records of its run beyond the run config, for a resume to be checked against: the training
        data (shape, dtype, sha256) and the configs of the method's networks (e.g. the UNet's sample_size)."""
        if self._data_record is None:
            self._data_record = data_fingerprint(self.sampler.data)
            if self.sampler.labels is not None:
                self._data_record = {**self._data_record, "labels": data_fingerprint(self.sampler.labels)}
        return {"data": self._data_record,
                "networks": _network_configs(self.accelerator.unwrap_model(self.model)),
                "evaluate_every": self.evaluate_every}

    def _test_pause(self, point: str) -> None:
        """The crash tests' hook (TEST_PAUSE_ENV); does nothing unless that variable names this point and step."""
        spec = os.environ.get(TEST_PAUSE_ENV)
        if spec and spec == f"{point}:{self.step}" and self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / ".test-paused").write_text(spec)
            time.sleep(3600)

    def save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        staging = self.checkpoint_dir / f".tmp-checkpoint-{self.step:08d}"
        if acc.is_main_process:
            if os.path.lexists(staging):  # a crashed write of ours is replaced; anything else is not ours to delete
                if not ckpt.is_own_staging_dir(staging):
                    raise ckpt.CheckpointError(f"{staging} exists and is not a staging folder gensample wrote; "
                                               "move it out of the checkpoint folder.")
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        with open(staging / f"rng-rank{self.rank}.json", "w") as f:
            json.dump({"rng": _rng_state(), "sampler": self.sampler.state_dict()}, f)
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            method = acc.unwrap_model(self.model)
            save_file({k: v.detach().contiguous().clone() for k, v in method.state_dict().items()},
                      staging / "networks.safetensors")
            self._test_pause("checkpoint-write")
            ema_tensors = {f"{name}.{k}": v.contiguous().clone() for name, e in self.emas.items()
                           for k, v in e.state_dict().items()}
            if ema_tensors:
                save_file(ema_tensors, staging / "ema.safetensors")
            torch.save({"optimizers": [o.state_dict() for o in self.optimizers],
                        "lr_schedulers": [s.state_dict() for s in self.lr_schedulers],
                        "scaler": acc.scaler.state_dict() if acc.scaler is not None else None},
                       staging / "optimizers.pt")
            state = {"step": self.step, "ema_updates": {n: e.num_updates for n, e in self.emas.items()},
                     "history": self.history, **self._run_config(), "run_definition": self._run_definition()}
            (staging / "trainer_state.json").write_text(json.dumps(state))
            final = ckpt.finalize(staging, self.checkpoint_dir, self.step)
            self._test_pause("checkpoint-renamed")
            ckpt.prune(self.checkpoint_dir, self.config.checkpoints_total_limit)
        acc.wait_for_everyone()
        return final

    def _find_checkpoint(self, path: str | Path | None) -> Path:
        """The checkpoint folder ``path`` designates: None -> the newest valid one of this run; a run folder or its
        ``checkpoints/`` folder -> the newest valid one there; anything else is taken as a checkpoint-N folder."""
        if path is None:
            root = self.checkpoint_dir
        else:
            path = Path(path)
            if (path / "checkpoints").is_dir():
                root = path / "checkpoints"
            elif path.is_dir() and not (path / ckpt.MANIFEST).exists() and ckpt.list_checkpoints(path):
                root = path
            else:
                return path
        links = ckpt.linked_checkpoints(root)
        if links:
            raise ckpt.CheckpointError(self._link_message(links[0]))
        found = ckpt.latest_valid_checkpoint(root, warn=self._warn)
        if found is None:
            if not root.is_dir():
                what = f"{root} does not exist"
            elif not ckpt.list_checkpoints(root):
                what = f"{root} holds no checkpoint-N folder"
            else:
                what = f"no checkpoint in {root} verifies (see the reasons above)"
            raise NothingToResume(what)
        return found

    @staticmethod
    def _link_message(link: Path) -> str:
        return (f"{link} is a symbolic link (to {os.readlink(link)}). gensample neither follows nor prunes links in a "
                "run's checkpoint folder (a link's name need not be the step it holds, and pruning cannot manage "
                "it): remove the link, or resume from its target with --resume TARGET.")

    def load_checkpoint(self, path: str | Path | None = None, *, missing_ok: bool = False) -> Path | None:
        """Restore model, EMA, optimizers, LR schedules, step (hence curriculum), sampler and RNG states.

        ``path`` None: the newest valid checkpoint under the output dir (corrupt newer ones are skipped with a
        warning; none at all raises a CheckpointError, or with ``missing_ok`` warns and returns None); a path: that
        checkpoint or run folder, which must verify. The step is the checkpoint's recorded one (its folder name must
        agree). A checkpoint of a different run (method, model, data, batch size, ...: see RUN_DEFINING_FIELDS) is
        refused with the list of differences before anything is loaded; harmless changes are warned or noted.
        """
        try:
            path = self._find_checkpoint(path)
        except NothingToResume as e:
            if missing_ok and path is None:
                self._warn(f"nothing to resume ({e.what}); --resume auto: starting from step 0.")
                return None
            raise
        path = Path(path)
        manifest = ckpt.verify(path)
        real = path.resolve()
        m = ckpt.CHECKPOINT_RE.match(real.name)
        if m and int(m.group(1)) != manifest["step"]:
            raise ckpt.CheckpointError(f"{path} leads to {real}, which holds step {manifest['step']}, not the step "
                                       "its name says; refusing a checkpoint whose name and recorded step disagree.")
        missing = [f for f in CHECKPOINT_FILES if f not in manifest["files"]]
        if missing:
            raise ckpt.CheckpointError(f"{path} is not a training checkpoint of the gensample Trainer: its manifest "
                                       f"lists no {', '.join(missing)}.")
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ckpt.CheckpointError(f"{path / 'trainer_state.json'} is not valid JSON ({e}).") from e
        if not isinstance(state, dict):
            raise ckpt.CheckpointError(f"{path / 'trainer_state.json'} is not a trainer state (a JSON object).")
        if state.get("method") != self.method.method_name:
            raise ckpt.CheckpointError(
                f"{path} is a checkpoint of method {state.get('method')!r}, not {self.method.method_name!r}; "
                "resume it with the method that wrote it.")
        if state.get("step") != manifest["step"]:
            raise ckpt.CheckpointError(f"{path}: trainer_state.json records step {state.get('step')!r} but the "
                                       f"manifest step {manifest['step']}; refusing an inconsistent checkpoint.")
        rng_file = path / f"rng-rank{self.rank}.json"
        rng = None
        if rng_file.is_file():
            try:
                rng = json.loads(rng_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ckpt.CheckpointError(f"{rng_file} is not valid JSON ({e}).") from e
        self._check_same_run(path, state, rng)

        mine = self.method.method_config()
        saved_method = state.get("method_config")
        if saved_method != json.loads(json.dumps(mine)):
            changed = sorted(k for k in set(saved_method or {}) | set(mine)
                             if (saved_method or {}).get(k) != json.loads(json.dumps(mine)).get(k))
            self._warn("method settings differ from the checkpoint's: " + ", ".join(
                f"{k} {(saved_method or {}).get(k)!r} -> {mine.get(k)!r}" for k in changed)
                + "; the current settings apply from here on (e.g. the curriculum's total steps).")
        method = self.accelerator.unwrap_model(self.model)
        device = str(self.accelerator.device)
        try:
            networks = load_file(path / "networks.safetensors", device=device)
            ema_tensors = load_file(path / "ema.safetensors") if self.emas else {}
        except Exception as e:  # safetensors raises its own error types
            raise ckpt.CheckpointError(f"{path}: the weights cannot be read ({type(e).__name__}: {e}).") from e
        try:
            opt_state = torch.load(path / "optimizers.pt", map_location=self.accelerator.device, weights_only=True)
        except Exception as e:  # pickle.UnpicklingError for a rejected global, RuntimeError for a damaged archive
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ckpt.CheckpointError(
                f"{path / 'optimizers.pt'} cannot be loaded with torch.load(weights_only=True): {first}. It should "
                "hold only tensors and plain containers; a file holding other objects is not loaded (unpickling "
                "could run code). Resume from another checkpoint.") from e
        if not isinstance(opt_state, dict) or len(opt_state.get("optimizers") or []) != len(self.optimizers) or \
                len(opt_state.get("lr_schedulers") or []) != len(self.lr_schedulers):
            raise ckpt.CheckpointError(f"{path / 'optimizers.pt'} does not hold the state of this method's "
                                       f"{len(self.optimizers)} optimizer(s) and LR schedule(s).")
        method.load_state_dict(networks)
        if self.emas:
            for name, e in self.emas.items():
                prefix = name + "."
                e.load_state_dict({k[len(prefix):]: v for k, v in ema_tensors.items() if k.startswith(prefix)},
                                  state["ema_updates"][name])
        for name, o, s in zip(self.group_names, self.optimizers, opt_state["optimizers"]):
            saved = s["param_groups"][0]
            saved = {"lr": saved.get("initial_lr", saved.get("lr")), "betas": tuple(saved.get("betas", ())),
                     "weight_decay": saved.get("weight_decay")}
            if saved != self.optimizer_settings[name]:
                self._warn(f"optimizer group {name!r}: the checkpoint's settings {saved} differ from the configured "
                           f"{self.optimizer_settings[name]}; the checkpoint's are restored with its state.")
            o.load_state_dict(s)
        for sch, s in zip(self.lr_schedulers, opt_state["lr_schedulers"]):
            sch.load_state_dict(s)
        saved = state.get("train", {})
        if saved:
            schedule, horizon = saved.get("lr_schedule", "constant"), saved.get("lr_decay_steps") or saved.get("max_steps")
            cfg = self.config
            if schedule != cfg.lr_schedule or (schedule != "constant" and horizon != cfg.lr_decay_horizon):
                self._warn(f"the LR schedule changes on resume: the checkpoint's run used {schedule} over {horizon} "
                           f"steps, this one {cfg.lr_schedule} over {cfg.lr_decay_horizon}; pass --lr-decay-steps "
                           f"{horizon} (TrainConfig.lr_decay_steps) to keep the original decay.")
        if opt_state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(opt_state["scaler"])
        if rng is not None:
            _set_rng_state(rng["rng"])
            self.sampler.load_state_dict(rng["sampler"])
        else:
            self._warn(f"{path} has no RNG state for rank {self.rank} (different process count); reseeding.")
        self.step = int(state["step"])
        self.history = [tuple(h) for h in state.get("history", [])]
        self._log(f"resumed from {path} at step {self.step}")
        return path

    def _check_same_run(self, path: Path, state: dict, rng: dict | None) -> None:
        """Refuse (CheckpointError listing every difference) a checkpoint of another run; warn about or note the
        changes a resume may make. Nothing is loaded before this passes."""
        refused, warned, noted = [], [], []
        saved_train, mine_train = state.get("train") or {}, self._run_config()["train"]
        for key in RUN_DEFINING_FIELDS:
            if key in saved_train and saved_train[key] != mine_train[key]:
                refused.append(f"{key}: {saved_train[key]!r} in the checkpoint, {mine_train[key]!r} now")
        for key in RESUME_FREE_FIELDS:
            if key in saved_train and saved_train[key] != mine_train[key]:
                noted.append(f"{key} {saved_train[key]!r} -> {mine_train[key]!r}")
        for key in sorted(set(saved_train) & set(mine_train) - set(RUN_DEFINING_FIELDS) - set(RESUME_FREE_FIELDS)
                          - _RESUME_CHECKED_ELSEWHERE):
            if saved_train[key] != mine_train[key]:
                warned.append(f"{key}: {saved_train[key]!r} in the checkpoint, {mine_train[key]!r} now")
        record = state.get("run_definition")
        saved_extra, my_extra = saved_train.get("extra") or {}, mine_train.get("extra") or {}
        for key in sorted(set(saved_extra) & set(my_extra)):
            a, b = saved_extra[key], my_extra[key]
            if a == b or key == "unet_parameters":  # the architecture is compared tensor by tensor below
                continue
            if key == "data" and not (record and "data" in record):
                refused.append(f"data: {a!r} in the checkpoint, {b!r} now")
            elif key in ("data", "command"):
                noted.append(f"{key} {a!r} -> {b!r}")
            else:
                warned.append(f"{key}: {a!r} in the checkpoint, {b!r} now")
        # the model, tensor by tensor (old checkpoints too: the safetensors header has every name and shape)
        method = self.accelerator.unwrap_model(self.model)
        mine_shapes = {k: list(v.shape) for k, v in method.state_dict().items()}
        try:
            saved_shapes = _safetensors_shapes(path / "networks.safetensors")
        except Exception as e:
            raise ckpt.CheckpointError(f"{path / 'networks.safetensors'} cannot be read ({type(e).__name__}: {e}).") \
                from e
        refused += _architecture_differences(saved_shapes, mine_shapes, "model")
        if self.emas and not (path / "ema.safetensors").is_file():
            refused.append("EMA: the checkpoint has no ema.safetensors, this method keeps an EMA")
        if record:
            saved_data, my_data = record.get("data") or {}, self._run_definition()["data"]
            if saved_data.get("shape") != my_data["shape"]:
                refused.append(f"data shape (examples, channels, height, width): {saved_data.get('shape')} in the "
                               f"checkpoint, {my_data['shape']} now (another --data or --resolution?)")
            elif (saved_data.get("dtype"), saved_data.get("sha256")) != (my_data["dtype"], my_data["sha256"]):
                refused.append(f"data content: sha256 {str(saved_data.get('sha256'))[:12]}... in the checkpoint, "
                               f"{my_data['sha256'][:12]}... now (same shape, other images)")
            saved_nets, my_nets = record.get("networks") or {}, self._run_definition()["networks"]
            for net in sorted(set(saved_nets) & set(my_nets)):
                for key in sorted(set(saved_nets[net]) & set(my_nets[net])):
                    if saved_nets[net][key] != my_nets[net][key]:
                        refused.append(f"model config {net}.{key}: {saved_nets[net][key]!r} in the checkpoint, "
                                       f"{my_nets[net][key]!r} now")
            if record.get("evaluate_every", self.evaluate_every) != self.evaluate_every:
                noted.append(f"evaluate_every (--fid-every) {record.get('evaluate_every')} -> {self.evaluate_every}")
        else:
            warned.append("the checkpoint predates run records (written by an older gensample): its data content "
                          "and model configuration (e.g. the resolution) cannot be compared with this run's; the "
                          "method, architecture, batch settings and data size are checked")
        if rng is not None:
            perm = (rng.get("sampler") or {}).get("perm") or []
            if len(perm) != len(self.sampler.data):
                refused.append(f"data size: the checkpoint's data order covers {len(perm)} examples, this data has "
                               f"{len(self.sampler.data)}")
        if state.get("num_processes", self.world) != self.world:
            warned.append(f"process count {state.get('num_processes')} -> {self.world}: the effective batch changes "
                          "and ranks without a recorded RNG state are reseeded")
        if refused:
            raise ckpt.CheckpointError(
                f"{path} belongs to a different run; refusing to resume it with these differences:\n  - "
                + "\n  - ".join(refused) + f"\nResume with the checkpoint's settings (recorded in "
                f"{path / 'trainer_state.json'}), or start a new run with another --output.")
        for w in warned:
            self._warn(f"resume: {w}.")
        if noted:
            self._log("resume changes settings that leave the run as it is: " + ", ".join(noted))

    # -- logging --------------------------------------------------------------------------------------------------
    def _warn(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(f"[gensample] warning: {msg}")
            self._write_log({"warning": msg})

    def _log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(f"[gensample] {msg}")
            self._write_log({"message": msg})

    def _write_log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")

    # -- evaluation helpers ---------------------------------------------------------------------------------------
    def export_pipeline(self):
        """The method's pipeline around the EMA networks (a deep copy: training goes on unaffected)."""
        import copy

        modules = {n: copy.deepcopy(e.model).eval() for n, e in self.emas.items()}
        return self.accelerator.unwrap_model(self.model).build_pipeline(modules)

    def save_pipeline(self, folder: Path, pipe=None, *, seconds: float | None = None, start_step: int = 0) -> Path:
        """Save the exported pipeline (``pipe``, default :meth:`export_pipeline`) to ``folder`` with its model card
        (``README.md``: method, command, budget, measured FID, sampling schedule, how to load it; see
        :mod:`gensample.training.model_card`) and the gensample version in ``model_index.json``."""
        from .model_card import save_training_card

        pipe = self.export_pipeline() if pipe is None else pipe
        pipe.save_pretrained(folder)
        save_training_card(self, pipe, folder, seconds=seconds, start_step=start_step)
        return Path(folder)

    def save_samples(self, path: Path) -> Path:
        pipe = self.export_pipeline()
        pipe.set_progress_bar_config(disable=True)
        # a method whose pipeline is not called as pipe(batch_size=...) (e.g. a text-to-image one needs prompts)
        # provides sample_images(pipe, num_images, num_inference_steps, generator) -> images in [0, 1]
        custom = getattr(self.accelerator.unwrap_model(self.model), "sample_images", None)
        rows = []
        for steps in self.config.sample_steps:
            g = torch.Generator().manual_seed(self.config.seed)
            n = self.config.num_sample_images
            rows.append(custom(pipe, n, steps, g) if custom is not None else
                        pipe(batch_size=n, num_inference_steps=steps, generator=g, output_type="pt").images)
        nrow = math.ceil(math.sqrt(self.config.num_sample_images))
        return save_image_grid(torch.cat(rows), path, nrow=nrow)

    def save_snapshot(self) -> Path | None:
        """Write the raw weights of the method's ``ema_modules()`` at this step to ``snapshots/`` (main process)."""
        if not self.accelerator.is_main_process:
            return None
        method = self.accelerator.unwrap_model(self.model)
        return snapshots.save_snapshot(self.output_dir, self.step, method.ema_modules(), method.method_name)

    # -- the loop -------------------------------------------------------------------------------------------------
    def _set_checkpoint_folder_aside(self, loaded: Path | None) -> None:
        """Before the first step: checkpoints of this run's folder that the run would overwrite or that would outlive
        it as "newest" are moved aside, never deleted: after a resume from step S (from this folder) every
        checkpoint-N with N > S, after a fresh start or a resume from another folder every checkpoint-N. A valid one
        becomes ``checkpoint-N.superseded-<time>``, an invalid one ``checkpoint-N.corrupt-<time>``."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            here = loaded is not None and loaded.resolve().parent == self.checkpoint_dir.resolve()
            moved = []
            for step, path in ckpt.list_checkpoints(self.checkpoint_dir):
                if here and step <= self.step:
                    continue
                try:
                    ckpt.verify(path)
                    reason = "superseded"
                except ckpt.CheckpointError:
                    reason = "corrupt"
                moved.append(ckpt.move_aside(path, reason).name)
            if moved:
                why = (f"this run resumes from step {self.step}" if here else
                       "this run starts afresh" if loaded is None else f"this run resumes from {loaded}")
                self._warn(f"{why}: moved aside (not deleted) the checkpoints it would overwrite or outdate, "
                           f"in {self.checkpoint_dir}: {', '.join(moved)}.")
        acc.wait_for_everyone()

    def _save_pipeline_folder(self, pipe, *, seconds: float, start_step: int) -> Path:
        """Export ``pipe`` to OUTPUT/pipeline atomically: written (and fsynced) in a temporary folder, then renamed
        into place; the previous export is replaced only then."""
        final = self.output_dir / "pipeline"
        for p in self.output_dir.iterdir():  # temporary folders of exports that crashed
            if _PIPELINE_STAGING_RE.match(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-pipeline-", dir=self.output_dir))
        try:
            self.save_pipeline(staging, pipe, seconds=seconds, start_step=start_step)
            card = staging / "README.md"
            if card.is_file():  # the card says which folder to load: the final one
                card.write_text(card.read_text().replace(str(staging), str(final)))
            _fsync_tree(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._test_pause("pipeline-write")
        previous = ckpt.move_aside(final, "replaced") if os.path.lexists(final) else None
        os.replace(staging, final)
        ckpt._fsync_dir(self.output_dir)
        if previous is not None and not previous.is_symlink() and (previous / "model_index.json").is_file():
            shutil.rmtree(previous, ignore_errors=True)  # the earlier export of this run folder
        return final

    def train(self, resume: bool | str | Path = False) -> dict:
        """Train to ``config.max_steps``. ``resume``: False (a fresh run), True or "latest" (the newest valid
        checkpoint of the output dir; none is an error), "auto" (the same, but start from step 0 when there is none),
        or a checkpoint-N / run folder. Checkpoints the run would overwrite are moved aside first (see
        :meth:`_set_checkpoint_folder_aside`); symbolic links in the checkpoint folder are refused."""
        acc, cfg = self.accelerator, self.config
        links = ckpt.linked_checkpoints(self.checkpoint_dir)
        if links:
            raise ckpt.CheckpointError(self._link_message(links[0]))
        loaded = None
        if isinstance(resume, str) and resume in ("latest", "auto"):
            loaded = self.load_checkpoint(None, missing_ok=resume == "auto")
        elif resume is True:
            loaded = self.load_checkpoint(None)
        elif resume:
            loaded = self.load_checkpoint(resume)
        self._set_checkpoint_folder_aside(loaded)
        if acc.is_main_process and cfg.snapshot_every:
            moved = snapshots.move_aside_after(self.output_dir, self.step)
            if moved:
                self._warn(f"moved aside (not deleted) snapshots past step {self.step}: {', '.join(moved)}.")
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "run_config.json").write_text(json.dumps(self._run_config(), indent=1))
            if cfg.report_to:
                acc.init_trackers("gensample", config={"method": self.method.method_name})
        self._log(f"{self.method.method_name}: steps {self.step}->{cfg.max_steps}, processes {self.world}, "
                  f"batch {cfg.batch_size}x{self.world}x{cfg.gradient_accumulation_steps}, device {acc.device}")
        self._write_log({"event": "start", "rank_count": self.world, "step": self.step})
        start_step, t0 = self.step, time.time()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train {self.method.method_name}",
                   disable=not (cfg.progress and acc.is_local_main_process), dynamic_ncols=True)
        last = {}
        while self.step < cfg.max_steps:
            self.model.train()
            stepped: set[str] = set()
            for group in self.method.groups_for_step(self.step):
                gi = self.group_names.index(group)
                opt = self.optimizers[gi]
                for micro in range(cfg.gradient_accumulation_steps):
                    batch = _to_device(self.sampler.next(), acc.device)
                    sync = micro == cfg.gradient_accumulation_steps - 1
                    with (nullcontext() if sync else acc.no_sync(self.model)):
                        with acc.autocast():
                            losses = self.model(batch, self.step, group)
                        if not torch.isfinite(losses["loss"]):
                            raise FloatingPointError(
                                f"non-finite loss at step {self.step} ({group}); lower --learning-rate or use "
                                "--mixed-precision bf16/no (float16 overflows above 65504; bf16 has float32's "
                                "exponent range).")
                        acc.backward(losses["loss"] / cfg.gradient_accumulation_steps)
                self._test_pause("step")
                if cfg.max_grad_norm:
                    acc.clip_grad_norm_(opt.optimizer.param_groups[0]["params"], cfg.max_grad_norm)
                opt.step()
                if not getattr(opt, "step_was_skipped", False):  # fp16: the GradScaler skips inf/NaN steps
                    stepped.add(group)
                self.lr_schedulers[gi].step()
                opt.zero_grad(set_to_none=True)
                last.update({f"{group}/{k}" if len(self.group_names) > 1 else k: float(v.detach())
                             for k, v in losses.items()})
            unwrapped = acc.unwrap_model(self.model)
            ema_sources = unwrapped.ema_modules()
            for name, e in self.emas.items():
                owners = self.ema_groups[name]
                if not owners or stepped.intersection(owners):
                    e.update(ema_sources[name])
            unwrapped.after_optimizer_step(self.step)
            self.step += 1
            loss_value = last.get("loss", next(iter(last.values())))
            self.history.append((self.step, loss_value))
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                rate = (self.step - start_step) / max(time.time() - t0, 1e-9)
                bar.set_postfix(loss=f"{loss_value:.4g}", it_s=f"{rate:.2f}")
                record = {"step": self.step, **last, "lr": self.lr_schedulers[0].get_last_lr()[0], "steps_per_s": rate}
                if len(self.group_names) > 1:
                    record.update({f"{g}/lr": sch.get_last_lr()[0]
                                   for g, sch in zip(self.group_names[1:], self.lr_schedulers[1:])})
                self._write_log(record)
                if cfg.report_to:
                    acc.log(record, step=self.step)
            if cfg.snapshot_every and (self.step % cfg.snapshot_every == 0 or self.step == cfg.max_steps):
                self.save_snapshot()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
            if cfg.sample_every and self.step % cfg.sample_every == 0 and acc.is_main_process:
                self.save_samples(self.output_dir / "samples" / f"step-{self.step:08d}.png")
            if self.evaluate and self.evaluate_every and self.step % self.evaluate_every == 0 and acc.is_main_process:
                metrics = self.evaluate(self.export_pipeline())
                self._write_log({"step": self.step, "eval": metrics})
                self._log(f"step {self.step} eval: {metrics}")
        bar.close()
        elapsed = time.time() - t0
        if loaded is not None and self.step == start_step and loaded.resolve().parent == self.checkpoint_dir.resolve():
            final_ckpt = loaded  # nothing trained since: the checkpoint of this step is the one just loaded
        else:
            final_ckpt = self.save_checkpoint()
        summary = {"steps": self.step, "trained_steps": self.step - start_step, "seconds": elapsed,
                   "steps_per_second": (self.step - start_step) / max(elapsed, 1e-9), "checkpoint": str(final_ckpt)}
        if acc.is_main_process:
            pipe = self.export_pipeline()
            self._save_pipeline_folder(pipe, seconds=elapsed, start_step=start_step)
            summary["pipeline"] = str(self.output_dir / "pipeline")
            summary["samples"] = str(self.save_samples(self.output_dir / "samples.png"))
            steps, values = zip(*self.history) if self.history else ((), ())
            summary["loss_curve"] = str(plot_curve(steps, values, self.output_dir / "loss.png",
                                                   title=f"{self.method.method_name} training loss"))
            self._write_log({"event": "end", **summary})
            if cfg.report_to:
                acc.end_training()
        acc.wait_for_everyone()
        return summary
