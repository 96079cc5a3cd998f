"""The sdist and the wheel built from it carry everything gensample needs at run time (assets/digits.npz,
assets/digits_classifier.*, assets/pipelines/**, installed as gensample/_assets/), and not assets/readme/; the
installed layout is where gensample.assets looks. CI's wheel step (.ci/run) goes further: it builds the wheel with pip,
installs it into a fresh virtual environment and runs `gensample demo` and `gensample train ict` outside the checkout.
"""
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import gensample

ROOT = Path(__file__).resolve().parents[1]
# what the build reads (pyproject's packages, package-dir, package-data and MANIFEST.in)
BUILD_INPUTS = ("pyproject.toml", "README.md", "MANIFEST.in", "requirements-cpu.txt", "gensample", "pipelines",
                "assets")


def shipped_assets() -> list[str]:
    """The run-time asset files of the checkout, relative to assets/."""
    files = [p.relative_to(ROOT / "assets").as_posix() for p in (ROOT / "assets").rglob("*") if p.is_file()]
    return sorted(f for f in files
                  if not f.startswith("readme/") and "__pycache__" not in f and not f.endswith(".pyc"))


def backend(cwd: Path, hook: str, out: Path) -> Path:
    """Run a PEP 517 hook of setuptools' backend in ``cwd`` (no pip, no network); returns the built file."""
    code = f"import sys; from setuptools import build_meta as b; print(b.{hook}(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(out)], check=False, cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("setuptools", minversion="77")  # pyproject's build requirement (SPDX license string)
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:  # a copy: building writes build/ and *.egg-info next to the sources
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__", "*.pyc")}
                                        if (ROOT / name).is_dir() else {}))
    sdist = backend(src, "build_sdist", tmp / "sdist")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (tmp / "unpacked").iterdir()
    wheel = backend(unpacked, "build_wheel", tmp / "wheel")  # from the sdist: so the sdist must be complete
    return sdist, wheel, tmp


def test_sdist_carries_the_assets_but_not_the_readme_figures(built):
    sdist, _, _ = built
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = [f for f in shipped_assets() if f"assets/{f}" not in names]
    assert not missing, f"the sdist lacks {missing}"
    assert not [n for n in names if n.startswith("assets/readme")]
    assert {"pyproject.toml", "README.md", "pipelines/pipeline_consistency.py", "gensample/assets.py"} <= names


def test_wheel_carries_the_assets_as_package_data(built):
    _, wheel, _ = built
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    missing = [f for f in shipped_assets() if f"gensample/_assets/{f}" not in names]
    assert not missing, f"the wheel lacks {missing}"
    for required in ("digits.npz", "digits_classifier.safetensors", "digits_classifier.json",
                     "pipelines/ict-digits/unet/diffusion_pytorch_model.safetensors",
                     "pipelines/ict-digits/README.md"):
        assert f"gensample/_assets/{required}" in names
    assert not [n for n in names if "readme/" in n or "__pycache__" in n or n.endswith(".pyc")]
    assert "gensample/pipelines/pipeline_consistency.py" in names and "gensample/cli/__main__.py" in names
    # the one source of the version: gensample.__version__ -> the wheel's metadata
    assert f"\nVersion: {gensample.__version__}\n" in metadata
    assert "gensample = gensample.cli:main" in entry_points
    assert wheel.name == f"gensample-{gensample.__version__}-py3-none-any.whl"
    assert wheel.stat().st_size < 20e6


def test_installed_layout_is_where_gensample_assets_looks(built):
    """The unpacked wheel alone on the path (no site-packages, so no editable install): asset_path finds the
    package data, and --version reads the version without torch."""
    _, wheel, tmp = built
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    code = ("import gensample, gensample.assets as a; print(gensample.__file__); "
            "print(a.asset_path('pipelines', 'ict-digits')); print(a.asset_path('digits.npz'))")
    done = subprocess.run([sys.executable, "-S", "-c", code], check=False, cwd=tmp, env={"PYTHONPATH": str(site)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    init, pipeline, digits = done.stdout.split()
    assert Path(init).parent == site / "gensample"
    assert Path(pipeline) == site / "gensample" / "_assets" / "pipelines" / "ict-digits"
    assert Path(digits) == site / "gensample" / "_assets" / "digits.npz"
