"""Vision transformers as StagedNets: timm's ViT / DeiT (token sequences) and Swin-style models
(channels-last maps).

**Token models** (timm `VisionTransformer`, `VisionTransformerDistilled`): the stem is the patch
embedding with the prefix tokens (class, distillation, register tokens) and the position
embedding; the stages are groups of consecutive blocks; the head is the final norm, the pooling
(the class token, or the mean of the patch tokens: timm's `global_pool_nlc`) and the classifier(s)
(a distilled DeiT averages its class and distillation heads, as timm does at inference). Stage
outputs are the full token sequences, (B, N, C) with the prefix tokens first, so SOKD's knowledge
bridge (a copy of the last stage(s) and the head) is fed exactly what the teacher's next block
reads. `stages`: the index of the last block of each stage (default: four equal groups, e.g. [2,
5, 8, 11] for 12 blocks). The net records how many prefix tokens its sequences start with
(`prefix_tokens`), which feature terms read (`stage_map`).

**Channels-last models** (timm Swin: `patch_embed`, `layers`, `norm`, `head`, NHWC outputs):
each stage runs on NHWC and hands on an NCHW view of its output (a permutation, no copy), so every
feature term and the bridge see NCHW maps as with a CNN.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SokdError
from .staged import StagedNet


def is_token_model(model: nn.Module) -> bool:
    """ViT-style: patch embedding + position embedding / class token, blocks on token sequences."""
    return hasattr(model, "patch_embed") and any(hasattr(model, a) for a in ("pos_embed", "cls_token"))


class TokenStem(nn.Module):
    """Patch embedding, prefix tokens, position embedding (timm's `_pos_embed`), then the
    pre-norm: images (B, C, H, W) -> tokens (B, prefix + patches, D)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.patch_embed = vit.patch_embed
        # the prefix tokens in timm's order: class, then distillation (DeiT) or register tokens
        self.prefix_names = [n for n in ("cls_token", "dist_token", "reg_token") if getattr(vit, n, None) is not None]
        for name in self.prefix_names:
            setattr(self, name, getattr(vit, name))
        self.pos_embed = getattr(vit, "pos_embed", None)
        self.no_embed_class = bool(getattr(vit, "no_embed_class", False))
        self.pos_drop, self.patch_drop, self.norm_pre = vit.pos_drop, vit.patch_drop, vit.norm_pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        prefix = [getattr(self, n).expand(x.shape[0], -1, -1) for n in self.prefix_names]
        if self.pos_embed is not None and self.no_embed_class:
            x = x + self.pos_embed
        x = torch.cat(prefix + [x], dim=1) if prefix else x
        if self.pos_embed is not None and not self.no_embed_class:
            x = x + self.pos_embed
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))


class TokenHead(nn.Module):
    """Final norm, pooling and classifier(s) of a token model: tokens -> logits."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.norm, self.fc_norm, self.head_drop, self.head = vit.norm, vit.fc_norm, vit.head_drop, vit.head
        self.head_dist = getattr(vit, "head_dist", None)
        self.global_pool = vit.global_pool
        self.prefix_tokens = int(vit.num_prefix_tokens)
        self.include_prefix = bool(getattr(vit, "pool_include_prefix", False))

    def both_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A distilled DeiT's (class-token logits, distillation-token logits)."""
        return self._heads_of_normed(self.norm(x))

    def _heads_of_normed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.head_drop(x[:, 0])), self.head_dist(self.head_drop(x[:, 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_embedding(x)[0]

    def forward_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, embedding): the embedding is the pooled, normalised token the classifier reads
        (a distilled DeiT's: its class token; its logits are the mean of both heads)."""
        x = self.norm(x)
        if self.head_dist is not None:   # DeiT: the mean of the class and distillation heads
            cls, dist = self._heads_of_normed(x)
            return (cls + dist) / 2, x[:, 0]
        from timm.layers import global_pool_nlc
        x = global_pool_nlc(x, pool_type=self.global_pool, num_prefix_tokens=self.prefix_tokens,
                            reduce_include_prefix=self.include_prefix)
        emb = self.fc_norm(x)
        return self.head(self.head_drop(emb)), emb


def add_distillation_token(net: StagedNet, label: str) -> None:
    """Give a staged plain ViT DeiT's distillation token and head, in place (`kwargs:
    {distillation_token: true}`), so method `deit` can train any ViT student, not only timm's
    distilled DeiTs. The token sits right after the class token, as in DeiT, with its own slot in
    the position embedding when the prefix tokens have one; token, slot and head are initialised
    as timm initialises a distilled DeiT's (truncated normal, std 0.02; zero bias). It is added
    after the cut was checked against the plain model and after pretrained weights were loaded,
    so those keep every position they had."""
    stem, head = net.stem, net.head
    if not isinstance(stem, TokenStem) or not isinstance(head, TokenHead):
        raise SokdError(f"{label}: distillation_token applies to vision transformers (ViT, DeiT); remove it")
    if head.head_dist is not None:
        raise SokdError(f"{label} already has a distillation token; remove distillation_token")
    if "cls_token" not in stem.prefix_names or head.global_pool != "token":
        why = "no class token" if "cls_token" not in stem.prefix_names else f"global_pool {head.global_pool!r}"
        raise SokdError(f"{label}: a distillation token needs a class token read by the head (global_pool "
                        f"'token'), as in DeiT; this ViT has {why}")
    if not isinstance(head.head, nn.Linear):
        raise SokdError(f"{label}: a distillation head needs a linear classifier (num_classes > 0)")
    stem.dist_token = nn.Parameter(nn.init.trunc_normal_(torch.empty_like(stem.cls_token), std=0.02))
    stem.prefix_names.insert(stem.prefix_names.index("cls_token") + 1, "dist_token")
    pos = stem.pos_embed
    if pos is not None and not stem.no_embed_class:
        slot = nn.init.trunc_normal_(torch.empty_like(pos[:, :1]), std=0.02)
        stem.pos_embed = nn.Parameter(torch.cat([pos.detach()[:, :1], slot, pos.detach()[:, 1:]], dim=1))
    linear = head.head
    head.head_dist = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device,
                               dtype=linear.weight.dtype)
    nn.init.trunc_normal_(head.head_dist.weight, std=0.02)
    nn.init.zeros_(head.head_dist.bias)
    head.prefix_tokens += 1
    net.prefix_tokens = head.prefix_tokens


def default_cuts(depth: int) -> list[int]:
    """The last block of each of four near-equal groups (every block its own stage below four)."""
    if depth < 4:
        return list(range(depth))
    return sorted({round(depth * (i + 1) / 4) - 1 for i in range(4)})


def check_cuts(cuts, depth: int, label: str) -> list[int]:
    if (not isinstance(cuts, (list, tuple)) or not cuts or any(isinstance(c, bool) or not isinstance(c, int) for c in cuts)
            or list(cuts) != sorted(set(cuts)) or cuts[0] < 0 or cuts[-1] != depth - 1):
        raise SokdError(f"{label}: stages must be increasing block indices ending at the last block "
                        f"({depth - 1}), e.g. {default_cuts(depth)}; got {cuts!r}")
    return list(cuts)


def staged_token_model(vit: nn.Module, label: str, cuts=None) -> tuple[TokenStem, list[nn.Module], TokenHead]:
    """(stem, stages, head) of a timm ViT / DeiT; refuses what it cannot cut faithfully."""
    if getattr(vit, "dynamic_img_size", False):
        raise SokdError(f"{label}: dynamic_img_size=True is not supported; give the training image size "
                        f"(kwargs: {{img_size: N}})")
    if getattr(vit, "attn_pool", None) is not None:
        raise SokdError(f"{label}: attention pooling (global_pool='map') is not supported; use "
                        f"global_pool 'token' or 'avg'")
    if not hasattr(vit, "blocks") or not hasattr(vit, "norm"):
        raise SokdError(f"{label}: a token model without `blocks` and `norm` cannot be staged automatically; "
                        f"cut it with sokd.models.adapt, see docs/byom.md")
    blocks = list(vit.blocks)
    cuts = check_cuts(cuts, len(blocks), label) if cuts is not None else default_cuts(len(blocks))
    stages, start = [], 0
    for end in cuts:
        stages.append(nn.Sequential(*blocks[start:end + 1]))
        start = end + 1
    return TokenStem(vit), stages, TokenHead(vit)


def stage_map(feat: torch.Tensor, prefix_tokens: int = 0) -> torch.Tensor:
    """A stage output as an NCHW map: maps as they are; token sequences (B, N, C) without their
    prefix tokens, the patch tokens laid out on their square grid. What feature terms compare,
    so a ViT's stages meet a CNN's (spatial sizes are aligned by the terms themselves)."""
    if feat.dim() != 3:
        return feat
    patches = feat[:, prefix_tokens:]
    n = patches.shape[1]
    side = int(round(n ** 0.5))
    if side * side != n:
        raise SokdError(f"a stage's {n} patch tokens do not form a square grid; feature terms need square "
                        f"patch grids (give a square img_size)")
    return patches.transpose(1, 2).reshape(feat.shape[0], feat.shape[2], side, side)


# -- channels-last (Swin) ---------------------------------------------------------------------

class NCHWView(nn.Module):
    """Runs `module` on NHWC and returns an NCHW view of its NHWC output (and takes NCHW in,
    `from_nchw`): permutations only, so nothing is copied."""

    def __init__(self, module: nn.Module, from_nchw: bool = True):
        super().__init__()
        self.module = module
        self.from_nchw = from_nchw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.from_nchw:
            x = x.permute(0, 2, 3, 1)
        return self.module(x).permute(0, 3, 1, 2)


class NHWCHead(nn.Module):
    """Final norm and classifier head of a channels-last model, fed an NCHW view."""

    def __init__(self, norm: nn.Module, head: nn.Module):
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x.permute(0, 2, 3, 1)))


def is_channels_last_stack(model: nn.Module) -> bool:
    return all(hasattr(model, n) for n in ("patch_embed", "layers", "norm", "head"))


def staged_nhwc_model(model: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """(stem, stages, head) of a Swin-style model: its `layers` are the stages."""
    stem = NCHWView(model.patch_embed, from_nchw=False)
    stages = [NCHWView(layer) for layer in model.layers]
    return stem, stages, NHWCHead(model.norm, model.head)


def prefix_tokens(net: StagedNet) -> int:
    """How many prefix tokens the stage outputs of `net` start with (0 for maps)."""
    return int(getattr(net, "prefix_tokens", 0))
