"""The project's own files: environment.yml and pyproject.toml name the same packages; the README is true."""
from __future__ import annotations

import re

import tomllib
import yaml

from helpers import REPO


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_names_the_same_packages_as_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]} | {_name(r) for r in project["optional-dependencies"]["test"]}
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_name(r) for r in pip_section if not r.startswith("-")}
    assert listed == wanted
    assert "-e ." in pip_section
    assert "xformers" not in listed  # optional extra only, never required
    assert "xformers" in project["optional-dependencies"]


def test_readme_starts_with_install_run_and_test_commands():
    readme = (REPO / "README.md").read_text()
    head = readme[: readme.find("\n## ", readme.find("```"))]
    assert 'pip install -e ".[test]"' in head
    assert "python tools/txt2img.py --prompt" in head
    assert "pytest" in head
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in ci and "pytest" in ci
