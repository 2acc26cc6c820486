"""CLIP (Radford et al. 2021) with the hub's on-disk names: the text encoder SD1.x conditions on, and the whole
CLIP model (both towers and their projections) that video-editing papers score edits with.

    token ids (B, L) ─embed + positions─► N × [pre-LN causal self-attention, pre-LN MLP] ─LN─► (B, L, D)
    pixels (B, 3, S, S) ─patches + [class] + positions─► LN ─► N × [pre-LN self-attention, pre-LN MLP]
                                                             ─► [class] token ─LN─► (B, D)

SD1.x uses the text tower's last hidden state of all 77 positions, padding included, so there is no
attention mask beyond the causal one. CLIP itself reads one vector per side: the text tower's state at the
end-of-text token and the image tower's class token, each mapped into the shared embedding space by a linear
projection without bias; cosine similarities there, times exp(logit_scale), are CLIP's logits.
The two towers use the same encoder layer; only the text tower's attention is causal.

Dimension legend: B prompts or images, L tokens (77), D width (text 768 and image 1024 for ViT-L/14),
h heads, d = D / h, S image side (224), p patch side (14 or 32), N = (S / p)² patches, P projection width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import merge_heads, split_heads
from .config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

TowerConfig = CLIPTextConfig | CLIPVisionConfig


class CLIPAttention(nn.Module):
    def __init__(self, cfg: TowerConfig, causal: bool):
        super().__init__()
        D = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.causal = causal
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, h, L, d)
        return self.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)))  # (B, L, D)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu, the activation CLIP was trained with


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TowerConfig, causal: bool):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TowerConfig, causal: bool):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg, causal) for _ in range(cfg.num_hidden_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]  # (B, L, D)


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg, causal=True)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))  # (B, L, D)


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> last hidden state (B, L, D)."""
        _check_ids(ids, self.config)
        return self.text_model(ids)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        D, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.empty(D))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, D, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // p) ** 2 + 1, D)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, D, S/p, S/p) -> (B, N, D)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)  # (B, 1, D)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 1 + N, D)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the checkpoint's name
        self.encoder = CLIPEncoder(cfg, causal=False)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B, 3, S, S) -> the class token's final state (B, D)."""
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))  # (B, 1 + N, D)
        return self.post_layernorm(x[:, 0])


class CLIPModel(nn.Module):
    """CLIP's two towers and projections (transformers' CLIPModel keys: text_model.*, vision_model.*,
    text_projection, visual_projection, logit_scale)."""

    def __init__(self, cfg: CLIPConfig = CLIPConfig()):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg.text)
        self.vision_model = CLIPVisionTransformer(cfg.vision)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.empty(()))  # log of the softmax temperature's inverse

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L), each row ending in the end-of-text token -> text embeddings (B, P), not normalised."""
        _check_ids(ids, self.config.text)
        hidden = self.text_model(ids)  # (B, L, D)
        # End-of-text has the largest id in CLIP's vocabulary, so argmax finds it (OpenAI's own rule); with
        # end-of-text padding, argmax returns its first occurrence, the one the prompt's tokens attend to.
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]  # (B, D)
        return self.text_projection(pooled)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B, 3, S, S) -> image embeddings (B, P), not normalised."""
        S = self.config.vision.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (self.config.vision.num_channels, S, S):
            raise ValueError(f"CLIP's image tower takes preprocessed pixels (B, 3, {S}, {S}), got {tuple(pixels.shape)};"
                             " stemref.clip_pipeline.clip_pixels(frames) makes them")
        return self.visual_projection(self.vision_model(pixels))

    def forward(self, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP's logits per image (B_images, B_texts): exp(logit_scale) times the cosine similarities."""
        image = F.normalize(self.encode_image(pixels), dim=-1)  # (B_images, P)
        text = F.normalize(self.encode_text(ids), dim=-1)  # (B_texts, P)
        return self.logit_scale.exp() * image @ text.T


def _check_ids(ids: torch.Tensor, cfg: CLIPTextConfig) -> None:
    if ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"{ids.shape[1]} tokens exceed CLIP's {cfg.max_position_embeddings} positions; tokenize with truncation")
