"""nanod2vlm: the whole D²VLM model in one file.

Read top-down: config, primitives (RMSNorm, RoPE, attention, MLP, LoRA), the EVA-CLIP vision tower,
the Q-Former frame compressor, the Phi-3 decoder, then the D²VLM model that owns the <evi> mechanism,
and last the checkpoint loading.
"""
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    # Phi-3 decoder. Defaults are the nano model: a few million parameters that train on a CPU.
    vocab_size: int = 512
    n_embd: int = 128          # hidden_size
    n_layer: int = 4
    n_head: int = 4
    n_mlp: int = 384           # intermediate_size (gate_up_proj stores 2 * n_mlp rows)
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_pos: int = 4096
    # EVA-CLIP ViT vision tower (frozen)
    img_size: int = 32
    patch: int = 8
    vit_width: int = 64
    vit_layers: int = 2        # blocks kept: the full checkpoint has 40, D²VLM uses the first 39
    vit_heads: int = 4
    vit_mlp: int = 256
    # Q-Former frame compressor: one token per frame
    qf_width: int = 64
    qf_layers: int = 2
    qf_heads: int = 4
    qf_mlp: int = 256
    qf_queries: int = 4
    qf_cross_every: int = 2
    qf_vocab: int = 512        # WordPiece vocabulary of the question text fed to the Q-Former
    qf_max_pos: int = 512
    # LoRA on the decoder (r = 0: no LoRA, every weight trains, as the nano model does from scratch)
    lora_r: int = 0
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0
    lora_targets: tuple = ("qkv_proj", "o_proj")
    # <evi> mechanism
    evi_layer: int = -1        # decoder block whose output feeds evi_head/frm_head; official code: -2
    evi_threshold: float = 0.6 # inference: salient frames have sigmoid(sim) >= 0.6 * max
    # video
    fps: float = 1.0
    max_frames: int = 350


CONFIGS = {
    "nano": Config(),
    "full": Config(
        vocab_size=32064, n_embd=3072, n_layer=32, n_head=32, n_mlp=8192,
        img_size=224, patch=14, vit_width=1408, vit_layers=39, vit_heads=16, vit_mlp=6144,
        qf_width=768, qf_layers=12, qf_heads=12, qf_mlp=3072, qf_queries=32, qf_vocab=30523,
        lora_r=128, lora_alpha=256.0, lora_dropout=0.05),
}
