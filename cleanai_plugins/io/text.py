"""Text data for Hugging Face models: ``--data`` as ``.txt``, ``.jsonl`` or tokenized ``.pt``.

Used when ``--model`` is a ``transformers`` model (``hf:PATH``); otherwise these files fall
through to the other loaders.

- ``.txt``: one document per line (blank lines skipped).
- ``.jsonl``: one JSON object per line with a ``text`` field, and an optional ``label``
  (an integer, or a name from the config's ``label2id``) for sequence classifiers.
- ``.pt``: already tokenized, so no tokenizer is needed: a ``LongTensor`` of ids
  ``(N, L)``, or a dict with ``input_ids`` (and optionally ``attention_mask``,
  ``labels``).

For a **causal LM** the documents are tokenized, joined and cut into blocks of
``--seq-len`` tokens (default 128, at most the model's context); every item is
``{"input_ids", "labels"}`` with ``labels = input_ids`` (padding, if any, set to -100), and
the evaluator reports perplexity. For a **sequence classifier** each document is one item,
padded to the longest (at most ``--seq-len`` tokens), with its ``label`` if given. The
tokenizer is the one saved in the model folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from cleanai_core import hookimpl
from cleanai_core.errors import UserError
from cleanai_plugins.io.hf import is_hf_model, load_tokenizer

__all__ = ["TextItems", "blocks_of", "load_text_dataset", "read_jsonl"]

DEFAULT_SEQ_LEN = 128


class TextItems(Dataset):
    """Items are dicts of equal-length tensors sliced along their first dimension."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        n = {len(v) for v in tensors.values()}
        if len(n) != 1:
            raise UserError(f"text data: tensors of different lengths {sorted(n)} ({sorted(tensors)}).")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def _is_causal(model: Any) -> bool:
    arch = (getattr(model.config, "architectures", None) or [""])[0]
    return arch.endswith(("ForCausalLM", "LMHeadModel")) or type(model).__name__.endswith(
        ("ForCausalLM", "LMHeadModel")
    )


def _seq_len(model: Any, asked: int | None) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    n = int(asked or DEFAULT_SEQ_LEN)
    if limit and n > int(limit):
        if asked:
            raise UserError(f"--seq-len {asked} is longer than the model's context ({limit} positions).")
        n = int(limit)
    return n


def read_jsonl(path: Path) -> tuple[list[str], list[Any] | None]:
    """Texts and labels (``None`` when no line has one) of a ``.jsonl`` file."""
    texts, labels = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{str(path)!r} line {i} is not JSON ({exc.msg}); write one JSON object per line.") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UserError(f"{str(path)!r} line {i}: each line needs a string field 'text'.")
        texts.append(obj["text"])
        labels.append(obj.get("label"))
    if not texts:
        raise UserError(f"{str(path)!r} holds no text lines.")
    given = [lab is not None for lab in labels]
    if any(given) and not all(given):
        raise UserError(
            f"{str(path)!r}: {given.count(False)} of {len(given)} lines have no 'label'; label all or none."
        )
    return texts, (labels if all(given) else None)


def blocks_of(ids: torch.Tensor, seq_len: int, source: str) -> dict[str, torch.Tensor]:
    """Cut one token stream into ``(N, seq_len)`` blocks; the tail that does not fill a block goes."""
    n = ids.numel() // seq_len
    if n < 2:
        raise UserError(
            f"{source}: {ids.numel()} tokens make fewer than 2 blocks of {seq_len}; give more text "
            "or a smaller --seq-len."
        )
    x = ids[: n * seq_len].reshape(n, seq_len).long()
    return {"input_ids": x, "labels": x.clone()}


def _label_ids(labels: list[Any], model: Any, source: str) -> torch.Tensor:
    names = getattr(model.config, "label2id", None) or {}
    out = []
    for lab in labels:
        if isinstance(lab, bool) or not isinstance(lab, (int, str)):
            raise UserError(f"{source}: label {lab!r} is neither an integer nor a label name.")
        if isinstance(lab, str):
            if lab not in names:
                raise UserError(f"{source}: label {lab!r} is not one of the model's labels {sorted(names)}.")
            lab = names[lab]
        out.append(int(lab))
    y = torch.tensor(out, dtype=torch.long)
    n = getattr(model.config, "num_labels", None)
    if n and (int(y.min()) < 0 or int(y.max()) >= n):
        raise UserError(f"{source}: labels go from {int(y.min())} to {int(y.max())}; the model has {n} classes.")
    return y


def _tokenize(texts: list[str], labels: list[Any] | None, model: Any, seq_len: int, source: str) -> TextItems:
    tok = load_tokenizer(model)
    if _is_causal(model):
        ids = [torch.tensor(tok(t)["input_ids"], dtype=torch.long) for t in texts]
        return TextItems(blocks_of(torch.cat(ids), seq_len, source))
    if tok.pad_token_id is None:
        raise UserError(f"the tokenizer of {model.config.name_or_path!r} has no pad token; set one and save it.")
    enc = tok(texts, padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
    items = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if labels is not None:
        items["labels"] = _label_ids(labels, model, source)
    return TextItems(items)


def _tokenized_pt(path: Path, model: Any) -> TextItems | None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # not plain tensors: the other .pt readers explain
    if isinstance(obj, torch.Tensor):
        obj = {"input_ids": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("input_ids"), torch.Tensor):
        return None
    ids = obj["input_ids"]
    if ids.dim() != 2 or ids.is_floating_point():
        raise UserError(f"{str(path)!r}: input_ids must be integer token ids of shape (N, L), not {tuple(ids.shape)}.")
    items = {"input_ids": ids.long()}
    mask = obj.get("attention_mask")
    if mask is not None:
        if tuple(mask.shape) != tuple(ids.shape):
            raise UserError(
                f"{str(path)!r}: attention_mask {tuple(mask.shape)} must match input_ids {tuple(ids.shape)}."
            )
        items["attention_mask"] = mask.long()
    labels = obj.get("labels")
    if labels is None and _is_causal(model):
        labels = ids.long().masked_fill(items["attention_mask"] == 0, -100) if mask is not None else ids.long()
    if labels is not None:
        items["labels"] = torch.as_tensor(labels).long()
    return TextItems(items)


def load_text_dataset(spec: str, options: dict[str, Any]) -> Dataset | None:
    """Text data for a ``transformers`` model (see the module docstring), or ``None``."""
    model = options.get("model")
    path = Path(spec)
    suffix = path.suffix.lower()
    if not is_hf_model(model) or not path.is_file() or suffix not in (".txt", ".jsonl", ".pt", ".pth"):
        return None
    if suffix in (".pt", ".pth"):
        return _tokenized_pt(path, model)
    seq_len = _seq_len(model, options.get("seq_len"))
    if suffix == ".txt":
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise UserError(f"{spec!r} holds no text.")
        return _tokenize(texts, None, model, seq_len, spec)
    texts, labels = read_jsonl(path)
    return _tokenize(texts, labels, model, seq_len, spec)


@hookimpl(trylast=True)
def cleanai_load_dataset(spec, options):
    return load_text_dataset(spec, options)
