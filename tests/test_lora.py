"""LoRA loading (`ldm.lora`): the reference files of ../shared/reference/lora (written by kohya's and diffusers'
own code for the tiny-sd2 fixture), the name map for SD 1.x / 2.x / XL, and synthetic kohya / LoCon / PEFT files
on SD 1.x and SDXL checked against diffusers' loader (`load_lora_weights` + `fuse_lora`; needs peft)."""
from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

import ldm
from common.errors import InputError
from ldm.denoisers.unet import UNetConfig, UNetModel
from ldm.formats.diffusers_keys import unet_from_original
from ldm.formats.original_configs import SD_V1, SD_V2
from ldm.formats.sgm import SDXL_BASE, SDXL_REFINER
from ldm.lora import lora_targets, read_lora
from ldm.lora.keys import diffusers_module_name, flat, unet_aliases, unet_block_names

from helpers import reference_dir, write_default_model_lora

WEIGHT = 0.7  # the reference cases' multiplier
FILES = {"lora_kohya": "unet_out_lora", "lora_kohya_fp16": "unet_out_lora_fp16", "lora_peft": "unet_out_lora",
         "lora_peft_noalpha": "unet_out_lora"}


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def sd2():
    ref = reference_dir("tiny-sd2")
    return ldm.load_model(ref / "model.safetensors", config=ref / "config.yaml")


@pytest.fixture(scope="module")
def cases():
    return load_file(reference_dir("lora") / "cases.safetensors")


def unet_out(model, cases) -> torch.Tensor:
    with torch.no_grad():
        return model.denoiser(cases["unet_x"], cases["unet_t"], cases["unet_context"])


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert [k for k, v in before.items() if not (after[k].dtype == v.dtype and torch.equal(after[k], v))] == []


# --- the reference files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FILES))
def test_reference_files_give_the_expected_unet_output_and_unload_restores_the_base(sd2, cases, name):
    base = unet_out(sd2, cases)
    close(base, cases["unet_out_base"], atol=1e-5)
    report = sd2.load_lora(reference_dir("lora") / f"{name}.safetensors", WEIGHT)
    try:
        assert (report.matched_keys, report.total_keys) == ((252, 252) if "kohya" in name else (168, 168))
        assert len(report.changed) == 84 and all(n.startswith("denoiser.") for n in report.changed)
        assert report.unmatched == [] and sd2.loras == (report,)
        out = unet_out(sd2, cases)
        close(out, cases[FILES[name]])  # measured: 2.2e-6 (fp32 and PEFT files), 2.8e-6 (fp16 file)
        if name == "lora_kohya_fp16":  # the README: within 1.2e-4 of the fp32 file's output (weights rounded)
            close(out, cases["unet_out_lora"], atol=2e-4)
    finally:
        assert sd2.unload_loras() == 84
    assert torch.equal(unet_out(sd2, cases), base) and sd2.loras == ()


def test_mapping_json_every_kohya_and_diffusers_name_lands_on_its_ldm_weight(sd2):
    rows = json.loads((reference_dir("lora") / "mapping.json").read_text())["files"]["lora_kohya.safetensors"]
    unet = lora_targets(sd2)["unet"]
    assert len(rows) == 84
    for row in rows:
        expected = "denoiser." + row["ldm"].removeprefix("model.diffusion_model.")
        assert str(unet[row["kohya"].removeprefix("lora_unet_")]) == expected, row["kohya"]
        assert str(unet[flat(row["diffusers"])]) == expected, row["diffusers"]
    # A1111's hard-coded indices (SD's 2 ResBlocks per level) send 24 modules of this R=1 fixture to blocks that
    # do not exist and 12 to other layers of the same shapes
    wrong = [r for r in rows if r["a1111_formula_gives"] != r["ldm"]]
    assert len(wrong) == 36


def test_worked_examples_merged_weights(sd2, cases):
    sd2.load_lora(reference_dir("lora") / "lora_kohya.safetensors", WEIGHT)
    try:
        state = sd2.state_dict()
        merged = {k.removeprefix("merged_lora."): v for k, v in cases.items() if k.startswith("merged_lora.")}
        assert len(merged) == 3
        for key, expected in merged.items():  # float64 merge cast to float32 vs ours in float32: ~1 ulp
            close(state["denoiser." + key.removeprefix("model.diffusion_model.")], expected, atol=1e-6)
    finally:
        sd2.unload_loras()


def meta_unet(params: dict) -> UNetModel:
    with torch.device("meta"):
        return UNetModel(UNetConfig.from_original({"use_spatial_transformer": True, **params}))


UNETS = {"sd1": SD_V1["model"]["params"]["unet_config"]["params"],
         "sd2": SD_V2["model"]["params"]["unet_config"]["params"],
         "sdxl-base": SDXL_BASE["model"]["params"]["network_config"]["params"],
         "sdxl-refiner": SDXL_REFINER["model"]["params"]["network_config"]["params"]}


def test_full_size_sd1_worked_examples():
    """The README's SD1 table (names from kohya's create_network on v1-inference.yaml, R=2, [1,2,4,4])."""
    unet = meta_unet(UNETS["sd1"])
    table = unet_aliases(unet, unet.config, "")
    shapes = {k: list(v.shape) for k, v in unet.state_dict().items()}
    examples = {
        "down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q": ("input_blocks.2.1.transformer_blocks.0.attn1.to_q.weight", [320, 320]),
        "mid_block_attentions_0_proj_in": ("middle_block.1.proj_in.weight", [1280, 1280, 1, 1]),
        "up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2": ("output_blocks.11.1.transformer_blocks.0.ff.net.2.weight", [320, 1280]),
        "up_blocks_1_resnets_2_conv1": ("output_blocks.5.0.in_layers.2.weight", [1280, 1920, 3, 3]),
        "down_blocks_1_resnets_0_conv_shortcut": ("input_blocks.4.0.skip_connection.weight", [640, 320, 1, 1]),
        "down_blocks_1_resnets_0_time_emb_proj": ("input_blocks.4.0.emb_layers.1.weight", [640, 1280]),
        "down_blocks_1_downsamplers_0_conv": ("input_blocks.6.0.op.weight", [640, 640, 3, 3]),
        "up_blocks_0_upsamplers_0_conv": ("output_blocks.2.1.conv.weight", [1280, 1280, 3, 3]),
        "up_blocks_1_upsamplers_0_conv": ("output_blocks.5.2.conv.weight", [1280, 1280, 3, 3])}
    for kohya, (key, shape) in examples.items():
        assert str(table[kohya]) == key and shapes[key] == shape, kohya


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_names_agree_with_the_diffusers_folder_map(name):
    """Every UNet weight's diffusers name, from the config (`unet_block_names`), is the one the diffusers-folder
    reader/writer gives (`ldm.formats.diffusers_keys`), for full-size SD 1.x, 2.x, SDXL base and refiner (per-level
    depths, levels without attention)."""
    unet = meta_unet(UNETS[name])
    blocks = unet_block_names(unet.config)
    keys = {"model.diffusion_model." + k: None for k, v in unet.state_dict().items() if v.ndim >= 2}
    theirs = unet_from_original(keys, layers_per_block=unet.config.num_res_blocks)
    ours = [diffusers_module_name(k.removeprefix("model.diffusion_model.").removesuffix(".weight"), blocks) + ".weight"
            for k in keys]
    assert ours == list(theirs)


# --- several files, dtypes, errors ------------------------------------------------------------------------------

def test_several_loras_stack_and_unload_restores_the_base_bit_exactly(sd2, cases):
    before, base = weights(sd2), unet_out(sd2, cases)
    ref = reference_dir("lora")
    first = sd2.load_lora(ref / "lora_kohya.safetensors", 0.4)
    second = sd2.load_lora(ref / "lora_peft.safetensors", 0.3)  # the same LoRA: 0.4 + 0.3 = the cases' 0.7
    assert sd2.loras == (first, second) and "0.4" in str(first)
    close(unet_out(sd2, cases), cases["unet_out_lora"])
    sd2.unload_loras()
    assert_same_weights(sd2, before)
    assert torch.equal(unet_out(sd2, cases), base)


def test_a_half_precision_model_merges_in_float32_and_unloads_bit_exactly(cases):
    ref = reference_dir("tiny-sd2")
    model = ldm.load_model(ref / "model.safetensors", config=ref / "config.yaml", dtype=torch.float16)
    before = weights(model)
    model.load_lora(reference_dir("lora") / "lora_kohya_fp16.safetensors", WEIGHT)
    assert model.denoiser.input_blocks[1][1].proj_in.weight.dtype == torch.float16
    close(unet_out(model, cases).float(), cases["unet_out_lora_fp16"], atol=3e-2)  # fp16 activations
    model.unload_loras()
    assert_same_weights(model, before)


def test_fused_qkv_projections_see_the_merged_weights(sd2, cases):
    ref = reference_dir("lora")
    sd2.fuse_qkv_projections()
    try:
        with torch.inference_mode():
            unet_out(sd2, cases)  # makes the fused copies from the base weights
            sd2.load_lora(ref / "lora_kohya.safetensors", WEIGHT)
            close(unet_out(sd2, cases), cases["unet_out_lora"])
            sd2.unload_loras()
            close(unet_out(sd2, cases), cases["unet_out_base"], atol=1e-5)
    finally:
        sd2.unfuse_qkv_projections()
        sd2.unload_loras()


def with_extra(tmp_path, extra: dict[str, torch.Tensor], drop: tuple[str, ...] = ()) -> str:
    tensors = {k: v for k, v in load_file(reference_dir("lora") / "lora_kohya.safetensors").items() if k not in drop}
    path = tmp_path / "lora.safetensors"
    save_file({**tensors, **extra}, path)
    return path


def test_partial_files_are_an_error_naming_the_keys_unless_allowed(sd2, cases, tmp_path):
    before = weights(sd2)
    extra = {"lora_unet_down_blocks_5_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
             "lora_unet_down_blocks_5_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32),
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 4)}
    path = with_extra(tmp_path, extra)
    with pytest.raises(InputError, match=r"2 of 86 modules .*lora_unet_down_blocks_5_attentions_0_proj_in.*"
                                         r"allow_partial=True"):
        sd2.load_lora(path, WEIGHT)
    assert_same_weights(sd2, before)
    with pytest.warns(UserWarning, match="lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
        report = sd2.load_lora(path, WEIGHT, allow_partial=True)
    try:
        assert report.matched_keys == 252 and report.total_keys == 256
        assert report.unmatched == ["lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                                    "lora_unet_down_blocks_5_attentions_0_proj_in"]
        close(unet_out(sd2, cases), cases["unet_out_lora"])
    finally:
        sd2.unload_loras()


def test_text_encoder_keys_on_a_model_without_one_say_so(sd2, tmp_path):
    path = with_extra(tmp_path, {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
                                 "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(128, 4)})
    with pytest.raises(InputError, match="parts for te, which this model"):
        sd2.load_lora(path)


def test_shape_mismatch_names_the_key_and_both_shapes(sd2, tmp_path):
    before = weights(sd2)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    path = with_extra(tmp_path, {f"{name}.lora_down.weight": torch.zeros(4, 768)})
    with pytest.raises(InputError, match=rf"{name} makes a weight of shape \[64, 768\] .* has shape \[64, 32\]\. "
                                         r"The file looks made for SD 1\.x .*context width 768"):
        sd2.load_lora(path, WEIGHT, allow_partial=True)
    assert_same_weights(sd2, before)


def test_files_that_are_not_lora_or_of_unsupported_kinds(sd2, tmp_path):
    with pytest.raises(InputError, match="none of its .* keys match .* is it a LoRA file"):
        sd2.load_lora(reference_dir("tiny-sd2") / "model.safetensors")
    loha = {f"lora_unet_mid_block_attentions_0_proj_in.hada_w{i}_{ab}": torch.zeros(4, 4) for i in (1, 2) for ab in "ab"}
    with pytest.raises(InputError, match="LoHa is not supported"):
        sd2.load_lora(with_extra(tmp_path, loha))
    dora = {"lora_unet_mid_block_attentions_0_proj_in.dora_scale": torch.ones(1, 64)}
    with pytest.raises(InputError, match="mid_block_attentions_0_proj_in.dora_scale: DoRA is not supported"):
        sd2.load_lora(with_extra(tmp_path, dora))
    half = ("lora_unet_mid_block_attentions_0_proj_in.lora_up.weight",)
    with pytest.raises(InputError, match="lora_unet_mid_block_attentions_0_proj_in has no up tensor"):
        sd2.load_lora(with_extra(tmp_path, {}, drop=half))
    nan = {"lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.full((64, 4), float("nan"))}
    with pytest.raises(InputError, match="NaN"):
        sd2.load_lora(with_extra(tmp_path, nan))
    for bad in (float("nan"), float("inf"), "1"):
        with pytest.raises(InputError, match="finite number"):
            sd2.load_lora(reference_dir("lora") / "lora_kohya.safetensors", bad)
    with pytest.raises(InputError, match="not found"):
        sd2.load_lora(tmp_path / "missing.safetensors")
    assert sd2.loras == ()


def test_peft_alpha_comes_from_the_header_with_per_module_patterns(tmp_path):
    tensors = load_file(reference_dir("lora") / "lora_peft_noalpha.safetensors")
    metadata = {"unet.r": 4, "unet.lora_alpha": 8.0, "unet.alpha_pattern": {"mid_block.attentions.0.proj_in": 2.0}}
    save_file(tensors, tmp_path / "a.safetensors", metadata={"lora_adapter_metadata": json.dumps(metadata)})
    scales = {m.path: m.scale for m in read_lora(tmp_path / "a.safetensors").modules}
    assert scales["down_blocks.0.attentions.0.proj_in"] == 2.0 and scales["mid_block.attentions.0.proj_in"] == 0.5
    kohya = {m.name: m.scale for m in read_lora(reference_dir("lora") / "lora_kohya.safetensors").modules}
    assert set(kohya.values()) == {0.5}
    assert {m.scale for m in read_lora(reference_dir("lora") / "lora_peft_noalpha.safetensors").modules} == {1.0}


# --- synthetic files checked against diffusers' loader (SD 1.x and SDXL: UNet, LoCon, both text encoders) -------

# The modules kohya targets with LoCon (conv_dim): transformers' linears, ResBlocks' convs, time projection and
# shortcut, and the resamplers; in diffusers names (SD 1.x/2.x files) and sgm names (SDXL files).
KOHYA_UNET = (r"(transformer_blocks_\d+_(attn[12]_to_(q|k|v|out_0)|ff_net_0_proj|ff_net_2)|proj_in|proj_out"
              r"|resnets_\d+_(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers_0_conv"
              r"|\d+_\d+_(in_layers_2|out_layers_3|skip_connection|emb_layers_1|op|conv))$")
KOHYA_TEXT = r"text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$"


def module_names(model, component: str, pattern: str, roots: tuple[str, ...]) -> list[str]:
    """The flattened names of `component` that start with one of `roots` (one naming: diffusers' or sgm's UNet
    blocks, HF CLIP's text_model) and end as `pattern` says."""
    return sorted(name for name in lora_targets(model)[component]
                  if name.startswith(roots) and re.search(pattern, name))


DIFFUSERS_BLOCKS, SGM_BLOCKS = ("down_blocks", "mid_block", "up_blocks"), ("input_blocks", "middle_block", "output_blocks")


def kohya_file(path, model, parts: dict[str, tuple[str, list[str]]], seed: int) -> None:
    """A kohya LoRA file of the modules of `parts` (kohya prefix -> (our component, flattened names)) as kohya
    writes one: rank 4 and alpha 2 (scale 0.5), LoCon's 3x3 convs rank 2 and alpha 1 (conv_dim=2, conv_alpha=1),
    every tensor `randn * 0.1` as in the reference files."""
    g, tensors, state, targets = torch.Generator().manual_seed(seed), {}, model.state_dict(), lora_targets(model)
    for prefix, (component, names) in parts.items():
        for name in names:
            target = targets[component][name]
            shape = state[target.parameter].shape
            out = shape[0] if target.rows is None else target.rows[1] - target.rows[0]
            conv3 = len(shape) == 4 and shape[-1] == 3
            rank = 2 if conv3 else 4
            tensors[f"{prefix}{name}.lora_down.weight"] = torch.randn(rank, *shape[1:], generator=g) * 0.1
            tensors[f"{prefix}{name}.lora_up.weight"] = torch.randn(out, rank, *([1, 1] if len(shape) == 4 else []),
                                                                    generator=g) * 0.1
            tensors[f"{prefix}{name}.alpha"] = torch.tensor(1.0 if conv3 else 2.0)
    save_file(tensors, path)


def peft_required():
    pytest.importorskip("diffusers")
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (a test-only peer)")


def diffusers_fused(pipe, path, weight: float) -> None:
    """diffusers' way: load the file as an adapter, then merge it at `weight` (its output is the reference)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(path), adapter_name="lora")
        pipe.fuse_lora(lora_scale=weight)


@pytest.fixture(scope="module")
def sdxl():
    from test_sdxl import tiny_sdxl_config
    return ldm.load_model(reference_dir("tiny-sdxl") / "model.safetensors", config=tiny_sdxl_config())


def diffusers_sdxl():
    """tiny-sdxl as diffusers converts it (the fixture README's cross-check): UNet and both text towers."""
    import diffusers
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    ref = reference_dir("tiny-sdxl")
    raw, checkpoint = yaml.safe_load((ref / "config.yaml").read_text()), load_file(ref / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = create_unet_diffusers_config_from_ldm(raw, checkpoint)
    config.update(addition_embed_type="text_time", addition_time_embed_dim=8, class_embed_type=None)
    unet = diffusers.UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    from test_diffusers_folders import tiny_sdxl_text_towers
    clip_l, big_g = tiny_sdxl_text_towers(raw, checkpoint)
    return diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=clip_l, text_encoder_2=big_g, tokenizer=None,
                                               tokenizer_2=None, unet=unet, scheduler=diffusers.EulerDiscreteScheduler())


@torch.no_grad()
def sdxl_outputs(model, cases) -> dict[str, torch.Tensor]:
    clip_l, big_g = model.text_encoder.towers
    hidden_2, pooled = big_g.encode_tokens(cases["tokens_open_clip"], pooled=True)
    return {"unet": model.denoiser(cases["unet_x"], cases["unet_t"], cases["cond_crossattn"], y=cases["cond_vector"]),
            "te1": clip_l.encode_tokens(cases["tokens_clip_l"])[0], "te2": hidden_2, "pooled": pooled}


@torch.no_grad()
def diffusers_sdxl_outputs(pipe, cases) -> dict[str, torch.Tensor]:
    time_ids = torch.cat([cases[f"in_{name}"] for name in ("original_size_as_tuple", "crop_coords_top_left",
                                                           "target_size_as_tuple")], dim=1).float()
    pooled_width = pipe.text_encoder_2.config.projection_dim
    unet = pipe.unet(cases["unet_x"], cases["unet_t"], encoder_hidden_states=cases["cond_crossattn"],
                     added_cond_kwargs={"text_embeds": cases["cond_vector"][:, :pooled_width], "time_ids": time_ids})
    big_g = pipe.text_encoder_2(cases["tokens_open_clip"], output_hidden_states=True)
    return {"unet": unet.sample, "te1": pipe.text_encoder(cases["tokens_clip_l"], output_hidden_states=True).hidden_states[-2],
            "te2": big_g.hidden_states[-2], "pooled": big_g.text_embeds}


def test_sdxl_kohya_and_peft_files_on_the_unet_and_both_text_encoders_match_diffusers(sdxl, tmp_path):
    """A kohya SDXL file (sgm UNet names as kohya's SDXL trainer writes them, LoCon convs with their own alpha,
    `lora_te1_` / `lora_te2_`) and the PEFT file diffusers writes from it (`save_lora_weights`, alphas in the
    header, LoCon's in alpha_pattern) give diffusers' fused outputs: UNet, CLIP-L, bigG hidden states and pooled."""
    peft_required()
    from peft.utils import get_peft_model_state_dict

    cases = load_file(reference_dir("tiny-sdxl") / "cases.safetensors")
    kohya = tmp_path / "sdxl_kohya.safetensors"
    kohya_file(kohya, sdxl, {"lora_unet_": ("unet", module_names(sdxl, "unet", KOHYA_UNET, SGM_BLOCKS)),
                             "lora_te1_": ("te1", module_names(sdxl, "te1", KOHYA_TEXT, ("text_model",))),
                             "lora_te2_": ("te2", module_names(sdxl, "te2", KOHYA_TEXT, ("text_model",)))}, seed=1)
    pipe = diffusers_sdxl()
    base = sdxl_outputs(sdxl, cases)
    diffusers_fused(pipe, kohya, WEIGHT)
    expected = diffusers_sdxl_outputs(pipe, cases)
    pipe.unfuse_lora()
    parts = ("unet", "text_encoder", "text_encoder_2")
    layers = {f"{part}_lora_layers": get_peft_model_state_dict(getattr(pipe, part), adapter_name="lora") for part in parts}
    metadata = {f"{part}_lora_adapter_metadata": getattr(pipe, part).peft_config["lora"].to_dict() for part in parts}
    assert metadata["unet_lora_adapter_metadata"]["alpha_pattern"]  # the LoCon convs' alpha 1 (the rest: 2)
    type(pipe).save_lora_weights(tmp_path, weight_name="sdxl_peft.safetensors", **layers, **metadata)
    for path in (kohya, tmp_path / "sdxl_peft.safetensors"):
        report = sdxl.load_lora(path, WEIGHT)
        try:
            assert report.matched_keys == report.total_keys == len(load_file(path)) and not report.unmatched
            assert {name.split(".")[0] + (name.split(".")[2] if "embedders" in name else "") for name in report.changed} \
                == {"denoiser", "text_encoder0", "text_encoder1"}
            ours = sdxl_outputs(sdxl, cases)
            for name, value in ours.items():  # measured: UNet 1.8e-6, CLIP-L 0, bigG 1.3e-6, pooled 8e-7
                close(value, expected[name])
                assert (value - base[name]).abs().max() > 0.05, name  # the LoRA changes every output
        finally:
            sdxl.unload_loras()
    for name, value in sdxl_outputs(sdxl, cases).items():
        assert torch.equal(value, base[name]), name


def test_sd1_kohya_file_with_locon_and_text_encoder_matches_diffusers(tmp_path):
    """SD 1.x layout (diffusers' tiny SD 1.x folder: conv proj_in with 4-D LoRA tensors, 2 ResBlocks per level, no
    attention at the last level, so an upsampler at `.1.conv`) and its CLIP text encoder, which our model keeps in
    open_clip layout: q / k / v land on rows of in_proj_weight. Also the LoCon merge equals kohya's conv form."""
    peft_required()
    import diffusers
    from test_diffusers_folders import inputs, save_sd_folder

    folder = tmp_path / "sd1"
    unet, _, text = save_sd_folder(folder, 1)
    model = ldm.load_model(folder)
    path = tmp_path / "sd1_kohya.safetensors"
    kohya_file(path, model, {"lora_unet_": ("unet", module_names(model, "unet", KOHYA_UNET, DIFFUSERS_BLOCKS)),
                             "lora_te_": ("te", module_names(model, "te", KOHYA_TEXT, ("text_model",)))}, seed=2)
    lora = load_file(path)
    assert lora["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].ndim == 4
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight" in lora
    x, t, context, _ = inputs()
    tokens = torch.randint(0, 2560, (2, 77), generator=torch.Generator().manual_seed(3))
    tokens[:, 0], tokens[:, 20:] = 2560, 2561
    pipe = diffusers.StableDiffusionPipeline(vae=None, text_encoder=text, tokenizer=None, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    diffusers_fused(pipe, path, WEIGHT)
    conv = "denoiser.input_blocks.1.0.in_layers.2.weight"
    before = model.state_dict()[conv].clone()
    report = model.load_lora(path, WEIGHT)
    assert report.matched_keys == report.total_keys == len(lora) and not report.unmatched
    assert "text_encoder.model.transformer.resblocks.0.attn.in_proj_weight[32:64]" in report.changed
    with torch.no_grad():
        close(model.denoiser(x, t, context), unet(x, t, encoder_hidden_states=context).sample)
        close(model.text_encoder.encode_tokens(tokens)[0], text(tokens).last_hidden_state)
    down, up = (lora[f"lora_unet_down_blocks_0_resnets_0_conv1.lora_{n}.weight"] for n in ("down", "up"))
    kohya_delta = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)  # kohya's merge_to for 3x3 LoCon
    close(model.state_dict()[conv] - before, WEIGHT * (1.0 / 2) * kohya_delta, atol=1e-6)


def test_loras_for_another_family_name_it(sd2, sdxl, tmp_path):
    path = tmp_path / "sdxl_kohya.safetensors"
    kohya_file(path, sdxl, {"lora_unet_": ("unet", module_names(sdxl, "unet", KOHYA_UNET, SGM_BLOCKS)),
                            "lora_te2_": ("te2", module_names(sdxl, "te2", KOHYA_TEXT, ("text_model",)))}, seed=4)
    before = weights(sd2)
    with pytest.raises(InputError, match="made for SDXL .* this model is a model with cross-attention width 32"):
        sd2.load_lora(path, allow_partial=True)
    assert_same_weights(sd2, before)
    before = weights(sdxl)
    with pytest.raises(InputError, match=r"attn2_to_k makes a weight of shape \[64, 32\] .* has shape \[64, 48\]\. "
                                         r"The file looks made for another model .*context width 32.* SDXL"):
        sdxl.load_lora(reference_dir("lora") / "lora_kohya.safetensors", allow_partial=True)
    assert_same_weights(sdxl, before)


def test_txt2img_lora_flag_and_prompt_tag_merge_and_record_hashes(tmp_path, monkeypatch, capsys):
    import json
    import runpy
    import sys
    from pathlib import Path

    from PIL import Image
    (tmp_path / "loras").mkdir()
    write_default_model_lora(tmp_path / "loras" / "strong.safetensors")

    def txt2img(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["tools/txt2img.py", "--steps", "2", "--no-grid", *args])
        try:
            runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "txt2img.py"), run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, _, err = txt2img("--prompt", "red apple", "--outdir", str(tmp_path / "plain"))
    assert code == 0, err
    code, out, err = txt2img("--prompt", "red apple <lora:strong:0.8>", "--lora-dir", str(tmp_path / "loras"),
                             "--outdir", str(tmp_path / "tag"))
    assert code == 0, err
    assert "LoRA strong.safetensors" in out and "at weight 0.8" in out
    tagged = Image.open(tmp_path / "tag" / "samples" / "00000.png")
    assert tagged.text["parameters"].startswith("red apple\n")  # the tag is not part of the prompt text
    assert "Lora hashes: \"strong: " in tagged.text["parameters"]
    assert json.loads(tagged.text["ldm"])["lora_hashes"].startswith("strong: ")
    plain = Image.open(tmp_path / "plain" / "samples" / "00000.png")
    assert tagged.tobytes() != plain.tobytes()
    code, _, err = txt2img("--prompt", "red apple", "--lora", f"{tmp_path / 'loras' / 'strong.safetensors'}:0.8",
                           "--outdir", str(tmp_path / "flag"))
    assert code == 0, err
    assert Image.open(tmp_path / "flag" / "samples" / "00000.png").tobytes() == tagged.tobytes()
    code, _, err = txt2img("--prompt", "red apple <lora:missing:1>", "--lora-dir", str(tmp_path / "loras"),
                           "--outdir", str(tmp_path / "bad"))
    assert code == 2 and "no missing.safetensors" in err and "Traceback" not in err
