r"""LCSC: linear combination of saved checkpoints, its coefficients found by evolutionary search (Liu et al.,
"Linear Combination of Saved Checkpoints Makes Consistency and Diffusion Models Better", ICLR 2025, arXiv 2404.02241).

A training run keeps its raw weights theta_1..theta_n (``gensample train ... --snapshot-every N``). LCSC deploys

    theta_hat = theta_n + sum_{i<n} a_i (theta_i - theta_n)          (difference form, coefficients a in R^{n-1})
              = sum_i alpha_i theta_i,  alpha_i = a_i (i < n),  alpha_n = 1 - sum_{i<n} a_i   (so sum alpha = 1)

with a found by a gradient-free search whose fitness is a sample-quality metric (FID of a small, fixed-noise sample).
An EMA is the special case alpha_i proportional to beta^(n-i) (:func:`ema_coefficients`).

Choices where the paper leaves them open (its search code is not released; ``imagination-research/LCSC`` @ 34ead5b
holds sampling/evaluation only), following the reference notes' design (section 4.3):

* the difference form is taken around the LAST snapshot (the paper's landscape figure uses theta_{n0} + x (theta_{n1}
  - theta_{n0}) + ...; the last snapshot is the natural origin: a = 0 is "use the final weights");
* every floating-point tensor is combined (parameters and float buffers) in float32 and cast back to its dtype;
  integer/bool buffers are copied from the last snapshot;
* the search is a (mu + lambda) evolutionary strategy: an initial population of EMA-like vectors (debiased EMAs
  alpha_i ~ beta^(n-i) for several beta), the last snapshot (a = 0), the uniform average, and Gaussian perturbations
  of these; each generation draws ``offspring`` children (a random parent among the best ``parents``, uniform
  crossover with a second one w.p. ``crossover_rate``, each coefficient mutated w.p. ``mutation_rate`` by
  N(0, mutation_scale^2), at least one), evaluates them, and keeps the best ``population`` distinct vectors;
* fitness values are cached by the coefficient vector (rounded to 1e-9), so a repeated child costs nothing;
* a fitness that is NaN or infinite skips its candidate: it is recorded in the history and never selected.

:func:`search` is agnostic to the model: checkpoints are flat dicts of tensors and the fitness is any callable on the
combined dict. :class:`FIDFitness` is the fitness for gensample pipelines (FID-digits or Inception FID of a fixed
sample, on one process or split across the processes of ``accelerate launch``).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["FIDFitness", "SearchResult", "alpha_to_difference", "apply_weights", "check_same_architecture",
           "combine", "component_weights", "difference_to_alpha", "ema_coefficients", "search"]

#: version of the JSON state file :func:`search` writes
STATE_FORMAT = "gensample-lcsc-search"
STATE_VERSION = 1
#: debiased-EMA rates (per snapshot) that seed the initial population
DEFAULT_EMA_BETAS = (0.5, 0.8, 0.9, 0.95)
#: coefficient vectors closer than this (max-abs after rounding) are the same candidate
KEY_DECIMALS = 9


# ----------------------------------------------------------------------------------------------------------------
# Coefficients and combination


def difference_to_alpha(a: Sequence[float] | np.ndarray) -> np.ndarray:
    """a (n - 1 difference coefficients around the last snapshot) -> alpha (n weights summing to 1):
    alpha_i = a_i for i < n, alpha_n = 1 - sum a."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    return np.concatenate([a, [1.0 - a.sum()]])


def alpha_to_difference(alpha: Sequence[float] | np.ndarray, atol: float = 1e-9) -> np.ndarray:
    """alpha (n weights summing to 1) -> a = alpha[:-1]; a ValueError if the weights do not sum to 1 (the difference
    form only expresses combinations that do)."""
    alpha = np.asarray(alpha, dtype=np.float64).reshape(-1)
    if abs(alpha.sum() - 1.0) > atol:
        raise ValueError(f"`alpha` must sum to 1 to be written in difference form, sums to {alpha.sum():.6g}; "
                         "normalise it (alpha / alpha.sum()).")
    return alpha[:-1].copy()


def ema_coefficients(n: int, beta: float, debiased: bool = False) -> np.ndarray:
    """The alpha that makes sum_i alpha_i theta_i the EMA of theta_1..theta_n with rate ``beta`` per snapshot.

    ``debiased=False``: the recursion e_1 = theta_1, e_k = beta e_{k-1} + (1 - beta) theta_k, so
    alpha_1 = beta^(n-1) and alpha_i = (1 - beta) beta^(n-i) for i >= 2. ``debiased=True``: the zero-initialised EMA
    divided by (1 - beta^n) (Adam's bias correction), alpha_i = (1 - beta) beta^(n-i) / (1 - beta^n) for all i, i.e.
    exactly alpha_i proportional to beta^(n-i) (the paper's "EMA is a special case"). Both sum to 1.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"`n` must be an integer >= 1, got {n!r}.")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"`beta` must be in [0, 1), got {beta!r}.")
    powers = beta ** np.arange(n - 1, -1, -1, dtype=np.float64)  # beta^(n-i), i = 1..n
    if debiased:
        return powers / powers.sum()
    alpha = (1.0 - beta) * powers
    alpha[0] = beta ** (n - 1)
    return alpha


def check_same_architecture(snapshots: Sequence[Mapping[str, torch.Tensor]],
                            names: Sequence[str] | None = None) -> None:
    """At least two snapshots, all with the same keys, shapes and dtypes; else a ValueError naming the snapshot and
    the first differing key."""
    if len(snapshots) < 2:
        raise ValueError(f"LCSC needs at least 2 snapshots, got {len(snapshots)}; train with `--snapshot-every N` "
                         "so the run keeps several (N well below --max-steps).")
    names = list(names) if names is not None else [f"snapshot {i}" for i in range(len(snapshots))]
    ref, ref_name = snapshots[-1], names[-1]
    for snap, name in zip(snapshots, names):
        missing, extra = sorted(set(ref) - set(snap)), sorted(set(snap) - set(ref))
        if missing or extra:
            key = (missing or extra)[0]
            raise ValueError(f"{name} and {ref_name} hold different architectures: key {key!r} is "
                             f"{'missing from' if missing else 'only in'} {name} ({len(missing)} missing, "
                             f"{len(extra)} extra keys); combine snapshots of one run only.")
        for key, value in snap.items():
            other = ref[key]
            if value.shape != other.shape or value.dtype != other.dtype:
                raise ValueError(f"{name} and {ref_name} hold different architectures: key {key!r} is "
                                 f"{tuple(value.shape)} {value.dtype} vs {tuple(other.shape)} {other.dtype}; combine "
                                 "snapshots of one run only.")


def combine(snapshots: Sequence[Mapping[str, torch.Tensor]], coefficients: Sequence[float] | np.ndarray,
            *, check: bool = True) -> dict[str, torch.Tensor]:
    """sum_i alpha_i theta_i over the snapshots (``coefficients`` = alpha, one per snapshot; for the difference form
    pass :func:`difference_to_alpha` (a)).

    Floating-point tensors are accumulated in float32 (float64 tensors in float64) and cast back to their dtype;
    integer and bool buffers (counters) are copied from the last snapshot. ``check`` runs
    :func:`check_same_architecture` first.
    """
    alpha = np.asarray(coefficients, dtype=np.float64).reshape(-1)
    if check:
        check_same_architecture(snapshots)
    if len(alpha) != len(snapshots):
        raise ValueError(f"`coefficients` must hold one weight per snapshot ({len(snapshots)}), got {len(alpha)}.")
    if not np.isfinite(alpha).all():
        raise ValueError(f"`coefficients` must be finite, got {alpha.tolist()}.")
    out = {}
    for key, last in snapshots[-1].items():
        if not last.is_floating_point():
            out[key] = last.clone()
            continue
        acc_dtype = torch.float64 if last.dtype == torch.float64 else torch.float32
        acc = torch.zeros(last.shape, dtype=acc_dtype, device=last.device)
        for w, snap in zip(alpha.tolist(), snapshots):
            if w != 0.0:
                acc.add_(snap[key].to(acc_dtype), alpha=w)
        out[key] = acc.to(last.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Evolutionary search


@dataclass
class SearchResult:
    """The best coefficients found, in difference form (``coefficients``, n - 1 values around the last snapshot)
    and as weights (``alpha``, n values summing to 1), their fitness, and the record of the search."""

    coefficients: np.ndarray
    alpha: np.ndarray
    fitness: float
    history: list[dict[str, Any]]
    population: list[dict[str, Any]]
    evaluations: int
    skipped: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def best_so_far(self) -> tuple[list[int], list[float]]:
        """(evaluation number, best finite fitness up to it) for the evaluations that called the fitness."""
        xs, ys, best = [], [], math.inf
        for h in self.history:
            if h["status"] == "duplicate":
                continue
            if h["fitness"] is not None:
                best = min(best, h["fitness"])
            if math.isfinite(best):
                xs.append(h["evaluation"])
                ys.append(best)
        return xs, ys


def _key(a: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(float(x), KEY_DECIMALS) + 0.0 for x in a)  # + 0.0: -0.0 and 0.0 are one key


def _atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_state(path: str | Path) -> dict[str, Any]:
    """A search state file written by :func:`search`; a ValueError naming the file if it is not one."""
    path = Path(path)
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable LCSC search state ({e}); delete it to start the search "
                         "afresh.") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an LCSC search state (no format {STATE_FORMAT!r}).")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: search state version {state.get('version')!r}, this gensample reads "
                         f"{STATE_VERSION}; start the search afresh.")
    return state


def _initial_population(n: int, size: int, betas: Sequence[float], scale: float,
                        rng: np.random.Generator) -> list[list[float]]:
    """The last snapshot (a = 0), the uniform average, debiased EMAs, then Gaussian perturbations of these."""
    seeds = [np.zeros(n - 1), alpha_to_difference(np.full(n, 1.0 / n))]
    seeds += [alpha_to_difference(ema_coefficients(n, b, debiased=True)) for b in betas]
    out, keys = [], set()
    for a in seeds:
        if _key(a) not in keys and len(out) < size:
            keys.add(_key(a))
            out.append([float(x) for x in a])
    base = list(out)
    while len(out) < size:
        parent = np.asarray(base[int(rng.integers(len(base)))])
        child = parent + rng.normal(0.0, scale, size=n - 1)
        if _key(child) not in keys:
            keys.add(_key(child))
            out.append([float(x) for x in child])
    return out


def _children(population: list[dict[str, Any]], count: int, parents: int, crossover_rate: float,
              mutation_rate: float, mutation_scale: float, rng: np.random.Generator) -> list[list[float]]:
    top = [np.asarray(p["a"]) for p in population[:parents]]
    out = []
    for _ in range(count):
        first = int(rng.integers(len(top)))
        child = top[first].copy()
        if len(top) > 1 and rng.random() < crossover_rate:
            second = (first + 1 + int(rng.integers(len(top) - 1))) % len(top)  # another parent
            mask = rng.random(child.shape[0]) < 0.5
            child[mask] = top[second][mask]
        mutate = rng.random(child.shape[0]) < mutation_rate
        if not mutate.any():
            mutate[int(rng.integers(child.shape[0]))] = True
        child[mutate] += rng.normal(0.0, mutation_scale, size=int(mutate.sum()))
        out.append([float(x) for x in child])
    return out


def _select(population: list[dict[str, Any]], candidates: list[list[float]], cache: dict, size: int,
            order: dict) -> list[dict[str, Any]]:
    """(mu + lambda): the best ``size`` distinct finite candidates; ties by first evaluation (deterministic)."""
    pool = {_key(p["a"]): p["a"] for p in population}
    for a in candidates:
        pool.setdefault(_key(a), a)
    ranked = sorted((k for k in pool if cache[k] is not None), key=lambda k: (cache[k], order[k]))
    return [{"a": pool[k], "fitness": cache[k]} for k in ranked[:size]]


def search(checkpoints: Sequence[Mapping[str, torch.Tensor]], fitness: Callable[[dict[str, torch.Tensor]], float],
           population: int = 16, iterations: int = 10, *, offspring: int | None = None, parents: int | None = None,
           mutation_rate: float = 0.3, mutation_scale: float = 0.1, crossover_rate: float = 0.5,
           ema_betas: Sequence[float] = DEFAULT_EMA_BETAS, seed: int = 0, state_path: str | Path | None = None,
           names: Sequence[str] | None = None, context: Mapping[str, Any] | None = None, progress: bool = True,
           write_state: bool = True) -> SearchResult:
    """Search the difference coefficients a of theta_n + sum_{i<n} a_i (theta_i - theta_n) minimising ``fitness``.

    ``checkpoints``: n >= 2 flat dicts of tensors with one architecture (e.g. ``{"unet.conv_in.weight": ...}``);
    ``fitness(weights) -> float`` gets the combined dict (lower is better; NaN/inf skips the candidate). The search
    evaluates the initial ``population`` and then ``iterations`` generations of ``offspring`` (default
    population // 2) children each: at most population + iterations * offspring fitness calls (see the module
    docstring for the operators).

    ``state_path``: a JSON file holding everything the search needs to continue (population, fitness cache, history,
    RNG state, generation, pending children), rewritten atomically after every fitness call; if it exists the search
    resumes from it and, with the same arguments, ends exactly where an uninterrupted search ends (a larger
    ``iterations`` extends a finished search). Settings, ``names`` and ``context`` (e.g. the fitness' own settings)
    must match the file's, else a ValueError lists the differences. ``write_state=False`` reads but never writes it
    (the non-main processes of a multi-process fitness).
    """
    n = len(checkpoints)
    names = [str(x) for x in names] if names is not None else [f"snapshot {i}" for i in range(n)]
    check_same_architecture(checkpoints, names)
    if len(names) != n:
        raise ValueError(f"`names` must name each of the {n} checkpoints, got {len(names)}.")
    for value, what in ((population, "population"), (iterations, "iterations")):
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if what == "population" else 0):
            raise ValueError(f"`{what}` must be an integer >= {1 if what == 'population' else 0}, got {value!r}.")
    offspring = max(1, population // 2) if offspring is None else offspring
    parents = max(1, min(population, max(2, population // 2))) if parents is None else parents
    if offspring < 1 or parents < 1:
        raise ValueError(f"`offspring` and `parents` must be >= 1, got {offspring} and {parents}.")
    for value, what in ((mutation_rate, "mutation_rate"), (crossover_rate, "crossover_rate")):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`{what}` must be a probability in [0, 1], got {value}.")
    if not mutation_scale > 0:
        raise ValueError(f"`mutation_scale` must be > 0, got {mutation_scale}.")
    settings = {"num_checkpoints": n, "names": names, "population": population, "offspring": offspring,
                "parents": parents, "mutation_rate": mutation_rate, "mutation_scale": mutation_scale,
                "crossover_rate": crossover_rate, "ema_betas": [float(b) for b in ema_betas], "seed": seed,
                "context": json.loads(json.dumps(dict(context or {}), default=str))}

    state_path = Path(state_path) if state_path is not None else None
    if state_path is not None and state_path.exists():
        state = load_state(state_path)
        diffs = [f"{k}: {state['settings'].get(k)!r} (state) vs {v!r} (now)" for k, v in settings.items()
                 if state["settings"].get(k) != v]
        if diffs:
            raise ValueError(f"{state_path} belongs to another search; differences: " + "; ".join(diffs)
                             + ". Resume with the same settings, or use another state file.")
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
    else:
        rng = np.random.default_rng(seed)
        first = _initial_population(n, population, ema_betas, mutation_scale, rng)
        state = {"format": STATE_FORMAT, "version": STATE_VERSION, "settings": settings, "generation": 0,
                 "pending": first, "done": 0, "selected": False, "population": [], "cache": [], "history": [],
                 "seconds": 0.0, "rng": rng.bit_generator.state}

    cache = {_key(a): f for a, f in state["cache"]}
    order = {_key(a): i for i, (a, _) in enumerate(state["cache"])}
    started = time.perf_counter()
    seconds0 = float(state["seconds"])

    def save() -> None:
        state["seconds"] = seconds0 + time.perf_counter() - started
        if state_path is not None and write_state:
            _atomic_write_json(state_path, state)

    total = population + iterations * offspring
    bar = tqdm(total=total, initial=min(len(state["history"]), total), desc="LCSC search", disable=not progress,
               dynamic_ncols=True)
    try:
        while True:
            while state["done"] < len(state["pending"]):  # candidates done before an interruption are skipped
                a = state["pending"][state["done"]]
                k = _key(a)
                record = {"evaluation": len(state["history"]), "generation": state["generation"], "a": a}
                if k in cache:
                    record.update(fitness=cache[k], status="duplicate", seconds=0.0)
                else:
                    t0 = time.perf_counter()
                    value = float(fitness(combine(checkpoints, difference_to_alpha(a), check=False)))
                    finite = math.isfinite(value)
                    cache[k] = value if finite else None
                    order[k] = len(state["cache"])
                    state["cache"].append([a, cache[k]])
                    record.update(fitness=cache[k], status="ok" if finite else f"skipped (fitness {value})",
                                  seconds=time.perf_counter() - t0)
                state["history"].append(record)
                state["done"] += 1
                bar.update(1)
                best = min((v for v in cache.values() if v is not None), default=math.nan)
                bar.set_postfix(best=f"{best:.4g}", generation=state["generation"])
                save()
            if not state["selected"]:
                state["population"] = _select(state["population"], state["pending"], cache, population, order)
                if not state["population"]:
                    raise ValueError("every candidate of the initial population gave a non-finite fitness (NaN or "
                                     "inf); check the fitness function and the snapshots (a diverged run?).")
                state["selected"] = True
                save()
            if state["generation"] >= iterations:
                break
            state["pending"] = _children(state["population"], offspring, min(parents, len(state["population"])),
                                         crossover_rate, mutation_rate, mutation_scale, rng)
            state["generation"] += 1
            state["done"], state["selected"] = 0, False
            state["rng"] = rng.bit_generator.state
            save()
    finally:
        bar.close()
    best = state["population"][0]
    return SearchResult(
        coefficients=np.asarray(best["a"]), alpha=difference_to_alpha(best["a"]), fitness=best["fitness"],
        history=state["history"], population=state["population"],
        evaluations=sum(h["status"] != "duplicate" for h in state["history"]),
        skipped=sum(h["status"].startswith("skipped") for h in state["history"]), seconds=float(state["seconds"]),
        settings=settings)


# ----------------------------------------------------------------------------------------------------------------
# Pipelines: weights in and out, FID fitness


def component_weights(pipeline, components: Sequence[str] = ("unet",)) -> dict[str, torch.Tensor]:
    """The pipeline's current weights as one flat dict ``{"{component}.{key}": tensor}`` (CPU copies), the layout of
    a training snapshot."""
    out = {}
    for name in components:
        module = getattr(pipeline, name, None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"the pipeline has no network component {name!r} (it has "
                             f"{sorted(k for k, v in pipeline.components.items() if isinstance(v, nn.Module))}).")
        out.update({f"{name}.{k}": v.detach().to("cpu").clone() for k, v in module.state_dict().items()})
    return out


def apply_weights(pipeline, weights: Mapping[str, torch.Tensor]) -> None:
    """Load a flat ``{"{component}.{key}": tensor}`` dict into the pipeline's components (strict: every key of each
    named component, nothing else; a ValueError names the mismatch)."""
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        name, _, sub = key.partition(".")
        by_component.setdefault(name, {})[sub] = value
    for name, state in by_component.items():
        module = getattr(pipeline, name, None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"the weights name a component {name!r} that the pipeline lacks; the snapshots belong "
                             "to another kind of run than this pipeline.")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"the weights do not fit the pipeline's {name!r}: {str(e).splitlines()[0]}; the "
                             "snapshots belong to another architecture than the run's pipeline.") from None


class FIDFitness:
    """Fitness of combined weights: FID of ``num_images`` samples of ``pipeline`` (image i from seed ``seed + i`` and
    its own class label, :func:`gensample.metrics.fid.per_image_inputs`, the same for every candidate), averaged over
    the step counts ``steps``.

    The weights are loaded into ``pipeline`` (:func:`apply_weights`); FID is computed on features against the
    reference statistics (``"digits"`` = FID-digits on the train split, a stats ``.npz`` for Inception FID), which
    are computed or read once. Samples that are not finite (a diverged combination) give FID = NaN, i.e. a skipped
    candidate. ``distributed=True`` (every process of ``accelerate launch`` calls it): each process generates its
    share of the indices (:func:`~gensample.metrics.fid.split_indices`), features are gathered in index order, and
    every process returns the same value, equal to a single process' value.
    """

    def __init__(self, pipeline, reference: Any = "digits", feature: str = "digits", steps: Sequence[int] = (1, 2),
                 num_images: int = 250, seed: int = 0, batch_size: int = 250,
                 inception_weights: str | Path | None = None, distributed: bool = False,
                 pipeline_kwargs: Mapping[str, Any] | None = None):
        import dataclasses

        from .metrics.fid import FIDEvaluator

        if not steps or any(int(s) < 1 for s in steps):
            raise ValueError(f"`steps` must be step counts >= 1, got {list(steps)}.")
        if num_images < 2:
            raise ValueError(f"`num_images` must be >= 2 for FID, got {num_images}.")
        self.pipeline, self.steps = pipeline, tuple(int(s) for s in steps)
        self.num_images, self.seed = num_images, seed
        self.batch_size, self.distributed = batch_size, distributed
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        device = getattr(pipeline, "device", None)
        probe = FIDEvaluator(reference, feature, num_images, self.steps, batch_size, seed, inception_weights,
                             device=device, distributed=distributed)
        # the search needs FID only: drop the reference's raw features so no KID is computed per candidate
        self.reference_stats = dataclasses.replace(probe.reference_stats, features=None)
        self.evaluator = FIDEvaluator(self.reference_stats, probe.extractor, num_images, self.steps, batch_size, seed,
                                      device=device, distributed=distributed)
        pipeline.set_progress_bar_config(disable=True)
        for module in pipeline.components.values():
            if isinstance(module, nn.Module):
                module.eval()

    def features(self, num_inference_steps: int, seed: int | None = None,
                 num_images: int | None = None) -> torch.Tensor | None:
        """Gathered features of the current weights' samples, or None if a sample is not finite (on any process)."""
        from .metrics.fid import extract_features, gather_features, per_image_inputs, split_indices

        seed = self.seed if seed is None else seed
        n = self.num_images if num_images is None else num_images
        idx = split_indices(n) if self.distributed else list(range(n))
        extractor = self.evaluator.extractor
        feats = []
        for start in range(0, len(idx), self.batch_size):
            batch = idx[start:start + self.batch_size]
            kwargs = {**per_image_inputs(self.pipeline, batch, seed), **self.pipeline_kwargs}
            with torch.no_grad():
                images = self.pipeline(batch_size=len(batch), num_inference_steps=num_inference_steps,
                                       output_type="pt", **kwargs).images
            if torch.isfinite(images).all():
                feats.append(extract_features(images.clamp(0, 1), extractor, self.batch_size, progress=False))
            else:  # NaN features mark the failure for every process after the gather
                feats.append(torch.full((len(batch), extractor.num_features), math.nan, dtype=torch.float64))
        local = torch.cat(feats) if feats else torch.zeros(0, extractor.num_features, dtype=torch.float64)
        gathered = gather_features(local, idx) if self.distributed else local
        return gathered if torch.isfinite(gathered).all() else None

    def fids(self, weights: Mapping[str, torch.Tensor] | None = None, steps: Sequence[int] | None = None,
             seed: int | None = None, num_images: int | None = None) -> dict[int, float]:
        """{step count: FID} of ``weights`` (None: the pipeline's current weights); NaN for non-finite samples."""
        if weights is not None:
            apply_weights(self.pipeline, weights)
        out = {}
        for s in steps or self.steps:
            feats = self.features(s, seed, num_images)
            out[int(s)] = math.nan if feats is None else self.evaluator.evaluate_features(feats, s).fid
        return out

    def __call__(self, weights: Mapping[str, torch.Tensor]) -> float:
        """Mean FID over ``steps`` (NaN when any sample is not finite)."""
        return float(np.mean(list(self.fids(weights).values())))
