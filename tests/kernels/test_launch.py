"""kernels/launch.py: the launch constants the op files share, written once there."""

import ast
import os
from pathlib import Path

import pytest

from recpeft.kernels import launch

KERNELS = Path(launch.__file__).resolve().parent
OP_FILES = ["lora_linear.py", "lora_embedding_bag.py"]


@pytest.mark.parametrize("rank", [1, 2, 3, 8, 15, 16, 17, 31, 32, 33, 64, 100, 128, 129])
def test_padded_rank_is_the_next_power_of_two_at_least_dot_min(rank):
    padded = launch.padded_rank(rank)
    assert padded >= max(rank, launch.DOT_MIN) and padded & (padded - 1) == 0
    assert padded == launch.DOT_MIN or padded < 2 * rank  # no more padding than the power of two needs


def test_interpreter_flag_follows_the_environment():
    assert launch.INTERPRETING == (os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.parametrize("name", OP_FILES)
def test_op_files_take_the_shared_settings_from_launch(name):
    """Each op file imports the interpreter flag, DOT_MIN and the padding from launch.py and
    defines none of them itself (nor reads TRITON_INTERPRET)."""
    source = (KERNELS / name).read_text()
    tree = ast.parse(source)
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "launch"
        for alias in node.names
    }
    assert {"DOT_MIN", "INTERPRETING", "padded_rank"} <= imported
    assigned = {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert not assigned & {"DOT_MIN", "MIN_DOT", "INTERPRETING"} and "padded_rank" not in defined
    assert "TRITON_INTERPRET" not in source
