"""Hugging Face image classifiers as StagedNets: `arch: hf:<dir>`.

`<dir>` is a folder written by `transformers`' `save_pretrained` (a config and its weights); it is
loaded offline (`local_files_only`), never with remote code (sokd never imports code named inside
a file it reads). A classifier of another size than the run's classes gets a fresh classifier.
The model is cut from its encoder's layers, per family:

- ViT, DeiT (token sequences): stem = the embeddings (patches, class / distillation tokens,
  positions); stages = groups of encoder layers (`stages`, as for timm's ViTs: the last layer of
  each group, default four equal groups); head = final layer norm, the class token (DeiT with
  teacher: the mean of its class and distillation heads), the classifier;
- Swin (token sequences with a spatial layout): stem = the patch embeddings; stages = the encoder's
  stages, each fed and returning an NCHW map (the sequence laid on its grid);
- ConvNeXt, ResNet (maps): stem = the embedder; stages = the encoder's stages; head = pooling (and
  ConvNeXt's layer norm), the classifier.

The cut is checked: it must compute the model's own logits, else a one-line error points to
`sokd.models.adapt`. The net keeps the loaded model (`native`) and, for a trained student, saves it
back as a Hugging Face folder (`save_native`) with the image processor's statistics of the run,
so it returns to the user's ecosystem.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import SokdError
from .tokens import check_cuts, default_cuts
from .torchvision_adapter import AdaptedNet, constant_parameters

PREFIX = "hf:"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SokdError("hf:<dir> models need the transformers package: pip install 'sokd[hf]'") from None
    return transformers


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class _Layers(nn.Module):
    """Consecutive encoder layers taking and returning hidden states (a layer's tuple output is cut
    to its first element)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = _first(layer(x))
        return x


class _Embeddings(nn.Module):
    def __init__(self, embeddings):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, x):
        return _first(self.embeddings(x))


class _TokenHead(nn.Module):
    """Layer norm, the class token (and the distillation token's head: their mean), the classifier."""

    def __init__(self, norm, classifier, distillation=None):
        super().__init__()
        self.norm, self.classifier, self.distillation_classifier = norm, classifier, distillation

    def forward(self, x):
        return self.forward_embedding(x)[0]

    def forward_embedding(self, x):
        """(logits, embedding): the embedding is the normalised class token the classifier reads."""
        x = self.norm(x)
        logits = self.classifier(x[:, 0])
        if self.distillation_classifier is not None:
            logits = (logits + self.distillation_classifier(x[:, 1])) / 2
        return logits, x[:, 0]


class _SwinStem(nn.Module):
    def __init__(self, embeddings):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, x):
        seq, (h, w) = self.embeddings(x)
        return seq.transpose(1, 2).reshape(seq.shape[0], seq.shape[2], h, w)


class _SwinStage(nn.Module):
    """A Swin stage fed an NCHW map: run on the sequence and its grid size, returned as a map."""

    def __init__(self, stage):
        super().__init__()
        self.stage = stage

    def forward(self, x):
        b, c, h, w = x.shape
        seq = _first(self.stage(x.flatten(2).transpose(1, 2), (h, w)))
        shrink = round((h * w / seq.shape[1]) ** 0.5)   # 2 after a patch-merging stage, else 1
        return seq.transpose(1, 2).reshape(b, seq.shape[2], h // shrink, w // shrink)


class _SwinHead(nn.Module):
    def __init__(self, norm, classifier):
        super().__init__()
        self.norm, self.classifier = norm, classifier

    def forward(self, x):
        seq = self.norm(x.flatten(2).transpose(1, 2))
        return self.classifier(seq.mean(dim=1))


class _MapHead(nn.Module):
    """Global average pooling, an optional norm of the pooled vector (ConvNeXt), the classifier."""

    def __init__(self, classifier, norm=None):
        super().__init__()
        self.norm, self.classifier = norm, classifier

    def forward(self, x):
        x = x.mean(dim=(2, 3))
        if self.norm is not None:
            x = self.norm(x)
        return self.classifier(x)


def _cut(model: nn.Module, label: str, cuts):
    """(stem, stages, head, prefix tokens, how it was cut) for a supported family."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    kind = type(model).__name__
    encoder = getattr(base, "encoder", None)
    if base is not None and type(base).__name__.startswith("Swin") and encoder is not None:
        return (_SwinStem(base.embeddings), [_SwinStage(s) for s in encoder.layers],
                _SwinHead(base.layernorm, model.classifier), 0, "hf swin stages")
    layers = getattr(base, "layers", None) if base is not None else None
    if layers is None and encoder is not None:
        layers = getattr(encoder, "layer", None)
    if layers is not None and hasattr(base, "embeddings") and hasattr(base, "layernorm"):
        blocks = list(layers)
        cuts = check_cuts(cuts, len(blocks), label) if cuts is not None else default_cuts(len(blocks))
        stages, start = [], 0
        for end in cuts:
            stages.append(_Layers(blocks[start:end + 1]))
            start = end + 1
        if hasattr(model, "cls_classifier"):   # DeiT with teacher: two heads, averaged
            head = _TokenHead(base.layernorm, model.cls_classifier, model.distillation_classifier)
        else:
            head = _TokenHead(base.layernorm, model.classifier)
        prefix = 2 if "DeiT" in kind else 1
        return _Embeddings(base.embeddings), stages, head, prefix, "hf tokens"
    if encoder is not None and hasattr(encoder, "stages"):
        stem = base.embeddings if hasattr(base, "embeddings") else base.embedder
        return (_Embeddings(stem), list(encoder.stages), _MapHead(model.classifier, getattr(base, "layernorm", None)),
                0, "hf stages")
    raise SokdError(f"{label}: {kind} is not a family sokd cuts automatically (ViT, DeiT, Swin, ConvNeXt, "
                    f"ResNet); cut it with sokd.models.adapt, see docs/byom.md")


def create_hf(name: str, num_classes: int, in_channels: int = 3, stages=None, **kwargs) -> AdaptedNet:
    """`hf:<dir>`: the image classifier saved in `<dir>`, staged (see the module docstring)."""
    transformers = _transformers()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    folder = Path(name[len(PREFIX):]).expanduser()
    label = f"{PREFIX}{folder}"
    if kwargs:
        raise SokdError(f"{label}: options {sorted(kwargs)} are not taken by a Hugging Face folder (only "
                        f"`stages`); the folder's config.json defines the model")
    if not (folder / "config.json").is_file():
        raise SokdError(f"{label}: no config.json in '{folder}'; give a folder written by save_pretrained")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        if getattr(config, "num_channels", in_channels) != in_channels:
            raise SokdError(f"{label} takes {config.num_channels}-channel images but the data have {in_channels}; "
                            f"use data with {config.num_channels} channels")
        model = transformers.AutoModelForImageClassification.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False, num_labels=num_classes,
            ignore_mismatched_sizes=True)
    except SokdError:
        raise
    except (OSError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SokdError(f"{label}: transformers cannot load it as an image classifier ({first})") from None
    model.eval()
    stem, stage_list, head, prefix, source = _cut(model, label, stages)
    net = AdaptedNet(stem, stage_list, head, constants=constant_parameters(model), cut_source=source)
    net.prefix_tokens = prefix
    net.native = [model, folder]   # a list: the modules are the net's own already, not registered twice
    net.pretrained_stats = _processor_stats(transformers, folder, in_channels)
    size = getattr(model.config, "image_size", 32)
    size = size if isinstance(size, int) else size[0]
    with torch.no_grad():
        x = torch.randn(2, in_channels, size, size, generator=torch.Generator().manual_seed(0))
        same = torch.allclose(net.eval()(x), model(pixel_values=x).logits, atol=1e-5, rtol=1e-4)
    if not same:
        raise SokdError(f"{label}: its stem / stages / head do not reproduce the model's logits, so sokd does not "
                        f"cut it automatically; cut it with sokd.models.adapt, see docs/byom.md")
    net.train()
    return net


def _processor_stats(transformers, folder: Path, channels: int) -> dict:
    """The preprocessing the folder's image processor declares: mean, std and (when it names both)
    height x width as {"mean", "std", "shape"}; {} without a processor."""
    if not (folder / "preprocessor_config.json").is_file():
        return {}
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return {}
    stats = {}
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is not None and std is not None:
        stats.update(mean=list(mean), std=list(std))
    size = getattr(processor, "size", None) or {}
    if isinstance(size, dict) and size.get("height") and size.get("width"):
        stats["shape"] = [channels, int(size["height"]), int(size["width"])]
    return stats


def save_native(net: nn.Module, folder: Path, mean, std) -> Path | None:
    """Write a net loaded from `hf:<dir>` back as a Hugging Face folder (`save_pretrained`, its
    weights as trained) with an image processor carrying the run's normalisation; None for
    other nets."""
    native = getattr(net, "native", None)
    if not native:
        return None
    transformers = _transformers()
    model, source = native
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    try:   # the source folder's own processor, else a plain one
        processor = transformers.AutoImageProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError):
        processor = transformers.ViTImageProcessor()
    processor.image_mean, processor.image_std = [float(m) for m in mean], [float(s) for s in std]
    size = getattr(model.config, "image_size", None)
    if size is not None:
        size = size if isinstance(size, int) else size[0]
        processor.size = {"height": size, "width": size}
    processor.save_pretrained(folder)
    return folder
