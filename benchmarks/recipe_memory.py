"""Device memory the GPU recipes need for their weights and optimiser, estimated from parameter counts: each
network built on torch's meta device from its published architecture (no weights downloaded), the LoRA adapters
counted on the recipe's own target modules, and the bytes per parameter of what cmkit holds for the recipe:

    frozen teacher network and text encoders  train.weight_dtype (2 bytes in bf16 / fp16); the text encoders only
                                              while the latent cache is built, then on the CPU (latent.placement)
    VAE                                       float32 (4)
    trained weights                           float32 (4) + gradients (4) + AdamW moments (8; adamw8bit: 2)
    output EMAs, the LCM target network       float32 (4 each; train.ema_device = "cpu" moves EMAs off the device)
    rCM's fake score                          a trained float32 copy of the teacher network (16)

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
    }


# recipe -> (family, trained: "lora" | "full", extra float32 copies of the student (EMAs + target), fake score)
RECIPES = {
    "sd15-lcm-lora": ("sd15", "lora", 0, False),
    "sd15-lcm": ("sd15", "full", 2, False),        # EMA 0.95 and the target network
    "sdxl-lcm-lora": ("sdxl", "lora", 0, False),
    "sd35m-flow-cd-lora": ("sd35m", "lora", 0, False),
    "flux-dev-flow-cd-lora": ("flux", "lora", 0, False),
    "sd35m-rcm": ("sd35m", "full", 1, True),        # EMA 0.9999 and the fake score
    "flux-dev-rcm": ("flux", "full", 1, True),
}


def estimate(counts: dict, trained: str, copies: int, fake: bool, weight_bytes: int = 2,
             moment_bytes: int = 8) -> dict:
    frozen = counts["net"] * weight_bytes + counts["vae"] * 4  # the text encoders are parked once the cache is built
    text = counts["text"] * weight_bytes
    n = counts["lora64"] if trained == "lora" else counts["net"]
    train = n * (4 + 4 + moment_bytes) + copies * n * 4
    fake_score = counts["net"] * (4 + 4 + moment_bytes) if fake else 0
    caching = text + counts["vae"] * 4
    setup = max(caching, frozen + n * 4 * (trained == "full") + counts["net"] * 4 * fake)
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
          "while training (text "
          "encoders on the CPU) | trained (fp32 + grads + AdamW + copies) | rCM fake score | training total | with "
          "adamw8bit | device needs (weights) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for recipe, (fam, trained, copies, fake) in RECIPES.items():
        e = estimate(fams[fam], trained, copies, fake)
        e8 = estimate(fams[fam], trained, copies, fake, moment_bytes=2)
        need = max(e["setup"], e["total"])
        print(f"| {recipe} | {e['setup']:.1f} GB | {e['frozen']:.1f} GB | {e['trained']:.1f} GB | "
              f"{e['fake']:.1f} GB | {e['total']:.1f} GB | {e8['total']:.1f} GB | {need:.1f} GB |")


if __name__ == "__main__":
    main()
