"""``cleanai explain``: print which channels are coupled and what freezes them."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch

from cleanai_core.errors import UserError
from cleanai_core.model_state import set_mode

__all__ = ["add_parser", "example_input", "parse_shape", "run", "token_vocabulary"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "explain",
        help="show the model's groups of coupled channels and what cannot be pruned",
        description="Trace the model once and print its dependency graph: the groups of channels that must be "
        "pruned together and the operations that freeze channels.",
    )
    p.add_argument(
        "--model",
        "-m",
        required=True,
        metavar="M",
        help="timm:NAME, torchvision:NAME, package.module:factory, or a pickled model file",
    )
    p.add_argument("--weights", metavar="FILE", help="state_dict to load (not needed to explain the structure)")
    p.add_argument("--num-classes", type=int, metavar="N", help="classes of the model's head")
    p.add_argument("--trust-model", action="store_true", help="allow loading a pickled model file (runs its code)")
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="allow code that comes with the model's folder: the package.module:factory a folder written by cleanai "
        "prune names in its architecture.json, or an hf: folder's own modeling code (auto_map in config.json)",
    )
    p.add_argument(
        "--input-shape",
        default=None,
        metavar="N,C,H,W",
        help="example input shape (default: the model's own; 1,16 token ids for a model that reads tokens, "
        "e.g. a Hugging Face text model; else 1,3,224,224)",
    )
    p.add_argument("--max-groups", type=int, default=50, metavar="N", help="groups to list (default 50)")
    return p


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise UserError(f"--input-shape {text!r}: give integers separated by commas, e.g. 1,3,224,224.") from None
    if not shape or any(d < 1 for d in shape):
        raise UserError(f"--input-shape {text!r}: every dimension must be a positive integer.")
    if len(shape) > 64:  # RuntimeError: only tensors with up to 64 dims are supported (a traceback)
        raise UserError(f"--input-shape has {len(shape)} dimensions; torch tensors have at most 64 (e.g. 1,3,224,224).")
    if math.prod(shape) > sys.maxsize:  # "Overflow when unpacking long long": a C++ stack, exit 1
        raise UserError(
            f"--input-shape {text!r} has {math.prod(shape):.3g} elements, more than torch can count (2**63 - 1); give "
            "the shape of one small batch, e.g. 1,3,224,224."
        )
    return shape


def default_shape(model: torch.nn.Module) -> tuple[int, ...]:
    if token_vocabulary(model) is not None:
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        return (1, min(TEXT_LENGTH, int(limit))) if isinstance(limit, int) and limit > 0 else (1, TEXT_LENGTH)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size:
        return (1, *size)
    return (1, 3, 224, 224)


TEXT_LENGTH = 16  # tokens in the default example of a text model


def saved_input_shape(spec: str) -> tuple[int, ...] | None:
    """The input shape a folder ``cleanai prune`` / ``save_pruned`` wrote records
    (``example_input_shape`` in its ``architecture.json``), for ``--model FOLDER``; else ``None``."""
    from pathlib import Path

    from cleanai_core.saved_folder import recorded_input_shape

    try:
        folder = Path(spec)
        return recorded_input_shape(folder / "architecture.json") if folder.is_dir() else None
    except (OSError, ValueError):
        return None


def token_vocabulary(model: torch.nn.Module) -> int | None:
    """How many token ids the model reads (``0..V-1``), or ``None`` when its input is not
    token ids: the rows of its input embedding, found by the Hugging Face convention
    ``get_input_embeddings()`` or as the model's first module with parameters."""
    try:
        emb = model.get_input_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):
        emb = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
    return int(emb.num_embeddings) if isinstance(emb, torch.nn.Embedding) else None


def example_input(model: torch.nn.Module, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Any:
    """What ``explain`` traces with: random token ids of ``shape`` for a model that reads
    tokens (floats made Hugging Face text models fail in their embedding: "Expected tensor
    for argument #1 'indices' to have one of the following scalar types: Long, Int"), a
    dict with ``decoder_input_ids`` too for an encoder-decoder, else a float tensor of ``dtype``."""
    vocab = token_vocabulary(model)
    if vocab is None:
        return torch.randn(*shape, dtype=dtype)
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return {"input_ids": ids, "decoder_input_ids": ids}
    return ids


#: the forward arguments of a Hugging Face model that reads a signal, not token ids
SIGNALS = ("input_values", "input_features", "pixel_values", "pixel_values_videos")


def signal_example(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """A default example for a Hugging Face speech, audio, image or video model (its forward
    takes ``input_values``, ``input_features``, ``pixel_values`` or ``pixel_values_videos``
    and no ``input_ids``): noise of the shape its config describes (one second at 16 kHz for
    a raw-audio encoder; the mel frames Whisper's encoder is built for; the config's image
    size, or its backbone's (ViTPose); ``(1, frames, channels, height, width)`` for a video
    model whose config names its frames, the frames as the batch for X-CLIP's vision tower),
    with the decoder's start token for an encoder-decoder. ``None`` where it is no such
    model. Without it, ``explain`` traced a wav2vec2 folder with a (1, 3, 224, 224) image and
    refused it; a video model (VideoMAE, TimesFormer, ViViT, V-JEPA 2) was given an image and
    failed, and ``save_pruned`` wrote no ``hf/`` folder for it."""
    import inspect

    config = getattr(model, "config", None)
    try:
        takes = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    key = next((k for k in SIGNALS if k in takes), None)
    if config is None or key is None or "input_ids" in takes:
        return None

    def value(name: str):  # the config's, else its backbone's
        v = getattr(config, name, None)
        return v if v is not None else getattr(getattr(config, "backbone_config", None), name, None)

    def num(name: str) -> int | None:
        v = value(name)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    if key.startswith("pixel_values"):
        size = value("image_size") or value("crop_size")
        h, w = (
            (size, size)
            if isinstance(size, int)
            else tuple(size)[:2]
            if isinstance(size, (list, tuple))
            else (224, 224)
        )
        frames = num("num_frames") or num("frames_per_clip")
        chw = (num("num_channels") or num("in_chans") or 3, h, w)
        if frames and value("mit_hidden_size"):  # X-CLIP's vision tower: frames folded into the batch
            shape = (frames, *chw)
        else:
            shape = (1, *([frames] if frames else []), *chw)
    elif key == "input_values":  # AST reads spectrogram frames; the wav2vec2 family raw audio
        frames, mels = num("max_length"), num("num_mel_bins")
        shape = (1, frames, mels) if frames and mels else (1, 16000)
    elif num("num_mel_bins") and num("max_source_positions"):  # Whisper: twice its encoder's positions
        shape = (1, num("num_mel_bins"), 2 * num("max_source_positions"))
    elif num("input_feat_per_channel"):  # Speech2Text: frames of stacked filter banks
        shape = (1, 128, num("input_feat_per_channel") * (num("input_channels") or 1))
    elif num("feature_projection_input_dim"):  # wav2vec2-BERT
        shape = (1, 128, num("feature_projection_input_dim"))
    else:
        return None
    example = {key: torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)}
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in takes:
        start = getattr(config, "decoder_start_token_id", None)
        example["decoder_input_ids"] = torch.tensor([[start if isinstance(start, int) else 0]])
    return example


def run(args: argparse.Namespace) -> int:
    from cleanai_core.extras import check_file_spec
    from cleanai_core.graph.dependency import DependencyGraph
    from cleanai_core.job.inputs import check_real
    from cleanai_core.options import ignored_modules
    from cleanai_core.plugins import get_plugin_manager, input_forms, load_model
    from cleanai_core.special_files import check_given_paths, check_not_special

    options = {
        "weights": args.weights,
        "trust_model": args.trust_model,
        "num_classes": args.num_classes,
        "pretrained": False,
        "warn_random_weights": False,
        "trust_code": True,  # typed on the command line
        # code the folder a spec names ships (a saved folder's factory, an hf: folder's auto_map) runs only with the
        # flag, as for cleanai prune: without this key the hf: loader read the spec's consent as the folder's, and
        # `cleanai explain --model hf:DIR` imported DIR's modeling code unasked
        "trust_folder_code": args.trust_code,
        "spec_source": "--model",
    }
    check_given_paths(args, ("model", "weights"))  # --model '' said "'' is a folder" (the current one)
    check_not_special(args.model, "--model")  # a loop of links said "not a model this tool can load"
    check_file_spec(args.model, "--model", "a model factory")
    model = load_model(get_plugin_manager(), args.model, options)
    if model is None:
        raise UserError(f"--model {args.model!r}: not a model this tool can load. Give {input_forms('model')}.")
    check_real(model, args.model)
    if args.max_groups < 0:  # -1 listed all groups but one, then "... 6 more"
        raise UserError(f"--max-groups={args.max_groups} is out of range: it must be >= 0.")
    set_mode(model, False)
    # a folder cleanai prune wrote records the shape of its inputs: it was traced with 1,3,224,224
    recorded = None if args.input_shape else saved_input_shape(args.model)
    shape = parse_shape(args.input_shape) if args.input_shape else recorded or default_shape(model)
    tried = ",".join(map(str, shape))
    # the example in the model's floating dtype: a float16 model failed on float32 noise
    dtype = next((q.dtype for q in model.parameters() if q.is_floating_point()), torch.float32)
    from cleanai_core.errors import TraceInputError

    ignored = sorted(ignored_modules(model, ()))
    signal = None if args.input_shape or recorded else signal_example(model, dtype)
    if signal is not None:
        tried = "; ".join(f"{k} {','.join(map(str, v.shape))}" for k, v in signal.items())
    try:
        first = example_input(model, shape, dtype) if signal is None else signal
        floats = isinstance(first, torch.Tensor) and first.is_floating_point()
        tries = [first] if floats or signal is not None else [first, torch.randn(*shape, dtype=dtype)]
    except (RuntimeError, MemoryError) as exc:  # --input-shape 1,1,100000,100000: 40 GB of noise
        raise UserError(
            f"--input-shape {tried}: cannot allocate an example input of that size ({type(exc).__name__}); give the "
            "shape of one real input, e.g. 1,3,224,224."
        ) from None
    _initialise_lazy(model, tries, tried)
    for i, inputs in enumerate(tries):  # token ids first for a model that seems to read them, then floats
        try:
            # what the pruner sees: the default ignores and the coupling-dependent defaults kept
            graph = DependencyGraph(model, inputs, ignored_layers=ignored)
            graph.apply_default_freezes()
            break
        except TraceInputError as exc:  # the user's; a failure of the trace itself is CleanAI's (exit 1)
            if exc.kind == "output":  # said "pass output_transform=...", a Python argument, and "Tried --input-shape"
                raise UserError(
                    f"--model {args.model!r} returned {exc.returned} on the example input, which holds no tensors: "
                    "explain follows the channels to the model's output. Make its forward return the output "
                    "tensor(s) (e.g. a factory that wraps the model in a module whose forward returns the logits)."
                ) from None
            if exc.kind != "inputs":  # an implementation the trace cannot enter: its message names the switch
                raise
            if i == len(tries) - 1:
                raise UserError(f"{str(exc).rstrip('.')}. Tried --input-shape {tried}; pass the right one.") from exc
    print(graph.explain(max_groups=args.max_groups))
    return 0


def _initialise_lazy(model: torch.nn.Module, tries: list[Any], tried: str) -> None:
    """Give the lazy layers of the model the command line built (``nn.LazyConv2d``) their
    shapes by running it once on the example, as ``cleanai prune`` does with its first
    sample; explain refused them with "run the model once on a batch", which a factory's
    user cannot do from here."""
    if not any(torch.nn.parameter.is_lazy(t) for t in [*model.parameters(), *model.buffers()]):
        return
    from cleanai_core.runtime import call_model

    failure: Exception | None = None
    for inputs in tries:
        try:
            with torch.no_grad():
                call_model(model, inputs, None)
            return
        except Exception as exc:  # noqa: BLE001 - the model's own failure, reported below
            failure = exc
    raise UserError(
        f"the model (with lazy layers, which take their shapes from a first input) failed on an example input "
        f"({type(failure).__name__}: {str(failure)[:300]}). Tried --input-shape {tried}; pass the right one."
    )
