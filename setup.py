"""Packaging details that pyproject.toml cannot express.

The Triton kernels live in the top-level ``kernels/`` directory but are
imported as ``recpeft.kernels`` (``kernels/reference.py`` ->
``recpeft.kernels.reference``). Everything else is in ``pyproject.toml``.
"""

from setuptools import find_packages, setup


def _packages() -> list[str]:
    pkgs = ["recpeft"]
    # Subpackages of recpeft/ (a stray recpeft/kernels/ would clash with the
    # mapping below, so it is never picked up from there).
    pkgs += [f"recpeft.{p}" for p in find_packages("recpeft", exclude=["kernels", "kernels.*", "tests", "tests.*"])]
    pkgs.append("recpeft.kernels")
    pkgs += [f"recpeft.kernels.{p}" for p in find_packages("kernels", exclude=["tests", "tests.*"])]
    return sorted(set(pkgs))


setup(
    package_dir={"recpeft": "recpeft", "recpeft.kernels": "kernels"},
    packages=_packages(),
)
