"""Safe checkpoint loading: safetensors / weights_only pickles load, code-carrying pickles are refused unrun."""

from __future__ import annotations

import pathlib
import pickle

import pytest
import torch
from torch import nn

from dawin_ext.integrations.checkpoints import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    load_state_dict,
    save_state_dict,
)


class _TouchOnLoad:
    """Unpickling this object creates a marker file: the stand-in for a malicious payload."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class _ExecOnLoad:
    """The classic payload: unpickling calls exec() on attacker-chosen source."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _random_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": torch.randn(5, 3, generator=g),
        "encoder.bias": torch.randn(5, generator=g),
        "norm.running_mean": torch.randn(5, generator=g).double(),
        "steps": torch.tensor(7, dtype=torch.int64),
        "half": torch.randn(2, 2, generator=g).half(),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)  # safetensors stores keys sorted
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_round_trip(tmp_path, suffix):
    sd = _random_sd(1)
    before = {k: v.clone() for k, v in sd.items()}
    path = save_state_dict(tmp_path / f"m{suffix}", sd)
    _assert_same(load_state_dict(path), sd)
    _assert_same(sd, before)  # the caller's tensors are untouched


def test_safetensors_shared_and_noncontiguous_tensors(tmp_path):
    base = torch.randn(4, 6)
    sd = {"a": base, "tied": base, "view": base[1:3], "t": base.t()}
    path = save_state_dict(tmp_path / "shared.safetensors", sd, metadata={"note": "x"})
    loaded = load_state_dict(path)
    for k in sd:
        assert torch.equal(loaded[k], sd[k]), k
    loaded["a"].add_(1)  # loaded tensors are independent copies
    assert not torch.equal(loaded["tied"], loaded["a"])


def test_nested_layouts_and_prefixes(tmp_path):
    sd = _random_sd(2)
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}}, tmp_path / "a.pt"
    )
    _assert_same(load_state_dict(tmp_path / "a.pt"), sd)
    torch.save({"model_state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}}, tmp_path / "b.pt")
    _assert_same(load_state_dict(tmp_path / "b.pt"), sd)
    # A prefix that only some keys carry is part of the names, not a wrapper.
    mixed = {"module.x": torch.ones(1), "y": torch.zeros(1)}
    torch.save(mixed, tmp_path / "c.pt")
    assert list(load_state_dict(tmp_path / "c.pt")) == ["module.x", "y"]


def test_safetensors_recognised_by_content(tmp_path):
    sd = _random_sd(3)
    save_state_dict(tmp_path / "m.safetensors", sd)
    (tmp_path / "m.safetensors").rename(tmp_path / "renamed.bin")
    _assert_same(load_state_dict(tmp_path / "renamed.bin"), sd)


def test_map_location(tmp_path):
    save_state_dict(tmp_path / "m.safetensors", _random_sd())
    assert all(v.device.type == "cpu" for v in load_state_dict(tmp_path / "m.safetensors", "cpu").values())


@pytest.mark.parametrize("payload", [_TouchOnLoad, _ExecOnLoad])
def test_malicious_pickle_is_refused_without_running(tmp_path, payload):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "extra": payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="needs arbitrary code") as info:
        load_state_dict(path)
    assert not marker.exists(), "the payload ran during a refused load"
    msg = str(info.value)
    assert "trust_pickle=True" in msg and "--trust-pickle" in msg and str(path) in msg
    # The same file with explicit trust does run the payload, which is why it must be opt-in.
    with pytest.raises(CheckpointFormatError):
        load_state_dict(path, trust_pickle=True)
    assert marker.exists()


def test_saved_module_needs_trust(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    torch.save(model, tmp_path / "model.pt")
    with pytest.raises(UnsafeCheckpointError, match="torch.nn.modules.container.Sequential"):
        load_state_dict(tmp_path / "model.pt")
    _assert_same(load_state_dict(tmp_path / "model.pt", trust_pickle=True), dict(model.state_dict()))
    torch.save({"state_dict": model.state_dict(), "model": model}, tmp_path / "both.pt")
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict(tmp_path / "both.pt")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_state_dict(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_state_dict(tmp_path)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="text.pt' is neither"):
        load_state_dict(tmp_path / "text.pt")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04broken zip")
    with pytest.raises(CheckpointFormatError, match="not a readable torch checkpoint"):
        load_state_dict(tmp_path / "trunc.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointFormatError, match="not a valid safetensors file"):
        load_state_dict(tmp_path / "bad.safetensors")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointFormatError, match="holds a list"):
        load_state_dict(tmp_path / "list.pt")
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"w": 1.0}, f, protocol=2)  # a pickle, but not one torch.save wrote
    with pytest.raises(CheckpointFormatError, match="not a readable torch checkpoint"):
        load_state_dict(tmp_path / "plain.pkl")
    # Protocol-4 framing is beyond torch's weights-only unpickler: refused, with torch's reason quoted.
    with open(tmp_path / "proto4.pkl", "wb") as f:
        pickle.dump({"w": [1.0]}, f, protocol=4)
    with pytest.raises(UnsafeCheckpointError, match="Unsupported operand"):
        load_state_dict(tmp_path / "proto4.pkl")


def test_bad_contents(tmp_path):
    torch.save({}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointFormatError, match="empty state dict"):
        load_state_dict(tmp_path / "empty.pt")
    torch.save({"w": torch.ones(1), "epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointFormatError, match="entry 'epoch' is a int"):
        load_state_dict(tmp_path / "meta.pt")
    torch.save({1: torch.ones(1)}, tmp_path / "intkey.pt")
    with pytest.raises(CheckpointFormatError, match="key 1 is a int"):
        load_state_dict(tmp_path / "intkey.pt")


def test_save_validation(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        save_state_dict(tmp_path / "x.safetensors", {})
    with pytest.raises(TypeError, match="entry 'b' is a float"):
        save_state_dict(tmp_path / "x.safetensors", {"a": torch.ones(1), "b": 1.0})
    with pytest.raises(ValueError, match="metadata"):
        save_state_dict(tmp_path / "x.pt", {"a": torch.ones(1)}, metadata={"k": "v"})
    model = nn.Linear(2, 3)
    _assert_same(load_state_dict(save_state_dict(tmp_path / "lin.safetensors", model)), dict(model.state_dict()))
