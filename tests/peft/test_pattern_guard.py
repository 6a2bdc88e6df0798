"""Regexes from a config cannot hang the process: a saved adapter records the modules it wraps and
loads by those names literally, and a user's pattern that backtracks exponentially is refused
with a one-line error naming the pattern and the field.

Module names here are as long as a transformer's (``model.encoder.layer.11.attention.self.query``,
43 characters): Python's ``re`` needs time doubling per character on the patterns below, so the
code as it was ran for hours. Every call is bounded by an alarm that fails the test instead."""

from __future__ import annotations

import json
import signal
import time
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from recpeft import LoraConfig, PeftModel, get_peft_model
from recpeft.peft import CONFIG_NAME

QUERY = "model.encoder.layer.11.attention.self.query"
KEY = "model.encoder.layer.11.attention.self.key"
# from the issue: exponential under Python's re (here the regex module sees it fail at once)
ISSUE_PATTERN = r"(?:[a-z_.0-9]*)*!"
# exponential under both re and the regex module: the alternation splits each run of name
# characters in Fibonacci-many ways before the final "y" of "query" fails to match
HOSTILE = r"(?:[\w.]|[\w.][\w.])*\.quer"
LIMIT_S = 5.0  # generous: the guard gives up after 0.25 s of matching


class Hung(Exception):
    pass


@contextmanager
def bounded(seconds: float = LIMIT_S):
    """Fail with Hung if the block runs longer than ``seconds`` (re checks signals as it matches)."""

    def fire(*_):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.key = nn.Linear(8, 8)


class Deep(nn.Module):
    """x [B, 8] → [B, 8] through model.encoder.layer.11.attention.self.{query, key}."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.encoder = nn.Module()
        self.model.encoder.layer = nn.ModuleDict(
            {"11": nn.ModuleDict({"attention": nn.ModuleDict({"self": Attention()})})}
        )

    def forward(self, x):
        attention = self.model.encoder.layer["11"]["attention"]["self"]
        return attention.query(x) + attention.key(x)


def make_deep() -> Deep:
    torch.manual_seed(0)
    return Deep()


def _inputs():
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(3))


def _refused_quickly(call, field: str, pattern: str) -> str:
    start = time.perf_counter()
    with bounded(), pytest.raises(ValueError) as info:
        call()
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < LIMIT_S
    assert "\n" not in message and field in message and repr(pattern) in message
    return message


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(target_modules=HOSTILE), "target_modules"),
        (dict(target_modules=["query"], exclude_modules=HOSTILE), "exclude_modules"),
        (dict(target_modules=["query"], rank_pattern={HOSTILE: 2}), "rank_pattern"),
        (dict(target_modules=["query"], alpha_pattern={HOSTILE: 2}), "alpha_pattern"),
    ],
)
def test_a_catastrophic_user_pattern_is_refused_not_run_for_hours(kwargs, field):
    model = make_deep()
    message = _refused_quickly(lambda: get_peft_model(model, LoraConfig(r=2, **kwargs)), field, HOSTILE)
    assert "backtracks" in message
    assert not any("lora" in n for n, _ in model.named_parameters())  # nothing was wrapped


def test_the_issue_pattern_is_answered_at_once():
    with bounded():
        with pytest.raises(ValueError, match="matched no module"):
            get_peft_model(make_deep(), LoraConfig(target_modules=ISSUE_PATTERN))
        config = LoraConfig(target_modules=["query"], rank_pattern={ISSUE_PATTERN: 2})
        assert get_peft_model(make_deep(), config).peft_config["default"].rank_for(QUERY) == config.r


def _saved(tmp_path, **config):
    model = get_peft_model(
        make_deep(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key"], init_lora_weights=False, **config)
    )
    model.save_pretrained(tmp_path)
    return model


def _edit_config(tmp_path, **changes):
    path = tmp_path / CONFIG_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    for key, value in list(data.items()):
        if value is _DROP:
            del data[key]
    path.write_text(json.dumps(data))
    return path


_DROP = object()


def test_the_saved_file_lists_every_adapted_module_with_its_rank_and_alpha(tmp_path):
    _saved(tmp_path, rank_pattern={r"self\.query": 2}, alpha_pattern={"key": 3})
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert data["adapted_modules"] == {QUERY: {"r": 2, "lora_alpha": 8}, KEY: {"r": 4, "lora_alpha": 3}}
    assert data["target_modules"] == ["query", "key"] and data["rank_pattern"] == {r"self\.query": 2}


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_a_saved_adapter_with_hostile_patterns_loads_by_its_module_list(tmp_path, how):
    model = _saved(tmp_path, rank_pattern={"query": 2})
    _edit_config(
        tmp_path,
        target_modules=HOSTILE,
        exclude_modules=HOSTILE,
        rank_pattern={HOSTILE: 1, ISSUE_PATTERN: 3},
        alpha_pattern={HOSTILE: 5},
    )
    start = time.perf_counter()
    with bounded():
        if how == "from_pretrained":
            loaded = PeftModel.from_pretrained(make_deep(), tmp_path)
        else:
            loaded = get_peft_model(make_deep(), LoraConfig(r=1, target_modules=["key"]), adapter_name="other")
            loaded.load_adapter(tmp_path, "default")
            loaded.set_adapter("default")
        assert time.perf_counter() - start < LIMIT_S
        assert torch.equal(loaded(_inputs()), model(_inputs()))
        # the ranks and scales are the saved ones (2 and 4, α = 8), not anything the patterns say
        layers = loaded.lora_layers()
        assert layers[QUERY].lora_A["default"].shape[0] == 2 and layers[KEY].lora_A["default"].shape[0] == 4
        assert loaded.peft_config["default"].scale_for(QUERY) == 8 / 2


def test_an_adapter_saved_without_its_module_list_still_refuses_a_hostile_file(tmp_path):
    """An adapter_config.json of another tool (or of recpeft before the list) runs its patterns,
    under the guard: the error names the file, the field and the pattern."""
    _saved(tmp_path)
    path = _edit_config(tmp_path, adapted_modules=_DROP, rank_pattern={HOSTILE: 2})
    message = _refused_quickly(lambda: PeftModel.from_pretrained(make_deep(), tmp_path), "rank_pattern", HOSTILE)
    assert str(path) in message


def test_the_saved_list_wins_over_target_modules(tmp_path):
    model = get_peft_model(make_deep(), LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    _edit_config(tmp_path, target_modules=["query", "key"], exclude_modules=["query"])
    loaded = PeftModel.from_pretrained(make_deep(), tmp_path)
    assert list(loaded.lora_layers()) == [QUERY] and torch.equal(loaded(_inputs()), model(_inputs()))
    _saved(tmp_path)  # query and key adapted; the list now names query only
    _edit_config(tmp_path, adapted_modules={QUERY: {"r": 4, "lora_alpha": 8}})
    with pytest.raises(ValueError, match="no such adapted module"):  # the file also holds key's tensors
        PeftModel.from_pretrained(make_deep(), tmp_path)


def test_the_saved_names_are_matched_literally(tmp_path):
    _saved(tmp_path)
    for name in (r"model\.encoder.*query", "query", "attention.self.query"):  # a regex, a suffix
        path = _edit_config(tmp_path, adapted_modules={name: {"r": 4, "lora_alpha": 8}})
        with pytest.raises(ValueError, match=r"adapted_modules entry .* matched no module") as info:
            PeftModel.from_pretrained(make_deep(), tmp_path)
        assert str(path) in str(info.value)


def test_a_loaded_adapter_saves_the_same_list_again(tmp_path):
    _saved(tmp_path, rank_pattern={"query": 2})
    first = json.loads((tmp_path / CONFIG_NAME).read_text())
    loaded = PeftModel.from_pretrained(make_deep(), tmp_path)
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / CONFIG_NAME).read_text())
    assert again["adapted_modules"] == first["adapted_modules"]
