"""The import-linter contracts of pyproject.toml hold for the tree, and would catch an upward
import: a copy of the package with one module of ``recpeft.layers`` importing ``recpeft.apps``
breaks the layers contract, and one kernel importing recpeft breaks the kernels contract."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(
    not LINT.is_file(), reason="import-linter is not installed (scripts/bootstrap.sh installs it)"
)


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
    )


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "recpeft", tree / "recpeft", ignore=ignore)
    shutil.copytree(ROOT / "kernels", tree / "kernels", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_tree_keeps_every_contract(tmp_path):
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    tree = _copy(tmp_path)
    (tree / "recpeft" / "layers" / "upward.py").write_text("from recpeft.apps import demo\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "recpeft.layers.upward -> recpeft.apps.demo" in result.stdout


def test_a_kernel_importing_recpeft_breaks_the_kernels_contract(tmp_path):
    tree = _copy(tmp_path)
    (tree / "kernels" / "upward.py").write_text("import recpeft.peft\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "kernels.upward -> recpeft.peft" in result.stdout
