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
