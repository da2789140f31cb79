"""The wheel installs exactly one top-level name, `sala_train`, and carries every package on disk."""

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# top-level folder on disk -> import name it installs as (setup.cfg package_dir)
ROOTS = {
    "sala_train": "sala_train",
    "conversion": "sala_train.conversion",
    "layer_selection": "sala_train.layer_selection",
    "kernels": "sala_train.kernels",
    "recipes": "sala_train.recipes",
}


def packages_on_disk() -> set[str]:
    found = set()
    for folder, import_name in ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            found.add(".".join([import_name, *relative.parts]))
    return found


def listed_packages() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return {line.strip() for line in parser["options"]["packages"].splitlines() if line.strip()}


def test_setup_cfg_lists_every_package_on_disk():
    on_disk, listed = packages_on_disk(), listed_packages()
    assert on_disk - listed == set(), f"add these packages to setup.cfg [options] packages: {sorted(on_disk - listed)}"
    assert listed - on_disk == set(), f"setup.cfg lists packages that do not exist: {sorted(listed - on_disk)}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True, capture_output=True,
    )
    (path,) = out.glob("sala_train-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_has_only_sala_train_at_top_level(wheel):
    top = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"sala_train"}, f"the wheel must install only `sala_train`, found {sorted(top)}"


def test_wheel_carries_every_package_and_data(wheel):
    names = set(wheel.namelist())
    for package in packages_on_disk():
        assert package.replace(".", "/") + "/__init__.py" in names, f"{package} is missing from the wheel"
    for yaml in (REPO / "recipes").rglob("*.yaml"):
        assert "sala_train/recipes/" + yaml.relative_to(REPO / "recipes").as_posix() in names
    for asset in (REPO / "sala_train" / "assets").rglob("*"):
        if asset.is_file():
            assert "sala_train/" + asset.relative_to(REPO / "sala_train").as_posix() in names


def test_wheel_declares_console_scripts(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    for script in ("sala-make-teacher = sala_train.make_teacher:main", "sala-generate = sala_train.generate:main"):
        assert script in text
