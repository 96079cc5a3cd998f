"""What a finished training run folder says about itself: its run_config.json and the legs in train_log.jsonl."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def run_info(run: str | Path) -> dict[str, Any]:
    """method, data and EMA rate (run_config.json), and the training wall time summed over the legs of
    train_log.jsonl (one "end" record per leg; unreadable lines are skipped) with the step count of the last leg."""
    run = Path(run)
    info: dict[str, Any] = {"method": None, "data": None, "training_seconds": None, "training_steps": None}
    config = run / "run_config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        info["method"] = cfg.get("method")
        info["data"] = (cfg.get("train", {}).get("extra") or {}).get("data")
        info["ema_rate"] = cfg.get("train", {}).get("ema_rate")
    log = run / "train_log.jsonl"
    if log.is_file():
        ends = []
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == "end":
                ends.append(record)
        if ends:
            info["training_seconds"] = sum(float(r.get("seconds", 0.0)) for r in ends)
            info["training_steps"] = ends[-1].get("steps")
    return info
