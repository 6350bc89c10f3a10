"""Sana (``SanaPipeline``): a ``SanaTransformer2DModel`` over un-packed latents (its own ``patch_size``) predicting the
flow velocity, with the prompt's attention mask in its cross-attention; prompts encoded as the pipeline encodes them
(lower-cased and stripped, the ``complex_human_instruction`` lines prepended to the prompt, Gemma2's last hidden state
over ``len(instruction tokens) + max_sequence_length - 2`` right-padded tokens, then the BOS token and the last
``max_sequence_length - 1`` kept; the negative prompt without the instruction, ``max_sequence_length`` tokens);
classifier-free guidance with a negative prompt (in velocity, affine, so in x0 alike); the deep-compression
``AutoencoderDC`` (a deterministic encoder, ``latent / scaling_factor`` decoded), shown to cmkit through
``DCAutoencoder``.

The folders ship a ``DPMSolverMultistepScheduler`` over flow sigmas (``use_flow_sigmas``, ``flow_shift``,
``prediction_type="flow_prediction"``). Its grid is ``t_k = shift s / (1 + (shift - 1) s)`` at
``s = 1 - linspace(1, 1/1000, N + 1)[:-1]`` reversed, then 0: the first time is below 1 (0.99967 at shift 3), so the
pipeline's starting latents are its sample at that finite sigma. Its step (``dpmsolver++``, order 2, midpoint, first
and last steps first order) is cmkit's ``dpmpp_2m`` in sigma space, since ``lambda = log((1 - t) / t) = -log sigma``.
One thing the scheduler does besides: its ``timesteps`` are ``int64``, so the network sees ``floor(1000 t_k)`` while the
update uses ``t_k`` itself; the teacher's denoiser does the same (``SanaDenoiser.integer_timesteps``). A folder with a
``FlowMatchEulerDiscreteScheduler`` (static shift) runs its own grid from t = 1 and passes ``1000 t`` as is.

Students train and sample in continuous time over the ``FlowMatchEulerDiscreteScheduler`` of the teacher's shift, which
their exports carry (a DPM-Solver++ multistep update is no consistency sampler): a copy of the teacher's denoiser (a
full student, rCM's fake score) holds that scheduler, and a network with an active LoRA adapter is not floored.
"""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import torch
from torch import nn

from ..autoencoder import VAEView
from ..components import in_dtype
from ..denoiser import TextToImageModel
from ..family import patched_shape, register_family
from ..text_encoders import byte_tokenizer, negatives_for, prompt_list, tokenize
from .flow import FLOW_SPACINGS, FlowDenoiser, FlowFamily

PIPELINE = "SanaPipeline"
DPM = "DPMSolverMultistepScheduler"
SPECIALS = ["<unk>", "<pad>", "<bos>", "<eos>"]


@functools.cache
def pipeline_instruction() -> tuple[str, ...]:
    """``SanaPipeline.__call__``'s default ``complex_human_instruction`` lines, read from the installed diffusers so
    the embeddings are the ones a plain pipeline call computes."""
    import inspect

    from diffusers import SanaPipeline

    return tuple(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


def continuous_scheduler(scheduler):
    """The ``FlowMatchEulerDiscreteScheduler`` of a DPM flow scheduler's shift (the same shifted times, from t = 1,
    passed to the network unrounded): what students train over and their exports sample with."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if type(scheduler).__name__ != DPM:
        return scheduler
    c = scheduler.config
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=c.num_train_timesteps, shift=float(c.flow_shift))


def _adapter_active(network) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) and not m.disable_adapters for m in network.modules())


class DeterministicLatents:
    """``AutoencoderDC``'s encoding as the posterior cmkit reads: a point mass (``mean``, ``std = 0``, ``sample``)."""

    def __init__(self, latent: torch.Tensor):
        self.mean = latent
        self.std = torch.zeros_like(latent)

    def sample(self, generator=None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean


class DCAutoencoder(VAEView):
    """An ``AutoencoderDC`` (held as ``.vae``, what the pipeline is handed) presented as the AutoencoderKL-like VAE
    cmkit's VAE code reads: ``encode(x).latent_dist`` with ``std`` 0, ``decode(z).sample``, and a ``config`` with
    ``latent_channels``, ``block_out_channels`` (the encoder's, whose length gives the factor ``2 ** (n - 1)``, 32 for
    Sana's), ``scaling_factor`` (``z = scaling_factor * latent``, no shift), ``in_channels`` / ``out_channels``."""

    def __init__(self, vae: nn.Module):
        super().__init__(vae)
        from diffusers.configuration_utils import FrozenDict

        c = vae.config
        self.config = FrozenDict(latent_channels=int(c.latent_channels), scaling_factor=float(c.scaling_factor),
                                 block_out_channels=tuple(c.encoder_block_out_channels), shift_factor=None,
                                 in_channels=int(c.in_channels), out_channels=int(c.in_channels))

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(latent_dist=DeterministicLatents(self.vae.encode(x).latent))

    def decode(self, z: torch.Tensor):
        return self.vae.decode(z)


class SanaDenoiser(FlowDenoiser):
    """``SanaTransformer2DModel`` as a flow denoiser: the network takes ``1000 t * config.timestep_scale``, floored
    to the integer before the scale where the pipeline's scheduler hands it ``int64`` timesteps (``integer_timesteps``),
    and the prompt's attention mask."""

    @property
    def integer_timesteps(self) -> bool:
        """DPM-Solver's timesteps are ``int64``: the teacher sampled as its folder's pipeline samples it. A network
        with an active LoRA adapter is a student, which runs in continuous time (its tangents need the time input)."""
        return type(self.scheduler).__name__ == DPM and not _adapter_active(self.transformer)

    def __deepcopy__(self, memo):
        """A copy is a network to train (a full student, rCM's fake score, an EMA): continuous in time, over the
        ``FlowMatchEulerDiscreteScheduler`` of the same shift (``continuous_scheduler``), which its export carries."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        new.scheduler = continuous_scheduler(new.scheduler)
        return new

    def _velocity(self, x_t, timestep, w, cond):
        if self.integer_timesteps:
            timestep = timestep.floor()
        cfg = self.transformer.config
        out = self.transformer(x_t, encoder_hidden_states=cond["prompt_embeds"],
                               encoder_attention_mask=cond.get("prompt_attention_mask"),
                               timestep=timestep * float(cfg.timestep_scale), return_dict=False)[0]
        if cfg.out_channels // 2 == cfg.in_channels:  # the pipeline's "learned sigma" half, dropped
            out = out.chunk(2, dim=1)[0]
        return out.float()


class SanaPromptEncoder(nn.Module):
    """Prompts -> Sana's conditioning (``prompt_embeds`` and ``prompt_attention_mask``, with ``negative_`` twins), as
    ``SanaPipeline.encode_prompt`` computes them (module docstring). ``complex_human_instruction``: the lines
    prepended to every prompt (default: the pipeline's own; ``()`` for none)."""

    pipeline = PIPELINE

    def __init__(self, encoder: nn.Module, tokenizer, max_sequence_length: int = 300,
                 complex_human_instruction: tuple[str, ...] | None = None):
        super().__init__()
        self.encoder, self.tokenizers = encoder, [tokenizer]
        self.max_sequence_length = int(max_sequence_length)
        chi = pipeline_instruction() if complex_human_instruction is None else complex_human_instruction
        self.complex_human_instruction = tuple(chi)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def settings(self) -> tuple:
        return (self.pipeline, self.max_sequence_length, self.complex_human_instruction)

    def instruction_tokens(self) -> int:
        """Tokens of the joined instruction, BOS included (the pipeline's ``num_chi_prompt_tokens``; 0 without)."""
        chi = self.complex_human_instruction
        return len(self.tokenizers[0].encode("\n".join(chi))) if chi else 0

    def _gemma(self, texts: list[str], instruct: bool):
        tok, n = self.tokenizers[0], self.max_sequence_length
        tok.padding_side = "right"
        texts = [t.lower().strip() for t in texts]  # the pipeline's _text_preprocessing without clean_caption
        if instruct and self.complex_human_instruction:
            chi = "\n".join(self.complex_human_instruction)
            texts, n = [chi + t for t in texts], self.instruction_tokens() + n - 2
        tokens = tokenize(tok, texts, n, add_special_tokens=True)
        mask = tokens.attention_mask.to(self.device)
        embeds = self.encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return embeds.to(self.encoder.dtype), mask

    @torch.no_grad()
    def forward(self, prompts, negative_prompts=None) -> dict:
        prompts = prompt_list(prompts)
        keep = [0, *range(-self.max_sequence_length + 1, 0)]  # BOS and the last max_sequence_length - 1 tokens
        embeds, mask = self._gemma(prompts, True)
        cond = {"prompt_embeds": embeds[:, keep], "prompt_attention_mask": mask[:, keep]}
        # the pipeline guides against "" where no negative prompt is given
        neg, neg_mask = self._gemma(negatives_for(prompts, negative_prompts), False)
        return {**cond, "negative_prompt_embeds": neg, "negative_prompt_attention_mask": neg_mask}


@register_family
class Sana(FlowFamily):
    name = PIPELINE
    encoders = ("text_encoder",)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # self- and cross-attention of every block

    def load(self, path, index, dtype, clip_x0, load_kw):
        p = self.needed_parts(path, index, ["transformer", "vae", "scheduler", "text_encoder", "tokenizer"], load_kw)
        sched = self.checked_scheduler(path, p["scheduler"])
        tr, vae = in_dtype(p["transformer"], dtype), in_dtype(p["vae"], torch.float32)
        if tr.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"{path}: the transformer takes {tr.config.in_channels} channels, the VAE's latents "
                             f"have {vae.config.latent_channels}; its components do not belong together")
        prompts = SanaPromptEncoder(in_dtype(p["text_encoder"], dtype), p["tokenizer"])
        return TextToImageModel(SanaDenoiser(tr, sched, clip_x0), DCAutoencoder(vae).eval(), prompts.eval(),
                                {"pipeline": self.name})

    def checked_scheduler(self, path, scheduler):
        """The folder's DPM-Solver over flow sigmas (refused without them: its time maps would not be flow
        matching's), or a flow-matching scheduler with a static shift (the pipeline passes no ``mu``)."""
        from pathlib import Path

        from ...core.checks import in_range

        c, where = scheduler.config, Path(path) / "scheduler" / "scheduler_config.json"
        if type(scheduler).__name__ == DPM:
            if not c.get("use_flow_sigmas") or c.get("prediction_type") != "flow_prediction":
                raise ValueError(f"{where}: a SanaPipeline's DPMSolverMultistepScheduler runs over flow sigmas; set "
                                 "use_flow_sigmas to true and prediction_type to \"flow_prediction\"")
            in_range(c.get("flow_shift", 1.0), f"{where}: flow_shift", 0, low_open=True,
                     fix="give the value the pipeline was trained with")
            return scheduler
        if type(scheduler).__name__.startswith("FlowMatch") and c.get("use_dynamic_shifting"):
            raise ValueError(f"{where}: SanaPipeline passes no mu, so use_dynamic_shifting must be false; give a "
                             "static shift")
        return super().checked_scheduler(path, scheduler)

    def grid(self, model, steps: int, spacing: str | None) -> list[float]:
        """Its scheduler's sigmas as the pipeline sets them (a student's: ``student_scheduler``)."""
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if spacing not in FLOW_SPACINGS:
            raise ValueError(f"spacing {spacing!r} is a DDPM-table spacing; a {self.name} runs its scheduler's own "
                             "grid (spacing=None)")
        sched = type(model.scheduler).from_config(model.scheduler.config)
        sched.set_timesteps(num_inference_steps=int(steps))  # retrieve_timesteps(scheduler, steps) in the pipeline
        return model.schedule.sigma(sched.sigmas.to(torch.float64)).tolist()

    def student_scheduler(self, model, scheduler):
        # a student (LoRA ones share the teacher's DPM scheduler) samples in continuous time over the
        # FlowMatchEulerDiscreteScheduler of the same shift, which its export carries
        return continuous_scheduler(scheduler)

    def pipeline(self, model):
        import diffusers

        pe = model.prompt_encoder
        return diffusers.SanaPipeline(tokenizer=pe.tokenizers[0], text_encoder=pe.encoder, vae=model.vae.vae,
                                      transformer=model.network, scheduler=model.scheduler)

    def default_image_size(self, model) -> int:
        return int(model.network.config.sample_size) * model.vae_scale_factor

    def latent_shape(self, model, height: int, width: int) -> tuple[int, ...]:
        # Sana's own VAE and patch give 32 x 1, SanaPipeline's check_inputs' multiple (a tiny stand-in's are smaller)
        f, p = model.vae_scale_factor, int(model.network.config.patch_size)
        return patched_shape(model.network.config.in_channels, height, width, f, p,
                             f"the VAE's factor {f} times the transformer's patch size {p}")

    def max_sequence_length(self, model) -> int | None:
        """Gemma2's positions, less the instruction's tokens the pipeline adds (``instruction + n - 2`` tokens)."""
        pe = model.prompt_encoder
        top = int(pe.encoder.config.max_position_embeddings)
        return top - max(pe.instruction_tokens() - 2, 0)

    def image_tokens(self, model) -> int:
        _, h, w = model.sample_shape
        p = int(model.network.config.patch_size)
        return (h // p) * (w // p)

    def tiny(self, texts=None, image_size: int = 32, seed: int = 0):
        return tiny_sana_pipeline(seed=seed, image_size=image_size)


def sana_tokenizer():
    """An offline ``GemmaTokenizer`` (one token per byte, Gemma's specials, BOS added as Gemma's is)."""
    return byte_tokenizer("GemmaTokenizer", SPECIALS, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                          eos_token="<eos>", add_bos_token=True, padding_side="right")


def tiny_sana_pipeline(seed: int = 0, image_size: int = 32, max_sequence_length: int = 16, flow_shift: float = 3.0,
                       scheduler: str = DPM, complex_human_instruction: tuple[str, ...] | None = None,
                       ) -> TextToImageModel:
    """A randomly initialised ``SanaPipeline`` model: a one-layer ``Gemma2Model`` (width 16) over a byte-level
    ``GemmaTokenizer``, a one-layer ``SanaTransformer2DModel`` (width 16, patch 1) over 4 latent channels, an
    ``AutoencoderDC`` with three levels (factor 4), and Sana's ``DPMSolverMultistepScheduler`` over flow sigmas
    (``scheduler="FlowMatchEulerDiscreteScheduler"``: that one, of the same shift)."""
    import diffusers
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tok = sana_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                       max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
        torch.manual_seed(seed + 1)
        tr = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
                                    attention_head_dim=8, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                    cross_attention_dim=16, caption_channels=16, sample_size=image_size // 4)
        torch.manual_seed(seed + 2)
        vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                            encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                            decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                            encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                            encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                            encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                            downsample_block_type="conv", upsample_block_type="interpolate",
                            decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    if scheduler == DPM:  # Sana_1600M_1024px_diffusers' scheduler_config.json, with its shift
        sched = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=flow_shift,
                                                      prediction_type="flow_prediction", solver_order=2,
                                                      algorithm_type="dpmsolver++", final_sigmas_type="zero")
    else:
        sched = getattr(diffusers, scheduler)(shift=flow_shift)
    prompts = SanaPromptEncoder(enc, tok, max_sequence_length, complex_human_instruction)
    model = TextToImageModel(SanaDenoiser(tr, sched), DCAutoencoder(vae.eval()).eval(), prompts.eval(),
                             {"pipeline": PIPELINE})
    model.image_size = image_size
    return model
