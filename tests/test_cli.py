"""The `recpeft` command: the demo runs end to end and its routed batch equals the merged
models; errors are one line without a traceback."""

import json
import subprocess
import sys

from recpeft.cli import main


def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [m["market"] for m in summary["markets"]] == ["DE", "FR", "ES"]
    assert summary["routing_max_abs_diff"] < 1e-4
    for market in summary["markets"]:
        assert (tmp_path / "adapters" / market["market"] / "adapter_model.safetensors").is_file()
        assert 0.5 < market["lora_auc"] <= 1.0
    assert "routed a mixed batch" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # the output folder cannot be made under a file
    result = subprocess.run([sys.executable, "-m", "recpeft.cli", "demo", "--quiet", "--out", str(blocker / "out")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and result.stderr.startswith("recpeft demo: error:")
