"""Zero-config trainer discovery: the `.pth` start-up line, its rules, its cost, and a real wheel / editable
install into a fresh venv that nnU-Net then searches without any export."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from meddinov3_nnunet.autoregister import MARKER, PTH_NAME, discovery_source, pth_line

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_line(line: str, environ: dict, monkeypatch, path: list[str] | None = None) -> dict:
    monkeypatch.setattr(os, "environ", dict(environ))
    if path is not None:
        monkeypatch.setattr(sys, "path", path)
    exec(line, {})
    return os.environ


def test_line_appends_the_folder_after_the_users_entries(tmp_path, monkeypatch):
    folder = str(tmp_path)
    env = run_line(pth_line(folder), {"nnUNet_extTrainer": "/mine/a" + os.pathsep + "/mine/b"}, monkeypatch)
    assert env["nnUNet_extTrainer"] == os.pathsep.join(["/mine/a", "/mine/b", folder])
    assert env[MARKER] == folder
    again = run_line(pth_line(folder), env, monkeypatch)  # a child process inherits the variable: no duplicate
    assert again["nnUNet_extTrainer"] == env["nnUNet_extTrainer"]


def test_line_honours_the_opt_out_and_a_missing_folder(tmp_path, monkeypatch):
    assert "nnUNet_extTrainer" not in run_line(pth_line(str(tmp_path)), {"MEDDINOV3_NO_AUTOREGISTER": "1"},
                                               monkeypatch)
    assert run_line(pth_line(str(tmp_path / "gone")), {}, monkeypatch) == {}
    assert run_line(pth_line(str(tmp_path)), {"MEDDINOV3_NO_AUTOREGISTER": "0"}, monkeypatch)[MARKER] == str(tmp_path)


def test_wheel_line_finds_the_package_folder_on_sys_path(tmp_path, monkeypatch):
    ext = tmp_path / "site" / "meddinov3_nnunet" / "nnunet_ext"
    ext.mkdir(parents=True)
    env = run_line(pth_line(None), {}, monkeypatch, path=[str(tmp_path / "stdlib"), str(tmp_path / "site")])
    assert env["nnUNet_extTrainer"] == str(ext)
    assert run_line(pth_line(None), {}, monkeypatch, path=[str(tmp_path / "stdlib")]) == {}


def test_line_imports_nothing_heavy_and_costs_well_under_5_ms(tmp_path):
    probe = ("import sys, time; line = open(sys.argv[1]).read(); start = time.perf_counter()\n"
             "for _ in range(200): exec(line, {})\n"
             "print((time.perf_counter() - start) / 200 * 1e3, ' '.join(sorted(sys.modules)))")
    pth = tmp_path / PTH_NAME
    pth.write_text(pth_line(str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", MARKER)}
    result = subprocess.run([sys.executable, "-S", "-c", probe, str(pth)], capture_output=True, text=True, env=env,
                            check=True)
    milliseconds, modules = result.stdout.split(" ", 1)
    assert float(milliseconds) < 5.0  # measured ~0.3 ms per start; importing torch would cost ~1000 ms
    assert "torch" not in modules.split() and "meddinov3_nnunet" not in modules.split()


def test_discovery_source_tells_auto_from_user(tmp_path):
    folder = str(tmp_path)
    assert discovery_source(folder, {"nnUNet_extTrainer": folder, MARKER: folder}) == "auto"
    assert discovery_source(folder, {"nnUNet_extTrainer": "/x" + os.pathsep + folder}) == "user"
    assert discovery_source(folder, {"MEDDINOV3_NO_AUTOREGISTER": "1"}) == "off"
    assert discovery_source(folder, {"nnUNet_extTrainer": "/x"}) == "missing"


FIND = ("import contextlib, io, os, sys\n"
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    trainer = find('MedDINOv3Trainer_smoke')\n"
        "print(os.environ['nnUNet_extTrainer'])\n"
        "print(sys.modules[trainer.__module__].__file__)\n")


def _site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_installed_package_is_found_by_nnunet_without_export_and_uninstall_removes_it(tmp_path, kind):
    source = tmp_path / "src"  # build from a copy: the shared working tree keeps no build/ or egg-info from tests
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    for name in ("meddinov3_nnunet", "trainers", "plans"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    hook = "build_wheel" if kind == "wheel" else "build_editable"
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.{hook}({str(dist)!r})"],
                   cwd=source, check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "-q", *map(str, dist.glob("*.whl"))], check=True)
    site = _site_packages(venv)
    assert (site / PTH_NAME).is_file()

    # torch and nnunetv2 come from this interpreter's site-packages, appended after the fresh one (no download)
    (site / "zz_test_parent.pth").write_text(str(Path(sysconfig.get_path("purelib"))) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", MARKER, "PYTHONPATH")}
    found = subprocess.run([str(python), "-W", "ignore", "-c", FIND], env=env, capture_output=True, text=True,
                           cwd=tmp_path)  # not the repository, whose meddinov3_nnunet/ would shadow the install
    assert found.returncode == 0, found.stderr[-2000:]
    ext_trainer, module_file = found.stdout.split()
    installed_root = site if kind == "wheel" else source
    assert ext_trainer == str(installed_root / "meddinov3_nnunet" / "nnunet_ext")
    assert Path(module_file).is_relative_to(installed_root)
    user_first = subprocess.run([str(python), "-c", "import os; print(os.environ['nnUNet_extTrainer'])"],
                                env={**env, "nnUNet_extTrainer": "/my/trainers"}, capture_output=True, text=True)
    assert user_first.stdout.split() == [os.pathsep.join(["/my/trainers", ext_trainer])]
    off = subprocess.run([str(python), "-c", "import os; print(os.environ.get('nnUNet_extTrainer'))"],
                         env={**env, "MEDDINOV3_NO_AUTOREGISTER": "1"}, capture_output=True, text=True)
    assert off.stdout.split() == ["None"]

    (site / "zz_test_parent.pth").unlink()  # so that pip sees only the fresh venv's packages
    subprocess.run(pip + ["uninstall", "-y", "-q", "meddinov3-nnunet"], check=True)
    left = [p.name for p in site.iterdir()] if site.exists() else []
    assert not [name for name in left if "meddinov3" in name], left
    gone = subprocess.run([str(python), "-c", "import os; print(os.environ.get('nnUNet_extTrainer'))"], env=env,
                          capture_output=True, text=True)
    assert gone.stdout.split() == ["None"]

