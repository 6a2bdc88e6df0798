"""Kill a folder writer at random points and check what it leaves behind.

Run as a script, this is a writer server: ``python tests/fault_injection.py KIND TARGET REF_A REF_B``
(KIND "adapter" or "base") builds two versions A and B of a small adapter or base checkpoint,
saves them, completely, to REF_A and REF_B and A to TARGET, then for every line "go" on stdin
forks a child that saves B, A, B, ... to TARGET without end, prints the child's pid, waits for
it to die (the test kills it with SIGKILL) and prints "dead". Imports happen once, in the server;
the forked children start saving at once, so each kill costs milliseconds, not an interpreter start.

:func:`kill_rounds` drives the server from a test: ``rounds`` kills after random delays, and after
each one calls ``check(TARGET)``, which must load the folder and say which version it holds.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def kill_rounds(
    kind: str, tmp_path: Path, check, rounds: int, max_delay: float, seed: int = 0
) -> list[tuple[str, bool]]:
    """Kill the writer ``rounds`` times after uniform(0, max_delay) s each; returns, for each kill,
    what ``check`` found ("A" or "B") and whether the kill left a write unfinished (journal or
    temporary files in the folder before ``check`` loaded it)."""
    target, ref_a, ref_b = tmp_path / "target", tmp_path / "ref_a", tmp_path / "ref_b"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(
        [sys.executable, str(HERE / "fault_injection.py"), kind, str(target), str(ref_a), str(ref_b)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    rng = random.Random(seed)
    seen = []
    try:
        assert server.stdout.readline().strip() == "ready"
        for _ in range(rounds):
            server.stdin.write("go\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            time.sleep(rng.uniform(0.0, max_delay))
            os.kill(pid, 9)
            assert server.stdout.readline().strip() == "dead"  # reaped: its pid is gone
            interrupted = any(p.name.startswith(".") for p in target.iterdir())  # killed mid-write
            seen.append((check(target, ref_a, ref_b), interrupted))
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    return seen


# ---- the server ---------------------------------------------------------------------------------


def _adapter_versions():
    import torch

    from recpeft.peft import LoraConfig, get_peft_model

    from toy_models import ALL_TARGETS, make_model

    versions = []
    for seed, alpha in ((1, 4.0), (2, 8.0)):
        torch.manual_seed(seed)
        model = get_peft_model(make_model(), LoraConfig(r=2, lora_alpha=alpha, target_modules=ALL_TARGETS))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_" in name:
                    param.normal_()
        record = {"recpeft_base.json": f'{{"sha256": "base of version {seed}"}}\n'}  # an extra file in the set
        versions.append(lambda folder, model=model, record=record: model.save_pretrained(folder, extra_files=record))
    return versions


def _base_versions():
    import numpy as np
    import pandas as pd
    import torch

    from recpeft.apps.base_checkpoint import save_base
    from recpeft.datasets import FeatureEncoder, Schema
    from recpeft.models.dlrm import build_click_model

    schema = Schema(user="u", item="i", label="y", segment=None, timestamp=None, categorical=("c",), dense=("x",))
    versions = []
    for seed, users in ((1, 30), (2, 40)):  # B has another vocabulary: a mix would be visible
        rng = np.random.default_rng(seed)
        frame = pd.DataFrame(
            {
                "u": np.arange(200) % users,
                "i": rng.integers(0, 20, 200),
                "c": rng.choice(["a", "b"], 200),
                "x": rng.normal(size=200),
                "y": rng.integers(0, 2, 200).astype(float),
            }
        )
        encoder = FeatureEncoder().fit(frame, schema)
        torch.manual_seed(seed)
        model = build_click_model(encoder.cardinalities, 1, embedding_dim=8, dense_arch=(8, 8), over_arch=(8,))
        versions.append(lambda folder, model=model, encoder=encoder: save_base(folder, model, encoder))
    return versions


def _serve(kind: str, target: str, ref_a: str, ref_b: str) -> None:
    import torch

    torch.set_num_threads(1)  # no thread pools in a process that forks
    save_a, save_b = _adapter_versions() if kind == "adapter" else _base_versions()
    save_a(ref_a)
    save_b(ref_b)
    save_a(target)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        pid = os.fork()
        if pid == 0:  # the child: save B, A, B, ... until killed
            try:
                while True:
                    save_b(target)
                    save_a(target)
            finally:
                os._exit(1)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("dead", flush=True)


if __name__ == "__main__":
    _serve(*sys.argv[1:5])
