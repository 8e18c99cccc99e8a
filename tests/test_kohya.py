"""Kohya / `lora_unet_...` exports: the files ComfyUI and Automatic1111 load add exactly the increment.

What ComfyUI expects, from its `comfy/lora.py` and `comfy/utils.py` (mirrored here, not imported):
`model_lora_keys_unet` names a UNet weight `lora_unet_` + its diffusers key without `.weight`, dots as
underscores, and maps it to the LDM key via `unet_to_diffusers` (SD v1: `down_blocks.x.attentions.i` ->
`input_blocks.{1 + 3x + i}.1`, `mid_block.attentions.0` -> `middle_block.1`, `up_blocks.x.attentions.i` ->
`output_blocks.{3x + i}.1`; Automatic1111's `convert_diffusers_name_to_compvis` uses the same indices).
`load_lora` reads `<name>.lora_up.weight`, `.lora_down.weight` and `.alpha` (`.item()`), warns of every other
key, and adds `strength * alpha / rank * up @ down`, rank = `lora_down.shape[0]`.
"""

import re

import pytest
import torch
from diffusers import UNet2DConditionModel

import sepme_adapter
from sepme_adapter import cli
from sepme_adapter.formats import kohya_name, read_safetensors
from sepme_adapter.hub import export_lora
from sepme_adapter.testing import sd15_unet_config, tiny_pipeline
from sepme_adapter.unet import modified_layers

from .helpers import make_eraser, make_rank_eraser, unet_output

SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")


def comfy_sd15_attn2_keys() -> dict[str, str]:
    """ComfyUI's LoRA key map for SD v1.5's `attn2.to_k` / `to_v`: kohya name -> LDM weight key."""
    keys = {}

    def add(diffusers_block: str, ldm_block: str) -> None:
        for proj in ("to_k", "to_v"):
            diffusers_key = f"{diffusers_block}.transformer_blocks.0.attn2.{proj}"
            keys["lora_unet_" + diffusers_key.replace(".", "_")] = (
                f"diffusion_model.{ldm_block}.transformer_blocks.0.attn2.{proj}.weight")

    for x in range(3):  # the three levels with cross-attention, 2 res blocks each
        for i in range(2):
            add(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{1 + 3 * x + i}.1")
    add("mid_block.attentions.0", "middle_block.1")
    for x in range(1, 4):  # up levels 1-3 have cross-attention, 3 blocks each
        for i in range(3):
            add(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{3 * x + i}.1")
    return keys


def comfy_load(lora: dict[str, torch.Tensor], known: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ComfyUI's `load_lora` + weight patch at strength 1: kohya name -> the weight change; keys it would warn of."""
    patches, loaded = {}, set()
    for name in known:
        up, down, alpha = (lora.get(name + s) for s in SUFFIXES)
        if up is None:
            continue
        scale = 1.0 if alpha is None else alpha.item() / down.shape[0]
        patches[name] = scale * (up.double() @ down.double())
        loaded |= {name + s for s in SUFFIXES if name + s in lora}
    return patches, sorted(set(lora) - loaded)


def test_kohya_names_of_sd15_layers_are_the_ones_comfyui_and_automatic1111_map():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_unet_config())
    layers = modified_layers(unet)
    expected = comfy_sd15_attn2_keys()
    assert len(layers) == 32 and sorted(kohya_name(p) for p in layers) == sorted(expected)
    a1111 = re.compile(r"lora_unet_(down_blocks|mid_block|up_blocks)_(?:(\d+)_)?attentions_(\d+)_(.+)")
    for name, ldm in expected.items():  # Automatic1111's conversion lands on the same LDM module
        kind, x, i, rest = a1111.fullmatch(name).groups()
        block = {"down_blocks": f"input_blocks_{1 + 3 * int(x or 0) + int(i)}", "mid_block": "middle_block",
                 "up_blocks": f"output_blocks_{3 * int(x or 0) + int(i)}"}[kind]
        assert f"diffusion_model_{block}_1_{rest}" == ldm[: -len(".weight")].replace(".", "_")


@pytest.mark.parametrize("rank", [None, 2], ids=["full-rank", "rank-2"])
def test_a_kohya_export_holds_only_what_comfyui_reads_and_adds_exactly_the_increment(rank, tmp_path):
    pipe = sepme_adapter.attach(tiny_pipeline())
    eraser = make_eraser(pipe, "vangogh") if rank is None else make_rank_eraser(pipe, "vangogh", rank=rank)
    tensors, header = read_safetensors(export_lora(eraser, tmp_path / "vangogh.safetensors", format="kohya")[0])
    names = {kohya_name(p): p for p in eraser.weights}
    patches, stray = comfy_load(tensors, set(names))
    assert not stray and sorted(patches) == sorted(names)
    for name, change in patches.items():
        down, alpha = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.alpha"]
        assert alpha.ndim == 0 and alpha.item() == down.shape[0] == (rank or eraser.basis.shape[1])
        expected = eraser.delta(names[name]).double()
        torch.testing.assert_close(change, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert header["ss_network_dim"] == str(rank or eraser.basis.shape[1])


@pytest.mark.parametrize("rank", [None, 4], ids=["full-rank", "rank-4"])
def test_diffusers_loads_the_kohya_export_with_the_outputs_of_set_erased(rank, tmp_path):
    pipe = sepme_adapter.attach(tiny_pipeline())
    eraser = make_eraser(pipe, "vangogh") if rank is None else make_rank_eraser(pipe, "vangogh", rank=rank)
    path = export_lora(eraser, tmp_path / "vangogh.safetensors", format="kohya")[0]
    pipe.load_sepme(eraser)
    plain = tiny_pipeline()
    plain.load_lora_weights(str(path), adapter_name="vangogh")  # diffusers converts the kohya keys itself
    assert unet_output(plain).abs().max() > 0
    torch.testing.assert_close(unet_output(plain), unet_output(pipe), rtol=1e-4, atol=1e-5)
    plain.disable_lora()
    assert not torch.allclose(unet_output(plain), unet_output(pipe))


def test_load_sepme_reads_a_kohya_export_back_and_the_command_writes_one(tmp_path, capsys):
    pipe = sepme_adapter.attach(tiny_pipeline())
    eraser = make_rank_eraser(pipe, "vangogh", rank=2, stored=True)
    source = eraser.save(tmp_path / "vangogh.safetensors")
    assert cli.main(["export-lora", str(source), "--format", "kohya", "-o", str(tmp_path / "comfy")]) == 0
    exported = tmp_path / "comfy" / "vangogh.safetensors"
    tensors, _ = read_safetensors(exported)
    assert all(k.startswith("lora_unet_") and k.endswith(SUFFIXES) for k in tensors)
    again = sepme_adapter.Eraser.load(exported)
    assert again.rank == 2 and again.known == eraser.known and again.metadata == eraser.metadata
    for layer in eraser.weights:
        expected = eraser.delta(layer)
        torch.testing.assert_close(again.delta(layer), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert pipe.load_sepme(exported) == "vangogh"
    with pytest.raises(SystemExit):  # argparse: an unknown --format prints the usage
        cli.main(["export-lora", str(source), "--format", "a1111", "-o", str(tmp_path / "x")])
