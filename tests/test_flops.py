"""Tests for the analytic FLOPs / KV-cache accounting (``visiondrop.flops``).

The published figures (SPEC §9) are pinned here: unpruned LLaVA-1.5-7B 9.06 T and LLaVA-NeXT-7B
46.25 T (within 3 %), VisionDrop LLaVA-1.5-7B at budget 64 = 2.11 T and LLaVA-NeXT-7B at budget 320 =
7.70 T (within 8 %). Only the config round-trip test touches transformers (configs only, no model).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

try:
    from visiondrop import flops as vf
except ModuleNotFoundError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from visiondrop import flops as vf

from visiondrop.models.llava_next import llava_next_image_tokens
from visiondrop.models.qwen2_vl import qwen2_vl_image_tokens, qwen2_vl_resize

CONFIG_DIR = Path(vf.__file__).resolve().parent / "configs"


def visiondrop_stages(num_layers: int, budget: int, ratio: float = 0.73) -> list[tuple[int, int]]:
    """The published VisionDrop schedule rule, as restated in the brief of this module.

    Boundaries at L/4, L/2, 3L/4; the first stage keeps n0 = round(budget·L / Σ w_k·ratio^k), each
    middle stage round(ratio · previous), and the last stage the remainder that makes the layer
    average equal to the budget.
    """
    starts = [0, num_layers // 4, num_layers // 2, 3 * num_layers // 4]
    widths = [b - a for a, b in zip(starts, [*starts[1:], num_layers], strict=True)]
    n0 = round(budget * num_layers / sum(w * ratio**k for k, w in enumerate(widths)))
    counts = [n0]
    for _ in widths[1:-1]:
        counts.append(round(ratio * counts[-1]))
    spent = sum(w * n for w, n in zip(widths, counts, strict=False))
    counts.append(round((budget * num_layers - spent) / widths[-1]))
    return list(zip(starts, counts, strict=True))


def rel_err(value: float, target: float) -> float:
    return abs(value - target) / target


# --------------------------------------------------------------------------- published figures


def test_llava15_7b_unpruned_matches_paper() -> None:
    arch = vf.load_arch("llava-1.5-7b")
    out = vf.prefill_flops(arch, visual_tokens_per_layer=576)
    assert rel_err(out.tflops, 9.06) < 0.03
    # Spot-check the pieces: 24 CLIP layers over 577 tokens and 32 LLM layers over 576 + 64 tokens.
    assert out.vision == 24 * (8 * 577 * 1024**2 + 4 * 577**2 * 1024 + 4 * 577 * 1024 * 4096)
    assert len(out.llm_layers) == 32
    assert out.projector == 2 * 576 * (1024 * 4096 + 4096 * 4096)


def test_llava_next_7b_unpruned_matches_paper() -> None:
    arch = vf.load_arch("llava-next-7b")
    # Maximal image: 672x672 grid, square image (no unpadding) -> 576 + 48*48 + 48 newlines = 2928.
    crops, image_tokens = llava_next_image_tokens(arch, 672, 672)
    assert (crops, image_tokens) == (5, 2928)
    out = vf.prefill_flops(arch, visual_tokens_per_layer=image_tokens)  # ViT default: 5 crops of 577
    assert out.vision == 5 * vf.prefill_flops(vf.load_arch("llava-1.5-7b"), visual_tokens_per_layer=0).vision
    assert rel_err(out.tflops, 46.25) < 0.03


def test_visiondrop_llava15_7b_budget64() -> None:
    arch = vf.load_arch("llava-1.5-7b")
    stages = visiondrop_stages(arch.num_layers, 64)
    assert stages == [(0, 97), (8, 71), (16, 52), (24, 36)]
    per_layer = [n for _, n in stages for _ in range(8)]  # four stages of 8 layers each
    assert sum(per_layer) / len(per_layer) == 64
    out = vf.prefill_flops(arch, visual_tokens_per_layer=per_layer, vision_tokens=577)
    assert rel_err(out.tflops, 2.11) < 0.08


def test_visiondrop_llava_next_7b_budget320() -> None:
    arch = vf.load_arch("llava-next-7b")
    stages = visiondrop_stages(arch.num_layers, 320)
    assert stages == [(0, 483), (8, 353), (16, 258), (24, 186)]
    per_layer = [n for _, n in stages for _ in range(8)]  # four stages of 8 layers each
    assert sum(per_layer) / len(per_layer) == 320
    out = vf.prefill_flops(arch, visual_tokens_per_layer=per_layer, vision_tokens=[577] * 5)
    assert rel_err(out.tflops, 7.70) < 0.08


# --------------------------------------------------------------------------- formula pieces


def tiny_arch(**overrides: object) -> vf.ArchSpec:
    fields: dict[str, object] = {
        "family": "llava",
        "num_layers": 1,
        "hidden_size": 8,
        "num_heads": 2,
        "head_dim": 4,
        "kv_width": 4,
        "ffn_size": 16,
        "vocab_size": 10,
        "vit_layers": 1,
        "vit_hidden": 4,
        "vit_mlp": 8,
        "vit_tokens_per_crop": 5,
        "vit_cls_tokens": 1,
        "image_features_per_crop": 4,
        "image_size": 28,
        "projector_in": 4,
        "projector_hidden": 8,
        "projector_out": 8,
    }
    fields.update(overrides)
    return vf.ArchSpec(**fields)  # type: ignore[arg-type]


def test_tiny_case_exact_integers() -> None:
    arch = tiny_arch()
    out = vf.prefill_flops(arch, text_tokens=3, visual_tokens_per_layer=[2])
    # LLM, n = 5, d = 8, d_kv = 4, m = 16: 2·5·(2·64 + 2·32) + 4·25·8 + 6·5·8·16 = 1920 + 800 + 3840
    assert out.llm_layers == (6560.0,)
    # ViT, one crop of n = 5, d_v = 4, m_v = 8: 8·5·16 + 4·25·4 + 4·5·4·8 = 640 + 400 + 640
    assert out.vision == 1680
    # Projector over 5 - 1 ([CLS] dropped) = 4 tokens: 2·4·(4·8 + 8·8)
    assert out.projector == 768
    # LM head over the 5 tokens leaving the last layer: 2·5·8·10
    assert out.lm_head == 800
    assert out.total == 9808
    assert out.llm == 6560
    assert out.tflops == pytest.approx(9808e-12)

    batched = vf.prefill_flops(arch, text_tokens=3, visual_tokens_per_layer=[2], batch_size=3)
    assert batched.total == 3 * 9808
    assert batched.llm_layers == (3 * 6560.0,)


def test_overrides_and_three_matrix_vit_mlp() -> None:
    arch = tiny_arch(vit_mlp_matrices=3)
    out = vf.prefill_flops(
        arch,
        text_tokens=3,
        visual_tokens_per_layer=2,
        projector_tokens=1,
        lm_head_tokens=1,
        vision_tokens=[5, 3],
    )
    # ViT: crop of 5 with a 3-matrix MLP (640 + 400 + 6·5·4·8 = 2000) + crop of 3 (384 + 144 + 576 = 1104)
    assert out.vision == 2000 + 1104
    assert out.projector == 2 * 1 * 96
    assert out.lm_head == 2 * 1 * 8 * 10


def test_query_width_differs_from_hidden() -> None:
    # q = heads·head_dim = 16 while d = 8: 2·5·(2·8·16 + 2·8·4) + 4·25·16 + 6·5·8·16
    arch = tiny_arch(num_heads=4)
    out = vf.prefill_flops(arch, text_tokens=3, visual_tokens_per_layer=[2])
    assert out.llm_layers == (2 * 5 * (2 * 8 * 16 + 2 * 8 * 4) + 4 * 25 * 16 + 6 * 5 * 8 * 16,)


def test_kv_cache_bytes_hand_computed() -> None:
    llava = vf.load_arch("llava-1.5-7b")
    # 32 layers · 2 (K and V) · 640 tokens · 4096 · 2 bytes
    assert vf.kv_cache_bytes(llava, [640] * 32) == 335_544_320
    assert vf.kv_cache_bytes(llava, 640, bytes_per_element=1) == 335_544_320 // 2
    pruned = [64 + n for n in (97, 71, 52, 36) for _ in range(8)]
    assert vf.kv_cache_bytes(llava, pruned) == 8 * (161 + 135 + 116 + 100) * 2 * 4096 * 2
    qwen = vf.load_arch("qwen2-vl-7b")  # GQA: 4 KV heads · 128 = 512
    assert qwen.kv_width == 512
    assert vf.kv_cache_bytes(qwen, [640] * 28) == 28 * 2 * 640 * 512 * 2
    assert vf.kv_cache_bytes(tiny_arch(), [7], bytes_per_element=4) == 2 * 7 * 4 * 4


def test_argument_validation() -> None:
    arch = vf.load_arch("llava-1.5-7b")
    with pytest.raises(ValueError, match="one entry per LLM layer"):
        vf.prefill_flops(arch, visual_tokens_per_layer=[576] * 31)
    with pytest.raises(ValueError, match="text_tokens"):
        vf.prefill_flops(arch, visual_tokens_per_layer=576, text_tokens=-1)
    with pytest.raises(ValueError, match="batch_size"):
        vf.prefill_flops(arch, visual_tokens_per_layer=576, batch_size=0)
    with pytest.raises(ValueError, match="vision_tokens is required"):
        vf.prefill_flops(vf.load_arch("qwen2-vl-7b"), visual_tokens_per_layer=576)


# --------------------------------------------------------------------------- configs and helpers


@pytest.mark.parametrize("name", vf.SHIPPED_CONFIGS)
def test_every_shipped_config_loads(name: str) -> None:
    arch = vf.load_arch(name)
    assert arch.name == name
    assert (CONFIG_DIR / f"{name}.json").is_file()
    if arch.vit_tokens_per_crop is None:
        patches, tokens = qwen2_vl_image_tokens(672, 672)
        out = vf.prefill_flops(arch, visual_tokens_per_layer=tokens, vision_tokens=patches)
    else:
        out = vf.prefill_flops(arch, visual_tokens_per_layer=arch.image_features_per_crop)
    assert out.total > 0
    assert all(x > 0 for x in (out.vision, out.projector, out.lm_head, *out.llm_layers))
    assert vf.kv_cache_bytes(arch, [100] * arch.num_layers) > 0


def test_shipped_dimensions() -> None:
    l7, l13, nxt, qw = (
        vf.load_arch(n) for n in ("llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "qwen2-vl-7b")
    )
    assert (l7.num_layers, l7.hidden_size, l7.ffn_size, l7.kv_width) == (32, 4096, 11008, 4096)
    assert (l13.num_layers, l13.hidden_size, l13.ffn_size, l13.kv_width) == (40, 5120, 13824, 5120)
    assert (l7.vit_layers, l7.vit_hidden, l7.vit_mlp, l7.vit_tokens_per_crop) == (24, 1024, 4096, 577)
    assert nxt.family == "llava_next" and nxt.max_crops == 5 and nxt.ffn_size == 11008  # Vicuna-7B
    assert (qw.num_layers, qw.hidden_size, qw.num_kv_heads, qw.ffn_size) == (28, 3584, 4, 18944)
    assert (qw.vit_layers, qw.vit_hidden, qw.vit_mlp, qw.spatial_merge_size) == (32, 1280, 5120, 2)
    assert (qw.projector_in, qw.projector_out) == (5120, 3584)


@pytest.mark.parametrize("name", vf.SHIPPED_CONFIGS)
def test_shipped_configs_load_in_transformers(name: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    data = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    config = transformers.AutoConfig.for_model(**data)
    assert config.model_type == data["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert type(transformers.AutoConfig.from_pretrained(tmp_path)) is type(config)
    assert vf.ArchSpec.from_config(config, name=name) == vf.load_arch(name)


def test_load_from_path_folder_and_hub_alias(tmp_path: Path) -> None:
    src = CONFIG_DIR / "qwen2-vl-7b.json"
    (tmp_path / "config.json").write_text(src.read_text())
    by_folder = vf.load_arch(tmp_path)
    by_file = vf.load_arch(str(tmp_path / "config.json"))
    assert by_folder == replace(by_file, name=by_folder.name)
    assert replace(by_folder, name="qwen2-vl-7b") == vf.load_arch("qwen2-vl-7b")
    assert vf.load_arch("llava-hf/llava-1.5-7b-hf") == vf.load_arch("llava-1.5-7b")


def test_from_config_dict_nested_and_flat_qwen() -> None:
    flat = json.loads((CONFIG_DIR / "qwen2-vl-7b.json").read_text())
    text_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    text_keys += ("num_key_value_heads", "vocab_size")
    nested = {k: v for k, v in flat.items() if k not in text_keys}
    nested["text_config"] = {k: flat[k] for k in text_keys}
    assert vf.ArchSpec.from_config(nested) == vf.ArchSpec.from_config(flat)


@pytest.mark.parametrize("bad", ["llava-9b", "no/such/config.json", ""])
def test_unknown_names_raise_value_error_naming_the_value(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        vf.load_arch(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert "\n" not in message


def test_unreadable_or_unsupported_config_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json"):
        vf.load_arch(broken)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert'"):
        vf.load_arch(bert)


def test_llava_next_image_tokens() -> None:
    arch = vf.load_arch("llava-next-7b")
    assert llava_next_image_tokens(arch, 336, 1008) == (4, 576 + 24 * 72 + 24)  # 1x3 grid, no padding
    assert llava_next_image_tokens(arch, 500, 1000) == (3, 576 + 24 * 48 + 24)  # 1x2 grid
    # 1000x500 picks the 2x1 grid (48x24 features) with no unpadding either.
    assert llava_next_image_tokens(arch, 1000, 500) == (3, 576 + 48 * 24 + 48)
    # 600x800 picks 672x672, 48x48 features unpadded to 36 rows: 576 + 36·48 + 36
    assert llava_next_image_tokens(arch, 600, 800) == (5, 576 + 36 * 48 + 36)
    with pytest.raises(ValueError):
        llava_next_image_tokens(vf.load_arch("llava-1.5-7b"), 336, 336)


def test_qwen2_vl_image_tokens() -> None:
    assert qwen2_vl_image_tokens(672, 672) == (48 * 48, 24 * 24)
    assert qwen2_vl_image_tokens(700, 700) == (50 * 50, 25 * 25)  # rounded to 700 = 25·28
    assert qwen2_vl_image_tokens(224, 448, resize=False) == (16 * 32, 8 * 16)
    patches, tokens = qwen2_vl_image_tokens(3000, 4000)  # clamped to max_pixels = 28·28·1280
    assert patches * 14 * 14 <= 28 * 28 * 1280 and tokens == patches // 4
    assert qwen2_vl_resize(10, 10) == (56, 56)  # grown to min_pixels
    with pytest.raises(ValueError):
        qwen2_vl_image_tokens(100, 100, resize=False)
