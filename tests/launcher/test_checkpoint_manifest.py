"""Checkpoints that prove themselves: the manifest written at commit, its verification on resume (each kind
of damage named with the file, expected and found), falling back to the newest intact checkpoint, legacy
checkpoints without a manifest, the free-space check before a save, and a failed save leaving nothing."""
import hashlib
import json
import logging
from collections import namedtuple
from pathlib import Path

import pytest

from launcher import checkpoints
from launcher.config import ConfigError, load_config, to_yaml
from launcher.manifest import MANIFEST, Damage, DamageFound, verify, write_manifest

MODEL = "learner/deepspeed/mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, [])


def _save(run_dir: Path, step: int, cfg, size: int = 3000, keep: int = 0) -> Path:
    """A checkpoint as the driver commits one, with learner files of known bytes."""
    tmp = checkpoints.begin(run_dir, step)
    (tmp / MODEL).parent.mkdir(parents=True)
    (tmp / MODEL).write_bytes(bytes([step]) * size)
    (tmp / "learner" / "zero_to_fp32.py").write_text("# script\n")
    return checkpoints.commit(run_dir, tmp, {"step": step}, to_yaml(cfg), keep=keep)


def _auto(run_dir: Path):
    (run_dir / "metrics.jsonl").write_text("")
    return load_config(None, [f"logging.run_dir={run_dir}"])


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "big.bin").write_bytes(b"\x07" * (3 << 20) + b"tail")  # more than one 1 MiB chunk
    (tmp_path / "top.json").write_text("{}")
    (tmp_path / "empty").write_bytes(b"")
    manifest = write_manifest(tmp_path)
    assert json.loads((tmp_path / MANIFEST).read_text()) == manifest
    assert [f["path"] for f in manifest["files"]] == ["a/b/big.bin", "empty", "top.json"]
    big = manifest["files"][0]
    assert big["size"] == (3 << 20) + 4
    assert big["sha256"] == hashlib.sha256(b"\x07" * (3 << 20) + b"tail").hexdigest()
    assert manifest["files"][1]["sha256"] == hashlib.sha256(b"").hexdigest()
    assert manifest["total_bytes"] == (3 << 20) + 4 + 2
    assert verify(tmp_path) == manifest
    (tmp_path / "extra.log").write_text("not listed")  # files added later are not the checkpoint's
    assert verify(tmp_path) == manifest


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[1234] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("harm,file,expected,found", [
    (lambda c: (c / MODEL).unlink(), MODEL, "3000 bytes", "no such file"),
    (lambda c: _truncate(c / MODEL), MODEL, "3000 bytes", "1000 bytes"),
    (lambda c: _flip_a_byte(c / MODEL), MODEL, "sha256 " + hashlib.sha256(bytes([4]) * 3000).hexdigest()[:16],
     "sha256 "),
    (lambda c: (c / "driver_state.json").unlink(), "driver_state.json", "bytes", "no such file"),
    (lambda c: (c / MANIFEST).unlink(), MANIFEST, "a manifest (driver_state.json says it has one)", "no such file"),
    (lambda c: (c / MANIFEST).write_text('{"files": [{"pa'), MANIFEST, "a readable manifest", "JSONDecodeError"),
], ids=["missing-file", "wrong-size", "wrong-checksum", "missing-state", "missing-manifest", "torn-manifest"])
def test_each_kind_of_damage_is_named(tmp_path, cfg, harm, file, expected, found):
    ckpt = _save(tmp_path, 4, cfg)
    assert checkpoints.damage(ckpt) == []
    harm(ckpt)
    (damage,) = checkpoints.damage(ckpt)
    assert damage.file == file and expected in damage.expected and damage.found.startswith(found), damage
    with pytest.raises(ConfigError, match=f"train.resume': checkpoint {ckpt} is damaged: {file}: expected "):
        checkpoints.resolve_resume(load_config(None, [f"train.resume={ckpt}"]), tmp_path / "elsewhere")


def test_damage_is_all_listed_before_any_hashing(tmp_path):
    (tmp_path / "x").write_bytes(b"1" * 10)
    (tmp_path / "y").write_bytes(b"2" * 10)
    write_manifest(tmp_path)
    (tmp_path / "x").write_bytes(b"1" * 9)
    (tmp_path / "y").unlink()
    with pytest.raises(DamageFound) as caught:
        verify(tmp_path)
    assert caught.value.damage == [Damage("x", "10 bytes", "9 bytes"), Damage("y", "10 bytes", "no such file")]


def test_auto_passes_over_damaged_checkpoints_to_the_newest_intact_one(tmp_path, cfg, caplog):
    for step in (2, 4, 6):
        _save(tmp_path, step, cfg)
    _truncate(tmp_path / "checkpoints/step-000006" / MODEL)
    (tmp_path / "checkpoints/step-000004" / MANIFEST).unlink()
    with caplog.at_level(logging.INFO, logger="launcher.checkpoints"):
        assert checkpoints.resolve_resume(_auto(tmp_path), tmp_path) == tmp_path / "checkpoints/step-000002"
    text = caplog.text
    assert f"step-000006 is damaged: {MODEL}: expected 3000 bytes, found 1000 bytes" in text
    assert f"step-000004 is damaged: {MANIFEST}: expected a manifest" in text
    assert "resuming from " + str(tmp_path / "checkpoints/step-000002") in text
    assert "instead of the damaged step-000006, step-000004" in text
    assert "step-000002 verified: 4 files" in text
    # a run dir named by train.resume is treated as auto treats its own
    explicit = load_config(None, [f"train.resume={tmp_path}"])
    assert checkpoints.resolve_resume(explicit, tmp_path / "other").name == "step-000002"

    _flip_a_byte(tmp_path / "checkpoints/step-000002" / MODEL)
    with pytest.raises(ConfigError, match="no intact checkpoint to resume from in .*: step-000006, step-000004, "
                                          "step-000002 are damaged"):
        checkpoints.resolve_resume(_auto(tmp_path), tmp_path)


def test_latest_naming_a_missing_folder_falls_back(tmp_path, cfg, caplog):
    for step in (1, 2):
        _save(tmp_path, step, cfg)
    (tmp_path / "checkpoints/latest").write_text("step-000003")  # e.g. removed by hand
    with caplog.at_level(logging.WARNING, logger="launcher.checkpoints"):
        assert checkpoints.resolve_resume(_auto(tmp_path), tmp_path).name == "step-000002"
    assert "step-000003 is damaged: .: expected a checkpoint folder, found no such folder" in caplog.text


def test_a_checkpoint_from_before_manifests_is_accepted_with_a_warning(tmp_path, cfg, caplog):
    ckpt = _save(tmp_path, 3, cfg)
    (ckpt / MANIFEST).unlink()
    state = checkpoints.read_state(ckpt)
    del state[checkpoints.HAS_MANIFEST]
    (ckpt / "driver_state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="launcher.checkpoints"):
        assert checkpoints.resolve_resume(_auto(tmp_path), tmp_path) == ckpt
        assert checkpoints.resolve_resume(load_config(None, [f"train.resume={ckpt}"]), tmp_path) == ckpt
    assert f"checkpoint {ckpt} was written before checkpoints carried a manifest: resuming from it unverified" \
        in caplog.text


Usage = namedtuple("Usage", "total used free")


def test_a_save_that_would_not_fit_is_refused_before_anything_is_written(tmp_path, cfg, monkeypatch):
    first = _save(tmp_path, 2, cfg, size=5000)  # the first save has nothing to measure by: never refused
    needed = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(10**9, 10**9 - 4096, needed - 1))
    with pytest.raises(checkpoints.CheckpointError) as caught:
        checkpoints.begin(tmp_path, 4)
    message = str(caught.value)
    assert str(tmp_path / "checkpoints") in message and f"{needed - 1} bytes" in message and f"{needed} bytes" in message
    assert "step-000002" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000002"]
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(10**9, 10**9 - needed, needed))
    assert _save(tmp_path, 4, cfg).name == "step-000004"


def test_a_failed_save_removes_its_tmp_folder_and_keeps_latest(tmp_path, cfg, monkeypatch):
    _save(tmp_path, 2, cfg)
    with pytest.raises(RuntimeError, match="a learner rank died"):
        with checkpoints.saving(tmp_path, 4) as tmp:
            (tmp / "learner" / "half.pt").write_bytes(b"x" * 100)
            raise RuntimeError("a learner rank died")
    assert not tmp.exists()

    def disk_full(folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "write_manifest", disk_full)
    with pytest.raises(OSError, match="No space left"):
        with checkpoints.saving(tmp_path, 4) as tmp:
            checkpoints.commit(tmp_path, tmp, {"step": 4}, to_yaml(cfg), keep=0)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000002"]
    assert checkpoints.resolve_resume(_auto(tmp_path), tmp_path).name == "step-000002"
