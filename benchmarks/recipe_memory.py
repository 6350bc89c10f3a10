"""Device memory the GPU recipes need for their weights and optimiser, estimated from parameter counts: each
network built on torch's meta device from its published architecture (no weights downloaded), the LoRA adapters
counted on the recipe's own target modules, and the bytes per parameter of what cmkit holds for the recipe:

    frozen teacher network and text encoders  train.weight_dtype (2 bytes in bf16 / fp16); the text encoders only
                                              while the latent cache is built, then on the CPU (latent.placement)
    VAE                                       float32 (4)
    trained weights                           float32 (4) + gradients (4) + AdamW moments (8; adamw8bit: 2)
    output EMAs, the LCM target network       float32 (4 each; train.ema_device = "cpu" moves EMAs off the device)
    rCM's and DMD2's fake score               a trained float32 copy of the teacher network (16); a LoRA kind's
                                              is a second rank-64 adapter on the frozen teacher (16 per parameter)

Activations come on top and scale with the per-device micro-batch (train.micro_batch_size, gradient checkpointing);
they are not estimated here. Per device under DDP; train.fsdp divides the trained weights' and rCM's fake score's
shares by the processes.
"Set-up" is the larger of what the run holds before its first step in its two turns: the text encoders and the VAE
while the latent cache is built (or checked), the network stays on the CPU; then the encoders off and the network on,
with the student's and the fake score's fresh float32 weights copied from it. "Training" is what it holds from its
first step on; the device needs the larger of the two, plus activations.
    python benchmarks/recipe_memory.py > benchmarks/results/recipe-memory.md"""

from __future__ import annotations

import torch
from torch import nn

GB = 1e9


def _count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _flux2_klein_4b() -> dict:
    """FLUX.2 klein 4B (black-forest-labs/FLUX.2-klein-base-4B, Flux2KleinPipeline): the transformer's config as
    diffusers' scripts/convert_flux2_to_diffusers.py gives it for "klein-4b" (5 double and 20 single blocks, 24 heads
    of 128, joint_attention_dim 7680 = 3 x 2560); the text encoder Qwen3-4B (the klein folder's text_encoder/
    config.json: hidden 2560, 36 layers, MLP 9728, 32 heads with 8 key-value heads of 128, vocabulary 151936, tied
    embeddings); the VAE AutoencoderKLFlux2 with diffusers' defaults (what the conversion script builds)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from cmkit.core.memory import lora_params
    from cmkit.latent import FAMILIES

    with torch.device("meta"):
        net = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20,
                                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
                                      timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                                      guidance_embeds=False)
        text = Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                                            num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                                            head_dim=128, tie_word_embeddings=True))
        vae = AutoencoderKLFlux2()
    targets = FAMILIES["Flux2KleinPipeline"].lora_targets
    return {"net": _count(net), "text": _count(text), "vae": _count(vae), "lora64": lora_params(net, targets, 64)}


def _qwen_image() -> dict:
    """Qwen-Image (Qwen/Qwen-Image, QwenImagePipeline): the transformer's published transformer/config.json (60
    double-stream blocks, 24 heads of 128, joint_attention_dim 3584, in_channels 64, patch 2; diffusers' defaults
    too: 20.43 B); the text encoder Qwen2.5-VL-7B-Instruct (its config.json: hidden 3584, 28 layers, MLP 18944, 28
    heads with 4 key-value heads, vocabulary 152064, untied head; the vision tower depth 32, hidden 1280, MLP 3420, 16
    heads, out 3584), whole as the pipeline loads it; the VAE AutoencoderKLQwenImage with diffusers' defaults (the
    published vae/config.json's)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from cmkit.core.memory import lora_params
    from cmkit.latent import FAMILIES

    with torch.device("meta"):
        net = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                                          attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                                          axes_dims_rope=(16, 56, 56))
        text = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                         "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064},
            vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                           "out_hidden_size": 3584},
            vocab_size=152064, hidden_size=3584, tie_word_embeddings=False))
        vae = AutoencoderKLQwenImage()
    targets = FAMILIES["QwenImagePipeline"].lora_targets
    return {"net": _count(net), "text": _count(text), "vae": _count(vae), "lora64": lora_params(net, targets, 64)}


def _sana_1600m() -> dict:
    """Sana 1.6B (Efficient-Large-Model/Sana_1600M_1024px_diffusers, SanaPipeline): the transformer's published
    transformer/config.json (20 layers, 70 heads of 32, cross-attention 20 heads of 112 over 2240, caption_channels
    2304, mlp_ratio 2.5, patch 1, 32 latent channels: diffusers' SanaTransformer2DModel defaults); the text encoder
    gemma-2-2b-it's decoder, Gemma2Model, as diffusers' scripts/convert_sana_to_diffusers.py builds it (hidden 2304,
    26 layers, MLP 9216, 8 heads with 4 key-value heads of 256, vocabulary 256000); the VAE AutoencoderDC
    dc-ae-f32c32-sana-1.0 as diffusers' scripts/convert_dcae_to_diffusers.py configures it."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    from cmkit.core.memory import lora_params
    from cmkit.latent import FAMILIES

    with torch.device("meta"):
        net = SanaTransformer2DModel()
        text = Gemma2Model(Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                        head_dim=256))
        vae = AutoencoderDC(latent_channels=32, encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                            decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                            encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                            decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                            encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                            decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                            encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
                            downsample_block_type="conv", upsample_block_type="interpolate",
                            decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    targets = FAMILIES["SanaPipeline"].lora_targets
    return {"net": _count(net), "text": _count(text), "vae": _count(vae), "lora64": lora_params(net, targets, 64)}


def _z_image(vae16: int) -> dict:
    """Z-Image (Tongyi-MAI/Z-Image, 6 B): diffusers' ZImageTransformer2DModel defaults are its published
    transformer/config.json (dim 3840, 30 layers plus 2 noise and 2 context refiner layers, 30 heads, caption features
    2560); its text encoder is Qwen3-4B's body (Qwen3Model, Qwen/Qwen3-4B's config.json: hidden 2560, 36 layers, 32
    heads, 8 KV heads, head 128, intermediate 9728); its VAE the Flux one."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from cmkit.core.memory import lora_params
    from cmkit.latent import FAMILIES

    with torch.device("meta"):
        net = ZImageTransformer2DModel()
        text = Qwen3Model(Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                      tie_word_embeddings=True))
    targets = FAMILIES["ZImagePipeline"].lora_targets
    return {"net": _count(net), "text": _count(text), "vae": vae16, "lora64": lora_params(net, targets, 64)}


def _wan() -> dict[str, dict]:
    """Wan 2.1 T2V 1.3B and 14B and Wan 2.2 TI2V-5B (WanPipeline; the Wan-AI/*-Diffusers folders): the transformers'
    published transformer/config.json (1.3B: 30 layers, 12 heads of 128, FFN 8960; 14B: 40 layers, 40 heads of 128,
    FFN 13824 (diffusers' defaults); TI2V-5B: 30 layers, 24 heads of 128, FFN 14336, 48 latent channels); the
    text encoder UMT5-XXL's encoder (d_model 4096, 24 layers, 64 heads of 64, FFN 10240 gated-GELU, vocabulary
    256384); the VAEs AutoencoderKLWan with diffusers' defaults (2.1: base 96, 16 latent channels) and Wan 2.2's
    (base 160, decoder base 256, 48 latent channels, residual, 2x2 patches). A flow-map student is
    AnyFlowTransformer3DModel, the 1.3B backbone with its second (target-time) embedding."""
    from diffusers import AnyFlowTransformer3DModel, AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from cmkit.core.memory import lora_params
    from cmkit.latent import FAMILIES

    small = {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}
    with torch.device("meta"):
        nets = {"wan21-1.3b": WanTransformer3DModel(**small), "wan21-14b": WanTransformer3DModel(),
                "wan22-ti2v-5b": WanTransformer3DModel(num_attention_heads=24, ffn_dim=14336, num_layers=30,
                                                       in_channels=48, out_channels=48)}
        anyflow = _count(AnyFlowTransformer3DModel(**small))
        text = _count(UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240,
                                                  num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")))
        vae21 = _count(AutoencoderKLWan())
        vae22 = _count(AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True,
                                        in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16))
    targets = FAMILIES["WanPipeline"].lora_targets
    out = {name: {"net": _count(net), "text": text, "vae": vae22 if name.startswith("wan22") else vae21,
                  "lora64": lora_params(net, targets, 64)} for name, net in nets.items()}
    out["wan21-1.3b-flow-map"] = {**out["wan21-1.3b"], "student": anyflow}
    return out


def networks() -> dict[str, dict]:
    """Parameter counts of each family's networks, built on the meta device from their published configs."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from cmkit.core.memory import lora_params
    from cmkit.latent import FAMILIES

    with torch.device("meta"):
        clip_l = _count(CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                     num_attention_heads=12, projection_dim=768)))
        clip_g = _count(CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu")))
        t5 = _count(T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                                            vocab_size=32128, feed_forward_proj="gated-gelu")))
        vae4 = _count(AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                                    block_out_channels=(128, 256, 512, 512),
                                    down_block_types=("DownEncoderBlock2D",) * 4,
                                    up_block_types=("UpDecoderBlock2D",) * 4))
        vae16 = _count(AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                                     block_out_channels=(128, 256, 512, 512),
                                     down_block_types=("DownEncoderBlock2D",) * 4,
                                     up_block_types=("UpDecoderBlock2D",) * 4))
        sd15 = UNet2DConditionModel(cross_attention_dim=768)
        sdxl = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                   "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, use_linear_projection=True)
        sd35m = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                      attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                      caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                      pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                                      qk_norm="rms_norm")
        flux = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                      pooled_projection_dim=768, guidance_embeds=True)
    # the targets a recipe gets when it names none: its family's
    unet_targets, flow_targets = FAMILIES["StableDiffusionPipeline"].lora_targets, FAMILIES["FluxPipeline"].lora_targets
    return {
        "sd15": {"net": _count(sd15), "text": clip_l, "vae": vae4, "lora64": lora_params(sd15, unet_targets, 64)},
        "sdxl": {"net": _count(sdxl), "text": clip_l + clip_g, "vae": vae4,
                 "lora64": lora_params(sdxl, unet_targets, 64)},
        "sd35m": {"net": _count(sd35m), "text": clip_l + clip_g + t5, "vae": vae16,
                  "lora64": lora_params(sd35m, flow_targets, 64)},
        "flux": {"net": _count(flux), "text": clip_l + t5, "vae": vae16,
                 "lora64": lora_params(flux, flow_targets, 64)},
        "z_image": _z_image(vae16),
        "flux2-klein-4b": _flux2_klein_4b(),
        "qwen-image": _qwen_image(),
        "sana-1.6b": _sana_1600m(),
        **_wan(),
    }


# recipe -> (family, trained: "lora" | "full", extra float32 copies of the student (EMAs + target),
#            fake score: False | True (a trained copy of the network) | "lora" (an adapter of rank 64 on it))
RECIPES = {
    "sd15-lcm-lora": ("sd15", "lora", 0, False),
    "sd15-lcm": ("sd15", "full", 2, False),        # EMA 0.95 and the target network
    "sdxl-lcm-lora": ("sdxl", "lora", 0, False),
    "sd35m-flow-cd-lora": ("sd35m", "lora", 0, False),
    "flux-dev-flow-cd-lora": ("flux", "lora", 0, False),
    "sd35m-rcm": ("sd35m", "full", 1, True),        # EMA 0.9999 and the fake score
    "flux-dev-rcm": ("flux", "full", 1, True),
    "z-image-flow-cd": ("z_image", "full", 1, False),  # the target network (target_ema 0.95)
    "flux2-klein-flow-cd-lora": ("flux2-klein-4b", "lora", 0, False),
    "qwen-image-flow-cd-lora": ("qwen-image", "lora", 0, False),
    "sana-1.6b-scd": ("sana-1.6b", "full", 1, False),  # EMA 0.9999; sCD's target is the online network
    "wan21-1.3b-flow-cd-lora": ("wan21-1.3b", "lora", 0, False),
    "wan21-1.3b-rcm": ("wan21-1.3b", "full", 1, True),
    "wan21-1.3b-flow-map": ("wan21-1.3b-flow-map", "full", 1, False),  # EMA 0.9999; the JVP's network the student's
    "wan21-14b-flow-cd-lora": ("wan21-14b", "lora", 0, False),
    "wan21-14b-rcm": ("wan21-14b", "full", 0, True),  # its EMA held on the host (train.ema_device = "cpu")
    "wan22-ti2v-5b-flow-cd-lora": ("wan22-ti2v-5b", "lora", 0, False),
    # DMD2: the fake score a trained float32 copy of the teacher (full kinds) or a second adapter of the student's
    # rank on the frozen teacher ("lora"); the GAN head's few hundred thousand parameters are not counted
    "sd15-dmd2": ("sd15", "full", 0, True),
    "sdxl-dmd2-lora": ("sdxl", "lora", 0, "lora"),
    "sd35m-dmd2": ("sd35m", "full", 1, True),      # EMA 0.9999
    "flux-dev-dmd2-lora": ("flux", "lora", 0, "lora"),
}


def estimate(counts: dict, trained: str, copies: int, fake: bool, weight_bytes: int = 2,
             moment_bytes: int = 8) -> dict:
    frozen = counts["net"] * weight_bytes + counts["vae"] * 4  # the text encoders are parked once the cache is built
    text = counts["text"] * weight_bytes
    n = counts["lora64"] if trained == "lora" else counts.get("student", counts["net"])  # a flow map: its own net
    train = n * (4 + 4 + moment_bytes) + copies * n * 4
    fake_score = {True: counts["net"], "lora": counts["lora64"]}.get(fake, 0) * (4 + 4 + moment_bytes)
    caching = text + counts["vae"] * 4
    setup = max(caching, frozen + n * 4 * (trained == "full") + counts["net"] * 4 * (fake is True))
    return {"frozen": frozen / GB, "setup": setup / GB, "trained": train / GB, "fake": fake_score / GB,
            "total": (frozen + train + fake_score) / GB, "trained_params": n}


def main() -> None:
    fams = networks()
    print("| family | network | text encoders | VAE | LoRA rank 64 on the recipe's targets |")
    print("|---|---:|---:|---:|---:|")
    for name, c in fams.items():
        print(f"| {name} | {c['net'] / 1e6:.1f} M | {c['text'] / 1e6:.1f} M | {c['vae'] / 1e6:.1f} M | "
              f"{c['lora64'] / 1e6:.1f} M |")
    print()
    print("| recipe | set-up (the larger of: text encoders + fp32 VAE; bf16 network + VAE + fresh student) | frozen "
          "while training (text encoders on the CPU) | trained (fp32 + grads + AdamW + copies) | fake score (rCM, "
          "DMD2) | training total | with adamw8bit | device needs (weights) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for recipe, (fam, trained, copies, fake) in RECIPES.items():
        e = estimate(fams[fam], trained, copies, fake)
        e8 = estimate(fams[fam], trained, copies, fake, moment_bytes=2)
        need = max(e["setup"], e["total"])
        print(f"| {recipe} | {e['setup']:.1f} GB | {e['frozen']:.1f} GB | {e['trained']:.1f} GB | "
              f"{e['fake']:.1f} GB | {e['total']:.1f} GB | {e8['total']:.1f} GB | {need:.1f} GB |")


if __name__ == "__main__":
    main()
