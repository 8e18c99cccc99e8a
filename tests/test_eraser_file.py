"""The eraser file: safetensors only, exact round trips, clear refusals."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from sepme_adapter import Eraser, EraserFileError
from sepme_adapter.formats import read_safetensors

from .helpers import make_eraser


def test_save_and_load_round_trip_every_tensor_and_metadata_field(pipe, tmp_path):
    eraser = make_eraser(pipe, "vangogh")
    eraser.metadata["training"] = {"lr": 0.01, "iterations": 12}
    path = eraser.save(tmp_path / "vangogh.safetensors")
    loaded = Eraser.load(path)
    assert torch.equal(loaded.basis, eraser.basis)
    assert loaded.weights.keys() == eraser.weights.keys()
    for key, w in eraser.weights.items():
        assert torch.equal(loaded.weights[key], w)
    for field in ("name", "prompt", "beta", "known", "protected", "metadata"):
        assert getattr(loaded, field) == getattr(eraser, field), field
    assert [p.name for p in tmp_path.iterdir()] == ["vangogh.safetensors"]  # no temp file left


def test_delta_is_beta_w_basis_transposed_and_invisible_to_known_prompts(pipe):
    from sepme_adapter.text import encode_prompts

    eraser = make_eraser(pipe, "vangogh")
    layer = next(iter(eraser.weights))
    delta = eraser.delta(layer)
    assert torch.allclose(delta, eraser.beta * eraser.weights[layer] @ eraser.basis.T, rtol=1e-4, atol=1e-7)
    c = encode_prompts(pipe, [*eraser.excluded_prompts, eraser.prompt])
    leak = (c[:-1] @ delta.T).abs().max() / (c[-1] @ delta.T).abs().max()
    assert leak < 1e-5
    assert eraser.dtheta_p() > 0


def test_a_save_writes_atomically_and_keeps_the_old_file_on_failure(pipe, tmp_path, monkeypatch):
    path = make_eraser(pipe, "vangogh").save(tmp_path / "e.safetensors")
    before = path.read_bytes()
    import sepme_adapter.formats as module

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "save_file", broken)
    with pytest.raises(OSError, match="No space"):
        make_eraser(pipe, "picasso").save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["e.safetensors"]


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickle_files_are_refused_without_being_opened(tmp_path, suffix):
    path = tmp_path / f"eraser{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(EraserFileError, match="pickle"):
        Eraser.load(path)


def test_truncated_empty_and_garbage_files_are_refused(pipe, tmp_path):
    good = make_eraser(pipe, "vangogh").save(tmp_path / "good.safetensors").read_bytes()
    cases = {"empty": b"", "truncated": good[: len(good) // 2], "garbage": b"\xff" * 64}
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(EraserFileError, match=name + r"\.safetensors"):
            Eraser.load(path)


def _rewrite(path, out, header_change=None, tensor_change=None):
    tensors, header = read_safetensors(path)
    if header_change:
        header_change(header)
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, str(out), metadata=header)
    return out


@pytest.mark.parametrize(
    "header_change, tensor_change, message",
    [
        (lambda h: h.update(format_version="99"), None, "unknown format version"),
        (lambda h: h.pop("format"), None, "not a SepME eraser"),
        (lambda h: h.update(known="{not json"), None, "malformed metadata"),
        (lambda h: h.pop("prompt"), None, "'prompt' is missing"),
        (lambda h: h.update(beta="-1"), None, "beta must be a positive"),
        (None, lambda t: t.__setitem__("basis", t["basis"][:-1]), "does not match|columns"),
        (None, lambda t: t.__setitem__(next(k for k in t if k.endswith(".w")), torch.full((3, 3), float("nan"))),
         "NaN|columns"),
        (None, lambda t: t.pop("basis"), "basis"),
        (None, lambda t: t.update({"unet.x.to_k.lora_A.weight": torch.zeros(2, 2)}), "unexpected tensor"),
    ],
)
def test_malformed_files_are_refused_naming_the_problem(pipe, tmp_path, header_change, tensor_change, message):
    path = make_eraser(pipe, "vangogh").save(tmp_path / "good.safetensors")
    bad = _rewrite(path, tmp_path / "bad.safetensors", header_change, tensor_change)
    with pytest.raises(EraserFileError, match=message):
        Eraser.load(bad)


def test_a_header_claiming_more_bytes_than_the_file_has_is_refused(pipe, tmp_path):
    data = bytearray(make_eraser(pipe, "vangogh").save(tmp_path / "e.safetensors").read_bytes())
    data[:8] = (len(data) * 10).to_bytes(8, "little")
    (tmp_path / "lying.safetensors").write_bytes(bytes(data))
    with pytest.raises(EraserFileError, match="header claims"):
        Eraser.load(tmp_path / "lying.safetensors")


def test_in_memory_erasers_are_validated_at_construction():
    with pytest.raises(EraserFileError, match="columns"):
        Eraser("x", "x", torch.randn(8, 3), {"a.attn2.to_k": torch.randn(4, 2)})
    with pytest.raises(EraserFileError, match="not one of the layers"):
        Eraser("x", "x", torch.randn(8, 3), {"a.attn1.to_k": torch.randn(4, 3)})
    with pytest.raises(EraserFileError, match="empty"):
        Eraser("x", "x", torch.randn(8, 3), {})


def test_header_is_plain_json_strings(pipe, tmp_path):
    path = make_eraser(pipe, "vangogh").save(tmp_path / "e.safetensors")
    _, header = read_safetensors(path)
    assert json.loads(header["known"]) == {"picasso": ["a painting by picasso"], "cezanne": ["a painting by cezanne"]}
    assert header["format"] == "sepme-eraser" and header["kind"] == "separable"
