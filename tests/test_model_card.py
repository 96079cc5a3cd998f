"""Model cards of saved pipeline folders (gensample/training/model_card.py), the version recorded in saved folders and
checkpoints, and ``gensample --version``."""
import json

import pytest
import torch
from huggingface_hub import ModelCard

import gensample
from gensample.cli import main
from gensample.methods import ImprovedConsistencyTraining
from gensample.models import build_unet
from gensample.pipelines import ConsistencyPipeline
from gensample.schedulers import ConsistencyScheduler
from gensample.training import checkpoint as ckpt
from gensample.training.model_card import VERSION_KEY, model_card, process_command, save_model_card
from gensample.training.trainer import TrainConfig, Trainer


def tiny_pipeline(**scheduler_kwargs):
    torch.manual_seed(0)
    return ConsistencyPipeline(unet=build_unet("tiny", sample_size=8),
                               scheduler=ConsistencyScheduler(**scheduler_kwargs))


def test_card_has_the_diffusers_layout_and_the_diffusers_timesteps(tmp_path):
    pipe = tiny_pipeline(num_train_timesteps=1281, sampling_sigmas=[80.0, 1.2])
    text = model_card(pipe, load_path='"folder"', method="ict", sampling_steps=(1, 2, 4))
    card = ModelCard(text)  # the Hub's parser reads the front matter
    assert card.data.library_name == "diffusers" and card.data.license == "apache-2.0"
    assert "consistency-models" in card.data.tags and card.data.to_dict()["gensample_version"] == gensample.__version__
    for section in ("## Intended uses & limitations", "#### How to use", "#### Sampling schedule",
                    "## Training details", "## Evaluation"):
        assert section in text
    # 1 and 4 steps are grid schedules; the tuned 2-step level 1.2 is off the grid: the scheduler's message is quoted
    assert "| 1 | sigmas [80, 0.002] | `timesteps=[0]` |" in text
    assert "`timesteps=[960, 640, 320, 0]`" in text
    assert "none: see note 1" in text and "nearest grid schedule is timesteps=[740, 0]" in text
    assert 'gensample.load_pipeline("folder")' in text and "ConsistencyModelPipeline" in text
    assert "No FID was measured" in text


def test_save_model_card_keeps_the_folder_loadable(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    save_model_card(tmp_path, pipe, method="ict", command="gensample train ict --output x")
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index[VERSION_KEY] == gensample.__version__ and index["_class_name"] == "ConsistencyPipeline"
    assert "- Command: `gensample train ict --output x`" in (tmp_path / "README.md").read_text()
    loaded = gensample.load_pipeline(tmp_path)
    assert isinstance(loaded, ConsistencyPipeline) and VERSION_KEY not in dict(loaded.config)


def test_training_writes_a_card_with_command_budget_and_fid(tmp_path, digits, monkeypatch):
    monkeypatch.setattr("sys.argv", ["/venv/bin/gensample", "train", "ict", "--max-steps", "4", "--output", "run"])
    torch.manual_seed(0)
    method = ImprovedConsistencyTraining(build_unet("tiny", sample_size=8), total_steps=4)
    config = TrainConfig(output_dir=str(tmp_path), max_steps=4, batch_size=8, num_sample_images=4, progress=False,
                         checkpoint_every=2, extra={"data": "digits"})
    calls = []

    def fake_fid(pipe):  # the --fid-every hook's return shape
        calls.append(pipe)
        return {"fid_1step": 50.0 - len(calls), "kid_1step": 0.1, "fid_2step": 40.0 - len(calls), "kid_2step": 0.1}

    Trainer(method, digits[:64], config, evaluate=fake_fid, evaluate_every=2).train()
    text = (tmp_path / "pipeline" / "README.md").read_text()
    assert "- Command: `gensample train ict --max-steps 4 --output run`" in text
    assert "- Budget: 4 optimizer steps; batch 8 per process x 1 process x 1 accumulation = 8 samples per step" in text
    assert "wall time" in text and "- Data: `digits`" in text
    assert "| 2 | 49.00 | 39.00 |" in text and "| 4 | 48.00 | 38.00 |" in text
    assert "Recommended: **2 steps** (the lowest FID of the last evaluation, 38.00)" in text
    index = json.loads((tmp_path / "pipeline" / "model_index.json").read_text())
    assert index[VERSION_KEY] == gensample.__version__
    assert isinstance(gensample.load_pipeline(tmp_path / "pipeline"), ConsistencyPipeline)
    newest = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1][1]
    assert ckpt.verify(newest)["gensample_version"] == gensample.__version__


def test_checkpoints_without_a_version_still_verify(tmp_path):
    staging = ckpt.new_staging_dir(tmp_path / "checkpoints", 1)
    (staging / "a.txt").write_text("x")
    final = ckpt.finalize(staging, tmp_path / "checkpoints", 1)
    manifest = json.loads((final / ckpt.MANIFEST).read_text())
    del manifest["gensample_version"]  # as written before the version was recorded
    (final / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.verify(final)["step"] == 1


@pytest.mark.parametrize("argv, expected", [
    (["/usr/bin/gensample", "demo", "--output", "a b"], "gensample demo --output 'a b'"),
    (["/x/gensample/cli/__main__.py", "train", "ict"], "gensample train ict"),
    (["train.py", "--lr", "1e-3"], "python train.py --lr 1e-3"),
])
def test_process_command(argv, expected):
    assert process_command(argv) == expected


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"gensample {gensample.__version__}"


@pytest.mark.parametrize("name", ["ict-digits", "slct-digits", "video-digits"])
def test_shipped_folders_have_cards_that_match_their_schedulers(name):
    from gensample.assets import asset_path

    folder = asset_path("pipelines", name)
    text = (folder / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.library_name == "diffusers" and "gensample" in card.data.tags
    assert "- Command: `gensample train " in text and "## Evaluation" in text
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if scheduler_config["_class_name"] == "ConsistencyScheduler":  # the card quotes what the scheduler says now
        scheduler = ConsistencyScheduler.from_config(scheduler_config)
        for n in (1, 2):
            try:
                assert f"| {n} | sigmas " in text and f"`timesteps={scheduler.diffusers_timesteps(n)}`" in text
            except ValueError as e:
                assert str(e) in text


def test_ship_ict_digits_writes_the_tuned_schedule_and_the_seed_spread_card(tmp_path):
    """scripts/ship_ict_digits.py: the tuned spec of the fid_seeds JSON becomes the scheduler's sampling_sigmas (the
    2-step pipeline then samples at it), the card quotes the command the run's card recorded and the reported
    figures, and a run of another method is refused."""
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("ship_ict_digits", repo / "scripts" / "ship_ict_digits.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)

    run = tmp_path / "run"
    assert main(["train", "ict", "--data", "digits", "--model", "tiny", "--max-steps", "2", "--batch-size", "8",
                 "--checkpoint-every", "2", "--num-sample-images", "4", "--no-progress", "--threads", "1",
                 "--output", str(run)]) == 0
    fid = {"num_images": 50, "seed_ranges": 3, "tune_seed": 100000, "tuning": {"80,0.7": 9.5, "80,1.2": 11.0},
           "report": {"1": {"values": [3.0, 4.0, 5.0], "mean": 4.0, "std": 1.0},
                      "80,0.7": {"values": [1.5, 2.5, 3.5], "mean": 2.5, "std": 1.0}}, "tuned": "80,0.7"}
    (tmp_path / "fid.json").write_text(json.dumps(fid))
    target = tmp_path / "shipped"
    ship.main([str(run), "--fid-json", str(tmp_path / "fid.json"), "--run-name", "T", "--demo-fid", "1=7.25",
               "--target", str(target)])

    assert json.loads((target / "scheduler" / "scheduler_config.json").read_text())["sampling_sigmas"] == [80.0, 0.7]
    pipe = ConsistencyPipeline.from_pretrained(target)
    pipe.scheduler.set_timesteps(2)
    assert pipe.scheduler.sigmas[:2].tolist() == pytest.approx([80.0, 0.7])
    card = (target / "README.md").read_text()
    run_command = next(ln for ln in (run / "pipeline" / "README.md").read_text().splitlines()
                       if ln.startswith("- Command: `")).split("`")[1]
    assert f"- Command: `{run_command}` (recorded in training_run_config.json" in card
    assert "| 2 | sigmas [80, 0.7, 0.002] |" in card
    assert "**2.50 +- 1.00** | 1.50 / 2.50 / 3.50 |" in card and "1 step 7.25" in card
    assert json.loads((target / "training_run_config.json").read_text())["command"] == run_command

    other = json.loads((run / "run_config.json").read_text())
    (run / "run_config.json").write_text(json.dumps({**other, "method": "edm"}))
    with pytest.raises(SystemExit, match="ict-digits ships an iCT model"):
        ship.main([str(run), "--fid-json", str(tmp_path / "fid.json"), "--run-name", "T", "--target", str(target)])
