"""The package layout: top-level kernels/ is importable as recpeft.kernels (editable install
here), ships inside the wheel under recpeft/kernels, and imports nothing from recpeft."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_recpeft_kernels_is_the_top_level_kernels_folder():
    import recpeft.kernels.reference as reference

    assert Path(reference.__file__).resolve() == ROOT / "kernels" / "reference.py"


def test_kernels_import_nothing_from_recpeft():
    for path in (ROOT / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                assert node.level <= 1 and not module.startswith("recpeft"), f"{path.name} imports {module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("recpeft") for a in node.names), path.name


def test_built_wheel_carries_and_imports_recpeft_kernels(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("recpeft-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "recpeft/kernels/reference.py" in names and "recpeft/cli/main.py" in names
    # every Triton module dispatch imports, and the launch constants they share, ship too
    from recpeft.kernels import dispatch

    for module in {*dispatch.TRITON_MODULES.values(), "launch"}:
        assert f"recpeft/kernels/{module}.py" in names, module
    assert not any(n.startswith("kernels/") for n in names)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = "import sys; sys.path.insert(0, sys.argv[1]); import recpeft.kernels.reference as r; print(r.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe, str(site)], cwd=tmp_path, check=True, capture_output=True, text=True
    )
    assert Path(out.stdout.strip()) == site / "recpeft" / "kernels" / "reference.py"
