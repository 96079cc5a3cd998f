"""`gensample demo` end to end on a tiny pipeline (the shipped one is exercised the same way by CI's demo step)."""
import json


from gensample.cli import main


def test_demo_runs_on_a_saved_pipeline(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "ict", "--model", "tiny", "--max-steps", "2", "--batch-size", "16", "--output", str(run),
                 "--num-sample-images", "4", "--no-progress"]) == 0
    out = tmp_path / "demo"
    assert main(["demo", "--pipeline", str(run / "pipeline"), "--output", str(out), "--train-steps", "2",
                 "--fid-num-images", "64"]) == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    for key in ("shipped_1step", "shipped_2step"):
        assert (out / f"shipped-{key[-5]}step.png").is_file()
    assert summary["finetune"]["steps"] == 2 and (out / "finetune/pipeline/model_index.json").is_file()
    fids = summary["fid_digits_shipped"]
    floor = summary["fid_digits_reference_points"]["floor (heldout vs train)"]
    # a 2-step-trained tiny model is far from the data: its FID must sit well above the real-data floor
    assert all(v > 2 * floor for v in fids.values()) and floor > 0


def test_lct_demo_runs_the_latent_path_on_the_shipped_model(tmp_path, capsys):
    from gensample.cli import main

    assert main(["demo", "--method", "lct", "--output", str(tmp_path), "--fid-num-images", "200"]) == 0
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["method"] == "lct" and (tmp_path / "slct-2step.png").is_file()
    # the VAE floor is far below what a broken decode or resize would give (hundreds)
    assert summary["fid_digits_vae_reconstruction"] < 20
    assert "digits@32" in capsys.readouterr().out
