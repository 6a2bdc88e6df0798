"""Adapter folders are saved as one set and verified on load: a writer killed at any point leaves
the old adapter or the new one, flipped tensor bytes are refused naming the file, debris of
killed writes is removed, files get the mode the umask gives."""

from __future__ import annotations

import json
import os
import struct
import subprocess

import pytest
import torch

from recpeft.peft import CONFIG_NAME, WEIGHTS_NAME, LoraConfig, PeftModel, get_peft_model, read_adapter_file

from fault_injection import kill_rounds
from toy_models import ALL_TARGETS, make_batch, make_model, train_steps

RECORD = "recpeft_base.json"  # the extra file the writer saves in the adapter's set (the base it was trained on)


def _debris(folder):
    return sorted(p.name for p in folder.rglob(".*"))


def _same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _which(target, ref_a, ref_b):
    """Load ``target`` and say whether it is exactly version A or exactly version B."""
    tensors, config = read_adapter_file(target), json.loads((target / CONFIG_NAME).read_text())
    assert _debris(target) == [], "a load leaves no debris of the killed write"
    assert sorted(p.name for p in target.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, RECORD])
    record = (target / RECORD).read_text()
    for name, ref in (("A", ref_a), ("B", ref_b)):
        same_config = config == json.loads((ref / CONFIG_NAME).read_text())
        if _same_tensors(tensors, read_adapter_file(ref)) and same_config and record == (ref / RECORD).read_text():
            return name
    raise AssertionError("the folder holds a mix of versions A and B")


def test_killed_saves_leave_exactly_the_old_or_the_new_adapter(tmp_path):
    seen = kill_rounds("adapter", tmp_path, _which, rounds=50, max_delay=0.08)
    assert sum(interrupted for _, interrupted in seen) >= 5  # many kills landed in the middle of a write
    model = PeftModel.from_pretrained(make_model(), tmp_path / "target")  # still loads whole
    assert torch.isfinite(model(*make_batch())).all()


def _trained(folder, **config):
    model = get_peft_model(make_model(), LoraConfig(r=4, target_modules=ALL_TARGETS, **config))
    train_steps(model, steps=2)
    model.save_pretrained(folder)
    return model


def _flip_data_byte(path, at: float):
    """Flip one bit in the tensor data (after the 8-byte length and the JSON header)."""
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start + int(at * (len(data) - start - 1))] ^= 0x04
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("at", [0.0, 0.5, 1.0])
def test_flipped_tensor_byte_is_refused_naming_the_file(tmp_path, at):
    _trained(tmp_path)
    _flip_data_byte(tmp_path / WEIGHTS_NAME, at)
    with pytest.raises(ValueError, match=rf"{tmp_path / WEIGHTS_NAME} is corrupt: .*sha256") as info:
        PeftModel.from_pretrained(make_model(), tmp_path)
    assert len(str(info.value).splitlines()) == 1


def test_a_committed_save_killed_half_way_is_finished_on_load(tmp_path):
    """The kill point after the commit rename, with the config already moved and the weights not."""
    old = tmp_path / "old"
    _trained(old, lora_alpha=4)
    new_model = _trained(tmp_path / "new", lora_alpha=16)
    (tmp_path / "old" / ".recpeft-new-1-00ff").mkdir()
    os.replace(tmp_path / "new" / WEIGHTS_NAME, old / ".recpeft-new-1-00ff" / WEIGHTS_NAME)
    os.replace(tmp_path / "new" / CONFIG_NAME, old / CONFIG_NAME)
    loaded = PeftModel.from_pretrained(make_model(), old)
    assert loaded.peft_config["default"].lora_alpha == 16
    batch = make_batch(seed=3)
    assert torch.equal(loaded(*batch), new_model(*batch))
    assert _debris(old) == []


def test_debris_of_killed_writes_is_removed_by_the_next_save(tmp_path):
    _trained(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".recpeft-tmp-{dead.pid}-0a0b").mkdir()
    (tmp_path / f".recpeft-tmp-{dead.pid}-0a0b" / WEIGHTS_NAME).write_bytes(b"half")
    (tmp_path / f".{WEIGHTS_NAME}.tmp-{dead.pid}-0c0d").write_bytes(b"half")
    live = tmp_path / f".recpeft-tmp-{os.getpid()}-0e0f"  # a writer still running: left alone
    live.mkdir()
    _trained(tmp_path)
    assert _debris(tmp_path) == [live.name]


def test_other_adapters_sub_folders_survive_a_save_of_default(tmp_path):
    model = _trained(tmp_path)
    model.add_adapter("DE", LoraConfig(r=2, target_modules=["mlp.0"]))
    model.save_pretrained(tmp_path, selected_adapters=["DE"])
    de = read_adapter_file(tmp_path / "DE")
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    assert _same_tensors(read_adapter_file(tmp_path / "DE"), de)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["DE", CONFIG_NAME, WEIGHTS_NAME])


def test_saved_files_get_mode_0644_under_umask_022(tmp_path):
    before = os.umask(0o022)
    try:
        model = _trained(tmp_path / "out")
        model.add_adapter("DE", LoraConfig(r=2, target_modules=["mlp.0"]))
        model.save_pretrained(tmp_path / "out")
    finally:
        os.umask(before)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) == 4
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o644)}
    assert oct((tmp_path / "out" / "DE").stat().st_mode & 0o777) == oct(0o755)
