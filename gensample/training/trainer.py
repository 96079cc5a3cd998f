"""Trainer on accelerate: optimizers per method group, mixed precision, gradient accumulation, evaluation EMA,
atomic checkpoints with a retention limit, exact resume, logging, periodic sample grids, final pipeline export."""
from __future__ import annotations

import json
import logging
import math
import random
import shutil
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
    """Endless shuffled mini-batches of an in-memory tensor; its whole state (generator, permutation, position) is
    checkpointed, so a resumed run sees exactly the batches the uninterrupted run would have seen."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int):
        if len(data) == 0:
            raise ValueError("the dataset is empty.")
        self.data, self.batch_size = data, batch_size
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
        return self.data[torch.cat(idx)]

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


class Trainer:
    """Runs a :class:`TrainingMethod` on a dataset tensor (N, C, H, W) in [-1, 1].

    Under ``accelerate launch`` each process draws its own batches (seed + rank) and gradients are averaged by DDP;
    the effective batch is ``batch_size * num_processes * gradient_accumulation_steps``. The LR schedule is stepped
    once per optimizer step (not once per process).
    """

    def __init__(self, method: TrainingMethod, dataset: torch.Tensor, config: TrainConfig,
                 evaluate: Callable | None = None, evaluate_every: int = 0):
        self.config = config
        check_lr_schedule(config.lr_schedule, config.lr_warmup_steps, config.lr_decay_horizon,
                          config.lr_final_fraction)
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
        self.sampler = BatchSampler(dataset, config.batch_size, seed=config.seed * 1000 + self.rank)
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

    def save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        staging = self.checkpoint_dir / f".tmp-checkpoint-{self.step:08d}"
        if acc.is_main_process:
            if staging.exists():
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
            ema_tensors = {f"{name}.{k}": v.contiguous().clone() for name, e in self.emas.items()
                           for k, v in e.state_dict().items()}
            if ema_tensors:
                save_file(ema_tensors, staging / "ema.safetensors")
            torch.save({"optimizers": [o.state_dict() for o in self.optimizers],
                        "lr_schedulers": [s.state_dict() for s in self.lr_schedulers],
                        "scaler": acc.scaler.state_dict() if acc.scaler is not None else None},
                       staging / "optimizers.pt")
            state = {"step": self.step, "ema_updates": {n: e.num_updates for n, e in self.emas.items()},
                     "history": self.history, **self._run_config()}
            (staging / "trainer_state.json").write_text(json.dumps(state))
            final = ckpt.finalize(staging, self.checkpoint_dir, self.step)
            ckpt.prune(self.checkpoint_dir, self.config.checkpoints_total_limit)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | Path | None = None) -> Path | None:
        """Restore model, EMA, optimizers, LR schedules, step (hence curriculum), sampler and RNG states.

        ``path`` None: the newest valid checkpoint under the output dir (corrupt newer ones are skipped with a
        warning); a path: that checkpoint or run folder, which must verify.
        """
        if path is None:
            found = ckpt.latest_valid_checkpoint(self.checkpoint_dir, warn=self._warn)
            if found is None:
                self._warn(f"no valid checkpoint under {self.checkpoint_dir}; starting from step 0.")
                return None
            path = found
        path = Path(path)
        if (path / "checkpoints").is_dir():
            found = ckpt.latest_valid_checkpoint(path / "checkpoints", warn=self._warn)
            if found is None:
                raise ckpt.CheckpointError(f"{path}/checkpoints holds no valid checkpoint to resume from.")
            path = found
        ckpt.verify(path)
        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("method") != self.method.method_name:
            raise ckpt.CheckpointError(
                f"{path} is a checkpoint of method {state.get('method')!r}, not {self.method.method_name!r}; "
                "resume it with the method that wrote it.")
        mine = self.method.method_config()
        if state.get("method_config") != json.loads(json.dumps(mine)):
            self._warn(f"method settings differ from the checkpoint's: {state.get('method_config')} vs {mine}; "
                       "the checkpoint's curriculum is NOT applied, the current settings are.")
        method = self.accelerator.unwrap_model(self.model)
        method.load_state_dict(load_file(path / "networks.safetensors", device=str(self.accelerator.device)))
        if self.emas:
            tensors = load_file(path / "ema.safetensors")
            for name, e in self.emas.items():
                prefix = name + "."
                e.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                  state["ema_updates"][name])
        opt_state = torch.load(path / "optimizers.pt", map_location=self.accelerator.device, weights_only=True)
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
        rng_file = path / f"rng-rank{self.rank}.json"
        if rng_file.is_file():
            rng = json.loads(rng_file.read_text())
            _set_rng_state(rng["rng"])
            self.sampler.load_state_dict(rng["sampler"])
        else:
            self._warn(f"{path} has no RNG state for rank {self.rank} (different process count); reseeding.")
        self.step = int(state["step"])
        self.history = [tuple(h) for h in state.get("history", [])]
        self._log(f"resumed from {path} at step {self.step}")
        return path

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

    def save_samples(self, path: Path) -> Path:
        pipe = self.export_pipeline()
        pipe.set_progress_bar_config(disable=True)
        rows = []
        for steps in self.config.sample_steps:
            g = torch.Generator().manual_seed(self.config.seed)
            rows.append(pipe(batch_size=self.config.num_sample_images, num_inference_steps=steps, generator=g,
                             output_type="pt").images)
        nrow = math.ceil(math.sqrt(self.config.num_sample_images))
        return save_image_grid(torch.cat(rows), path, nrow=nrow)

    # -- the loop -------------------------------------------------------------------------------------------------
    def train(self, resume: bool | str | Path = False) -> dict:
        acc, cfg = self.accelerator, self.config
        if resume:
            self.load_checkpoint(None if resume is True else resume)
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
                    batch = self.sampler.next().to(acc.device)
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
        final_ckpt = self.save_checkpoint()
        summary = {"steps": self.step, "trained_steps": self.step - start_step, "seconds": elapsed,
                   "steps_per_second": (self.step - start_step) / max(elapsed, 1e-9), "checkpoint": str(final_ckpt)}
        if acc.is_main_process:
            pipe = self.export_pipeline()
            pipe.save_pretrained(self.output_dir / "pipeline")
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
