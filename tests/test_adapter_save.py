"""save_adapter: an old adapter is replaced only by a complete, finite new one."""

import hashlib
import os
import shutil

import pytest
import torch
from tiny import tiny_encoder

from sami_adapter import adapter as adapter_lib
from sami_adapter.adapter import save_adapter


def _digest(path, skip=()):
    """{relative path: sha256} of every file under ``path`` (names in ``skip`` at the top level left out)."""
    out = {}
    for root, dirs, files in os.walk(path):
        rel_root = os.path.relpath(root, path)
        if rel_root == ".":
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.normpath(os.path.join(rel_root, f))] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _encoder(seed, latent_dim=3):
    torch.manual_seed(seed)
    enc = tiny_encoder(latent_dim=latent_dim)
    with torch.no_grad():
        enc.head.weight.normal_(0, 0.3)
    return enc


ADAPTER_PARTS = ("sami_adapter_config.json", "encoder", "unet_lora", "unet", "README.md")


class _Interrupt(BaseException):
    pass


def test_save_interrupted_at_any_file_operation_keeps_the_old_adapter_or_the_new_one(tmp_path, monkeypatch):
    """An interrupt at each file operation in turn: the folder holds the old adapter byte for byte or the complete new one."""
    from tiny import tiny_unet

    new_mode = "full"  # replacing a frozen adapter by a full one: parts appear that the old one lacked

    out = tmp_path / "adapter"
    save_adapter(str(out), _encoder(0), "base", unet=None, unet_mode="frozen", model_card="old")
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "state.bin").write_bytes(b"resumable")
    (out / "logs").mkdir()
    (out / "logs" / "train_log.jsonl").write_text('{"step": 1}\n')
    by_products = _digest(out, skip=ADAPTER_PARTS)
    assert set(by_products) == {"checkpoint-2/state.bin", "logs/train_log.jsonl"}
    old = _digest(out, skip=("checkpoint-2", "logs"))
    reference = tmp_path / "reference"
    unet = tiny_unet() if new_mode == "full" else None
    save_adapter(str(reference), _encoder(1, latent_dim=4), "base", unet=unet, unet_mode=new_mode, model_card="new")
    new = _digest(reference)

    targets = [(os, "replace"), (os, "rename"), (os, "remove"), (os, "unlink"), (shutil, "rmtree")]
    targets += [(adapter_lib, "_exchange")] if hasattr(adapter_lib, "_exchange") else []
    originals = {(m, n): getattr(m, n) for m, n in targets}
    completed_at = None
    for fail_at in range(60):
        calls = {"n": 0}

        def wrap(fn):
            def inner(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == fail_at + 1:
                    raise _Interrupt()
                return fn(*args, **kwargs)

            return inner

        for (m, n), fn in originals.items():
            monkeypatch.setattr(m, n, wrap(fn))
        try:
            save_adapter(str(out), _encoder(1, latent_dim=4), "base", unet=unet, unet_mode=new_mode, model_card="new")
            interrupted = False
        except _Interrupt:
            interrupted = True
        finally:
            for (m, n), fn in originals.items():
                monkeypatch.setattr(m, n, fn)
        now = _digest(out, skip=("checkpoint-2", "logs"))
        assert now in (old, new), f"interrupt at file operation {fail_at}: neither the old nor the new adapter ({sorted(now)})"
        assert _digest(out, skip=ADAPTER_PARTS) == by_products, f"interrupt at file operation {fail_at} lost other files"
        if not interrupted:
            completed_at = fail_at
            assert now == new
            break
        if now == new:  # the swap happened; restore the old adapter for the next try
            shutil.rmtree(out)
            save_adapter(str(out), _encoder(0), "base", unet_mode="frozen", model_card="old")
            (out / "checkpoint-2").mkdir()
            (out / "checkpoint-2" / "state.bin").write_bytes(b"resumable")
            (out / "logs").mkdir()
            (out / "logs" / "train_log.jsonl").write_text('{"step": 1}\n')
            assert _digest(out, skip=("checkpoint-2", "logs")) == old
    assert completed_at is not None and completed_at > 2  # the save does pass through several file operations


def test_non_finite_weights_are_never_written(tmp_path):
    out = tmp_path / "adapter"
    save_adapter(str(out), _encoder(0), "base")
    before = _digest(out)
    bad = _encoder(1)
    with torch.no_grad():
        bad.head.bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values in 'head.bias'.*Nothing was written"):
        save_adapter(str(out), bad, "base")
    assert _digest(out) == before
    with pytest.raises(ValueError, match="non-finite"):
        save_adapter(str(tmp_path / "fresh"), bad, "base")
    assert not (tmp_path / "fresh").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-adapter")]
