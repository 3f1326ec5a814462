"""LoRA adapters as store objects: every key layout normalised, base checked by layer names and shapes,
pickles and text-encoder layers refused, and a LoRA is never mistaken for a loadable model."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdmaker.config import load_settings
from sdmaker.errors import ModelFormatError, ModelNotFoundError, PickleRefusedError
from sdmaker.files import tree_digest
from sdmaker.store import LORA_FILE, Store, kohya_module_name, read_lora, resolve_model

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("kind", ["a", "kohya", "old"])
def test_every_layout_reads_to_the_same_layers(lora_files: dict[str, Path], kind: str) -> None:
    layout = read_lora(lora_files[kind])
    assert layout.layout == {"a": "peft", "kohya": "kohya", "old": "diffusers-old"}[kind]
    assert layout.rank == 4 and layout.alpha == 8.0
    assert layout.target_modules == read_lora(lora_files["a"]).target_modules
    assert ATTN in layout.layers and "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0" in layout.layers


def test_kohya_names_map_back_with_or_without_the_base() -> None:
    name = "down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj"
    assert kohya_module_name(name) == "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"
    assert kohya_module_name("up_blocks_0_resnets_1_conv_shortcut") == "up_blocks.0.resnets.1.conv_shortcut"
    assert kohya_module_name("mid_block_x_y", ["mid_block.x_y"]) == "mid_block.x_y"
    with pytest.raises(ModelFormatError, match="input_blocks"):
        kohya_module_name("input_blocks_1_1_proj_in")


def test_import_records_kind_rank_targets_and_base(tmp_path: Path, sd1_dir: Path, lora_files: dict[str, Path]) -> None:
    store = Store(tmp_path / "store")
    digest = tree_digest(sd1_dir)
    manifest = store.import_lora(lora_files["b"], name="b", base="sd1", base_digest=digest, base_unet=sd1_dir / "unet")
    info = manifest.lora
    assert manifest.kind == "lora" and info is not None
    assert (info.layout, info.rank, info.alpha, info.base, info.base_digest) == ("peft", 2, 2.0, "sd1", digest)
    assert "mid_block.resnets.0.conv1" in info.target_modules and "down_blocks.1.attentions.0.proj_in" in info.target_modules
    assert [m.name for m in store.list()] == ["b"] and store.get("b").kind == "lora"
    got, path = store.lora_path("b")
    assert path.name == LORA_FILE and path.read_bytes() == lora_files["b"].read_bytes()
    assert got.lora.sha256 == info.sha256  # type: ignore[union-attr]


def test_a_lora_is_refused_where_a_model_is_expected(tmp_path: Path, sdmaker_home: Path,
                                                     lora_files: dict[str, Path]) -> None:
    settings = load_settings()
    Store(settings.store_dir).import_lora(lora_files["a"], name="a")
    with pytest.raises(ModelNotFoundError, match="adapter"):
        resolve_model("a", settings)


def test_wrong_base_shapes_pickles_and_text_encoder_layers_are_refused(tmp_path: Path, sd1_dir: Path, sd2_dir: Path,
                                                                       lora_files: dict[str, Path]) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    store = Store(tmp_path / "store")
    # sd2-tiny has the same module names but linear projections and other head sizes: b's proj_in does not fit
    with pytest.raises(ModelFormatError, match="proj_in"):
        store.import_lora(lora_files["b"], name="b", base="sd2", base_digest="x", base_unet=sd2_dir / "unet")
    pickled = tmp_path / "lora.bin"
    torch.save(load_file(lora_files["a"]), pickled)
    with pytest.raises(PickleRefusedError):
        store.import_lora(pickled, name="p")
    te = {**load_file(lora_files["a"]), "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
          torch.zeros(4, 32)}
    save_file(te, tmp_path / "te.safetensors")
    with pytest.raises(ModelFormatError, match="text encoder"):
        store.import_lora(tmp_path / "te.safetensors", name="te")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04junk")
    with pytest.raises(ModelFormatError):
        store.import_lora(tmp_path / "junk.safetensors", name="junk")
    assert store.list() == []  # nothing half-stored
