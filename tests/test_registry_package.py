"""The pack as the Comfy Registry receives it: `comfy node validate` (comfy-cli, which scripts/setup_host.sh installs)
passes, and the zip of `comfy node pack` holds the nodes, workflows, weights, help pages and locales and nothing of
bench/ or tests/. Both run on a git copy of the working tree (tracked files and new ones git does not ignore), since
pack takes git's file list. The metadata agree with each other: one repository address, the README's install folder
and the template category label both the registry name."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import tomllib
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# What the published zip leaves out (.comfyignore says why).
UNPUBLISHED = ("bench/", "tests/", ".ci/", "out/", "docs/")


def comfy_cli() -> str:
    """The `comfy` command of the environment that holds comfy-cli (the base venv, also for a host venv layered over
    it), else on PATH."""
    import importlib.util

    spec = importlib.util.find_spec("comfy_cli")
    # <venv>/lib/pythonX.Y/site-packages/comfy_cli/__init__.py -> <venv>/bin/comfy
    beside = pathlib.Path(spec.origin).parents[4] / "bin" / "comfy" if spec and spec.origin else None
    found = str(beside) if beside and beside.is_file() else shutil.which("comfy")
    if not found:
        pytest.fail("comfy-cli is not installed: scripts/setup_host.sh installs it with the test tools", pytrace=False)
    return found


@pytest.fixture(scope="module")
def working_tree_copy(tmp_path_factory):
    """A git repository holding the working tree's files (no history), and a home folder for comfy-cli's config."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")
    files = sorted(name for name in listed if name and (REPO / name).is_file())
    copy = tmp_path_factory.mktemp("pack") / "diffusion-guidance"
    for name in files:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, copy / name)
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
    return copy, files, tmp_path_factory.mktemp("home")


def run_comfy(copy, home, *args):
    result = subprocess.run([comfy_cli(), "--skip-prompt", "--no-enable-telemetry", "node", *args], cwd=copy,
                            env={**os.environ, "HOME": str(home)}, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"comfy node {' '.join(args)} failed:\n{output}"
    return output


def test_comfy_node_validate_passes(working_tree_copy):
    copy, _, home = working_tree_copy
    output = run_comfy(copy, home, "validate")
    assert "All validation checks passed" in output and "warning" not in output.lower(), output


def test_comfy_node_pack_holds_the_pack_and_nothing_of_bench_or_tests(working_tree_copy):
    copy, files, home = working_tree_copy
    run_comfy(copy, home, "pack")
    with zipfile.ZipFile(copy / "node.zip") as archive:
        packed = set(archive.namelist())
    assert not {name for name in packed if name.startswith(UNPUBLISHED)}, "bench/, tests/ or another unpublished path"
    published = {name for name in files if not name.startswith(UNPUBLISHED)}
    assert packed == published, f"missing {sorted(published - packed)}, unexpected {sorted(packed - published)}"
    for needed in ("__init__.py", "nodes/", "guiders/", "workflows/", "workflows/api/", "reference/weights/",
                   "web/docs/", "web/docs/images/", "locales/en/", "LICENSE", "icon.svg"):
        assert any(name == needed or name.startswith(needed) for name in packed), f"{needed} is not in the zip"
    weights = {name for name in files if name.startswith("reference/weights/")}
    assert weights and weights <= packed


def test_metadata_agree():
    """One repository address (its URLs and the icon's under it), a registry name without "comfyui" that the README
    clones into and the template category label is keyed by, and the oldest ComfyUI the suite runs on."""
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    name, repository = project["name"], project["urls"]["Repository"]
    assert "comfyui" not in name.lower()
    for key in ("Documentation", "Bug Tracker", "Issues"):
        assert project["urls"][key].startswith(repository + "/"), key
    owner_repo = repository.removeprefix("https://github.com/")
    icon = comfy["Icon"].removeprefix(f"https://raw.githubusercontent.com/{owner_repo}/main/")
    assert icon != comfy["Icon"] and (REPO / icon).is_file(), f"Icon {comfy['Icon']} is not a file of the repository"
    assert comfy["requires-comfyui"] == ">=0.3.75"
    assert any(c.startswith("Operating System :: ") for c in project["classifiers"])
    assert any(c.startswith("Environment :: GPU :: ") for c in project["classifiers"])
    readme = (REPO / "README.md").read_text()
    assert re.search(rf"git clone {re.escape(repository)} {re.escape(name)}\n", readme), "README's install line"
    labels = json.loads((REPO / "locales/en/main.json").read_text())["templateWorkflows"]["category"]
    assert list(labels) == [name], "the template category is the pack's folder, which the README names"
