"""Text data for Hugging Face models: ``--data`` as ``.txt``, ``.jsonl`` or tokenized ``.pt``.

Used when ``--model`` is a ``transformers`` model (``hf:PATH``); otherwise these files fall
through to the other loaders.

- ``.txt``: one document per line (blank lines skipped); a **folder** of ``.txt`` files
  reads every ``*.txt`` in it (sorted by name, not recursive) the same way.
- ``.jsonl``: one JSON object per line with a ``text`` field, and an optional ``label``
  (an integer, or a name from the config's ``label2id``) for sequence classifiers.
- ``.pt``: already tokenized, so no tokenizer is needed: a ``LongTensor`` of ids
  ``(N, L)``, or a dict with ``input_ids`` (and optionally ``attention_mask``,
  ``labels``, and the per-token inputs the model's forward takes, such as
  ``token_type_ids``). ``.npz``: the same, as integer arrays ``input_ids`` (or ``x``), optionally
  ``attention_mask`` and ``labels`` (or ``y``). Rows are used as they are (``--seq-len``
  does not cut them); ids must lie in ``0..vocab_size-1`` and rows must fit the model's
  context.

Text files must be UTF-8. Only models that read token ids take text data: causal LMs,
classifiers, plain encoders and encoder-decoders that generate; a multiple-choice model
takes tokenized ``(N, choices, L)`` ids only, and a model without a vocabulary (ViT) or
one that reads audio (Whisper) is refused text with a message. Such a model takes a
``.pt`` dict of its forward's own inputs (``input_values``, ``input_features`` or
``pixel_values``, and ``labels``: :func:`_keyword_pt`); a text-and-image model takes
``pixel_values`` beside ``input_ids``.

For a **causal LM** the documents are tokenized, joined and cut into blocks of
``--seq-len`` tokens (default 128, at most the model's context); every item is
``{"input_ids", "labels"}`` with ``labels = input_ids`` (padding, if any, set to -100), and
the evaluator reports perplexity. For a **sequence classifier** each document is one item,
padded to the longest (at most ``--seq-len`` tokens), with its ``label`` if given. For a
**masked LM** each document is one item too, with 15% of its real tokens masked (a fixed
draw) and ``labels`` holding them, so the evaluator reports the masked tokens' accuracy and
perplexity; tokenized data is masked the same way where the model folder has a tokenizer
with a mask token. For an **encoder-decoder LM** (T5, BART, Marian) each document is one
item and also its own target, or a ``.jsonl`` line gives ``text`` and ``target``; the
decoder reads the target shifted right and the evaluator reports the target tokens'
perplexity. A **token classifier** takes ``labels`` ``(N, L)`` (``-100`` not scored), or in a
``.jsonl`` a list of one tag per word, a
**question-answering** head ``start_positions`` and ``end_positions`` ``(N,)``, a
**regression** head (one output) float labels. The tokenizer is the one saved in the
model folder.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from cleanai_core import hookimpl
from cleanai_core.errors import UserError, shown
from cleanai_plugins.io.hf import head_kind, is_hf_model, is_masked_lm, load_tokenizer

__all__ = ["TextItems", "blocks_of", "load_text_dataset", "masked_tokens", "read_jsonl", "read_text", "reads_token_ids"]

DEFAULT_SEQ_LEN = 128
log = logging.getLogger("cleanai")


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
    """A causal LM: ``...ForCausalLM`` / ``...LMHeadModel``, or another decoder-only model
    that generates (a vision-language ``...ForConditionalGeneration`` run on text)."""
    arch = (getattr(model.config, "architectures", None) or [""])[0]
    if arch.endswith(("ForCausalLM", "LMHeadModel")) or type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    generates = getattr(model, "can_generate", None)
    return bool(callable(generates) and generates() and not getattr(model.config, "is_encoder_decoder", False))


def _seq_len(model: Any, asked: int | None) -> int:
    limit = _context(model)
    n = int(asked or DEFAULT_SEQ_LEN)
    if limit and n > int(limit):
        if asked:
            raise UserError(f"--seq-len {asked} is longer than the model's context ({limit} positions).")
        n = int(limit)
    return n


#: byte-order marks of the UTF-16 / UTF-32 files some editors save "Unicode" text as (Windows
#: Notepad: UTF-16 LE), longest first (UTF-32 LE starts with UTF-16 LE's mark)
_UNICODE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                 (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # fmt: skip


def read_text(path: Path) -> str:
    """The file as UTF-8 text (a byte-order mark is dropped), or as UTF-16 / UTF-32 where it
    starts with their byte-order mark; else a :class:`UserError` naming the first byte that
    is not UTF-8."""
    data = path.read_bytes()
    codec = next((name for bom, name in _UNICODE_BOMS if data.startswith(bom)), "utf-8-sig")
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        if codec != "utf-8-sig":
            raise UserError(f"{str(path)!r} starts with a {codec.upper()} byte-order mark but is not {codec.upper()} "
                            f"text (byte {exc.start}); save it as UTF-8.") from None  # fmt: skip
        bad = data[exc.start : exc.start + 1]
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{str(path)!r} is not UTF-8 text (byte {exc.start}, line {line}, is {bad!r}); save it as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8 in.txt > out.txt)."
        ) from None


def text_lines(text: str) -> list[str]:
    """``text``'s lines as a file is read line by line: split at ``\\n``, ``\\r\\n`` and ``\\r``
    only. ``str.splitlines`` also splits at U+2028, U+2029, NEL (U+0085) and form feeds, which
    a JSON string holds as they are (``json.dumps(..., ensure_ascii=False)``): a valid
    ``.jsonl`` line was refused as "not JSON", and a ``.txt`` document cut in two."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def read_jsonl(path: Path, label: str = "label") -> tuple[list[str], list[Any] | None]:
    """Texts and labels (``None`` when no line has one) of a ``.jsonl`` file; ``label`` is
    the field that holds them (``"target"``: an encoder-decoder's target text)."""
    texts, labels = [], []
    for i, line in enumerate(text_lines(read_text(path)), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:  # a number of over 4,300 digits, nesting past the stack
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)[:120] or type(exc).__name__
            raise UserError(f"{str(path)!r} line {i} is not JSON ({why}); write one JSON object per line.") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UserError(f"{str(path)!r} line {i}: each line needs a string field 'text'.")
        texts.append(obj["text"])
        labels.append(obj.get(label))
        if label == "target" and labels[-1] is not None and not isinstance(labels[-1], str):
            raise UserError(f"{str(path)!r} line {i}: 'target' must be a string (the text to generate).")
    if not texts:
        raise UserError(f"{str(path)!r} holds no text lines.")
    given = [lab is not None for lab in labels]
    if any(given) and not all(given):
        raise UserError(
            f"{str(path)!r}: {given.count(False)} of {len(given)} lines have no {label!r}; label all or none."
        )
    return texts, (labels if all(given) else None)


def blocks_of(ids: torch.Tensor, seq_len: int, source: str) -> dict[str, torch.Tensor]:
    """Cut one token stream into ``(N, seq_len)`` blocks; the tail that does not fill a block goes.
    A block of one token predicts no next token: ``--seq-len 1`` reported "the data has no
    labels" where it meant that, and no perplexity."""
    if seq_len < 2:
        raise UserError(
            f"{source}: --seq-len {seq_len} cuts the text into blocks of one token, and a causal language model "
            "predicts each next token of a block: give --seq-len 2 or more (the default is 128)."
        )
    n = ids.numel() // seq_len
    if n < 2:
        raise UserError(
            f"{source}: {ids.numel()} tokens make fewer than 2 blocks of {seq_len}; give more text "
            "or a smaller --seq-len."
        )
    x = ids[: n * seq_len].reshape(n, seq_len).long()
    return {"input_ids": x, "labels": x.clone()}


def _float32_or_nan(value: float) -> float:
    """``value`` as float32 holds it, or NaN where it cannot (an integer past float64's range)."""
    try:
        return float(torch.tensor(float(value), dtype=torch.float32))
    except OverflowError:
        return math.nan


def _label_ids(labels: list[Any], model: Any, source: str, one: bool = False) -> torch.Tensor:
    """Class indices of ``labels`` (integers or the config's label names); a regression
    head's numbers; a multi-label head's lists as multi-hot rows (``one``: a single list's
    classes)."""
    if head_kind(model) == "regression":  # one number per text: kept as it is (cast to integers before)
        bad = next((lab for lab in labels if isinstance(lab, bool) or not isinstance(lab, (int, float))), None)
        if bad is not None:
            raise UserError(f"{source}: label {bad!r} is not a number; the model is a regression head (one output).")
        y = torch.tensor([_float32_or_nan(lab) for lab in labels])
        if not bool(torch.isfinite(y).all()):  # NaN, inf (JSON's 1e400), past float32: the loss was NaN
            bad = labels[int((~torch.isfinite(y)).nonzero()[0])]
            raise UserError(f"{source}: label {shown(bad)} is not a finite number within float32's range; the "
                            "model is a regression head: give each text a finite target.")  # fmt: skip
        return y
    names = getattr(model.config, "label2id", None) or {}
    n = getattr(model.config, "num_labels", None)
    if head_kind(model) == "multilabel" and not one:  # each text: a list of its classes -> a multi-hot row
        if not all(isinstance(lab, list) for lab in labels):
            raise UserError(f"{source}: the model is a multi-label classifier: give each 'label' as a list of "
                            "classes (integers or label names), e.g. [0, 2] or [].")  # fmt: skip
        rows = torch.zeros(len(labels), int(n or 0))
        for i, lab in enumerate(labels):
            if lab:
                rows[i, _label_ids(lab, model, source, one=True)] = 1.0
        return rows
    out = []
    for lab in labels:
        if isinstance(lab, bool) or not isinstance(lab, (int, str)):
            raise UserError(f"{source}: label {lab!r} is neither an integer nor a label name.")
        if isinstance(lab, str):
            if lab not in names:
                raise UserError(f"{source}: label {lab!r} is not one of the model's labels {sorted(names)}.")
            lab = names[lab]
        out.append(int(lab))
    # checked before the tensor is made: a label of 10**30 raised "Overflow when unpacking long long"
    if out and ((n and (min(out) < 0 or max(out) >= n)) or min(out) < -(2**63) or max(out) >= 2**63):
        raise UserError(f"{source}: labels go from {min(out)} to {max(out)}; the model has {n} classes.")
    return torch.tensor(out, dtype=torch.long)


def _tokenize(texts: list[str], labels: list[Any] | None, model: Any, seq_len: int, source: str) -> TextItems:
    tok = load_tokenizer(model)
    if _is_causal(model):
        ids = [torch.tensor(tok(t)["input_ids"], dtype=torch.long) for t in texts]
        return TextItems(blocks_of(torch.cat(ids), seq_len, source))
    _pad_with_the_models_own(tok, model)
    _pad_token_for(model, tok.pad_token_id, source)
    enc = _encoded(tok, texts, seq_len, source)
    items = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if head_kind(model) == "seq2seq":  # the target (a jsonl 'target', else the text itself) is what it predicts
        target = _encoded(tok, labels or texts, seq_len, source)
        return TextItems({**items, **seq2seq_targets(model, target["input_ids"], target["attention_mask"])})
    if labels is not None and head_kind(model) == "token":
        return TextItems(_word_tags(tok, texts, labels, model, seq_len, source))
    if labels is not None:
        items["labels"] = _label_ids(labels, model, source)
    elif is_masked_lm(model):
        items.update(masked_tokens(items["input_ids"], items["attention_mask"], tok))
    return TextItems(items)


def _pad_with_the_models_own(tok: Any, model: Any) -> None:
    """Rows of several lengths are padded: a tokenizer without a pad token pads with the
    config's ``pad_token_id`` (a classifier fine-tuned with ``model.config.pad_token_id =
    tokenizer.eos_token_id``, whose tokenizer was saved without one: refused before, though
    the model names the token it was trained to skip); without either, a :class:`UserError`
    says how to set one. Only the loaded tokenizer changes, never the folder."""
    if tok.pad_token_id is not None:
        return
    pad = getattr(model.config, "pad_token_id", None)
    name = tok.convert_ids_to_tokens(int(pad)) if isinstance(pad, int) and 0 <= pad < len(tok) else None
    if name is None:
        where = model.config.name_or_path
        raise UserError(
            f"the tokenizer of {where!r} has no pad token and its config.json no pad_token_id that the tokenizer "
            "holds, so rows of several lengths cannot be padded; set one and save it (e.g. tokenizer.pad_token = "
            f"tokenizer.eos_token; tokenizer.save_pretrained({where!r})) and run again."
        )
    tok.pad_token = name
    log.info("the tokenizer has no pad token: padding with the config's pad_token_id %d (%r)", pad, name)


def _pad_token_for(model: Any, pad: int | None, source: str) -> None:
    """A sequence classifier on a decoder (Llama, GPT-2, Qwen2) pools the last token that is
    not ``config.pad_token_id``, and refuses batches of more than one row without one
    (``Cannot handle batch sizes > 1 if no padding token is defined``), which the job
    blamed on the data. Their checkpoints usually have none: the tokenizer's pad token
    (the one that padded the rows) is written into the loaded model's config (the source
    folder is not touched; the pruned ``hf/`` config keeps it). Without a tokenizer, a
    :class:`UserError` says what to set."""
    if getattr(model.config, "pad_token_id", 0) is not None or head_kind(model) not in (
        "sequence",
        "regression",
        "multilabel",
    ):
        return
    if pad is None:
        raise UserError(
            f"{source}: {type(model).__name__} has no pad_token_id in its config, and without one it takes one row "
            "at a time (it finds each row's last token by it); set pad_token_id in the folder's config.json (or save "
            "its tokenizer beside it) and run again."
        )
    model.config.pad_token_id = int(pad)
    log.info("config.pad_token_id set to the tokenizer's pad token (%d): batches of padded rows need it", pad)


def _word_tags(tok: Any, texts: list[str], labels: list[Any], model: Any, seq_len: int, source: str) -> dict:
    """A token classifier's ``.jsonl``: ``label`` is a list with one tag (an integer or a
    label name) per word of ``text`` (split on white space); each word's first sub-token
    carries its tag, its other sub-tokens and the special tokens -100 (not scored)."""
    words = [t.split() for t in texts]
    for i, (w, lab) in enumerate(zip(words, labels, strict=True), 1):
        if not isinstance(lab, list) or len(lab) != len(w):
            what = f"{len(lab)} tags" if isinstance(lab, list) else repr(lab)
            raise UserError(f"{source}: text {i} has {len(w)} words but its label is {what}; a token classifier "
                            "takes a list of one tag per word (split on white space).")  # fmt: skip
    enc = tok(words, is_split_into_words=True, padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
    if not hasattr(enc, "word_ids"):
        raise UserError(f"{source}: the tokenizer ({type(tok).__name__}) cannot say which word each token comes "
                        "from; give the tags per token in a .pt file (labels (N, L), -100 where none).")  # fmt: skip
    tags = torch.full_like(enc["input_ids"], -100)
    for row, lab in enumerate(labels):
        seen = set()
        for pos, word in enumerate(enc.word_ids(row)):
            if word is not None and word not in seen:
                seen.add(word)
                tags[row, pos] = int(_label_ids([lab[word]], model, source)[0])
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": tags}


def _encoded(tok: Any, texts: list[str], seq_len: int, source: str) -> Any:
    enc = tok(texts, padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
    empty = (enc["attention_mask"].sum(dim=1) == 0).nonzero().flatten().tolist()
    blank = [i for i in empty if not texts[i].strip()]
    if blank:  # an empty 'text' in a .jsonl; the tokenizer is not to blame
        raise UserError(
            f"{source}: {len(blank)} of {len(texts)} texts are empty (the first: text {blank[0] + 1}) and the "
            f"tokenizer adds no token of its own to them; give each a text or leave it out."
        )
    if empty:  # a zero-length row fails inside the model with a reshape error that names nothing
        raise UserError(
            f"{source}: the tokenizer ({type(tok).__name__}) made no tokens of {len(empty)} of {len(texts)} texts "
            f"(the first: {texts[empty[0]][:60]!r}); check that the model folder holds this model's own tokenizer."
        )
    return enc


def seq2seq_targets(model: Any, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """An encoder-decoder's ``labels`` (the target ids, padding -100) and the
    ``decoder_input_ids`` it reads (the target shifted right after its start token, as
    its own ``prepare_decoder_input_ids_from_labels`` makes them where it has one)."""
    labels = ids.long() if mask is None else ids.long().masked_fill(mask == 0, -100)
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if callable(prepare):
        decoder = prepare(labels=labels)
    else:
        config = model.config
        start = getattr(config, "decoder_start_token_id", None)
        start = start if start is not None else getattr(model.generation_config, "decoder_start_token_id", None)
        pad = getattr(config, "pad_token_id", None)
        if start is None or pad is None:
            raise UserError(
                f"{type(model).__name__} has no decoder_start_token_id or pad_token_id in its config, which its "
                "decoder inputs are made from; set them (config.json) and run again."
            )
        decoder = torch.cat([torch.full_like(labels[:, :1], int(start)), labels[:, :-1]], dim=1)
        decoder = decoder.masked_fill(decoder == -100, int(pad))
    return {"decoder_input_ids": decoder.long(), "labels": labels}


#: the share of a masked LM's real tokens that the text data masks (BERT's pre-training share)
MASKED_SHARE = 0.15


def masked_tokens(ids: torch.Tensor, mask: torch.Tensor | None, tok: Any) -> dict[str, torch.Tensor]:
    """For a masked LM: ``MASKED_SHARE`` of the real tokens of each row (not padding, not
    special tokens; at least one per row), drawn with a fixed seed, replaced by the mask
    token; ``labels`` hold the original ids there and -100 elsewhere. ``{}`` when the
    tokenizer has no mask token (then the data has no labels)."""
    mask_id = getattr(tok, "mask_token_id", None) if tok is not None else None
    if mask_id is None:
        return {}
    special = _special_tokens(ids, tok)
    real = ~special if mask is None else mask.bool() & ~special
    picked = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < MASKED_SHARE) & real
    empty = ~picked.any(dim=1) & real.any(dim=1)
    picked[empty, real[empty].float().argmax(dim=1)] = True
    return {"input_ids": ids.masked_fill(picked, mask_id), "labels": ids.masked_fill(~picked, -100)}


def _special_tokens(ids: torch.Tensor, tok: Any) -> torch.Tensor:
    """Where ``ids`` holds the tokenizer's special tokens. ``get_special_tokens_mask`` where it
    works; LUKE's fails in transformers itself (``super(type, obj): obj must be an instance
    or subtype of type``): its special ids then."""
    try:
        rows = [tok.get_special_tokens_mask(row, already_has_special_tokens=True) for row in ids.tolist()]
        return torch.tensor(rows, dtype=torch.bool).reshape(ids.shape)
    except Exception:  # noqa: BLE001 - the tokenizer's own method is broken: its special ids say the same
        return torch.isin(ids, torch.tensor(sorted(set(getattr(tok, "all_special_ids", []) or [])), dtype=ids.dtype))


def vocab_size(model: Any) -> int | None:
    """Rows of the model's input embedding: the token ids it reads are ``0..V-1``; ``None``
    for a model that reads no token ids (ViT, audio)."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if isinstance(emb, torch.nn.Embedding):
        return int(emb.num_embeddings)
    weight = getattr(emb, "weight", None)  # I-BERT's QuantEmbedding: a table of its own class
    if "Embedding" in type(emb).__name__ and isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[0])
    return None


#: forward arguments of a model that reads something besides token ids (pixels, audio)
_OTHER_INPUTS = ("pixel_values", "input_features", "input_values")


def reads_token_ids(model: Any) -> bool:
    """Whether ``model`` reads token ids: its forward takes ``input_ids`` where it takes
    pixels or audio (Whisper's takes ``input_features``, though its decoder embeds tokens),
    and it has a token embedding, or, without one (``get_input_embeddings`` not
    implemented: CANINE hashes character code points into 8 tables), no pixel or audio
    input."""
    import inspect

    try:
        takes = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = None
    if takes is not None and "input_ids" not in takes and any(k in takes for k in _OTHER_INPUTS):
        return False
    if vocab_size(model) is not None:
        return True
    return (
        takes is not None
        and "input_ids" in takes
        and not any(k in takes for k in _OTHER_INPUTS)
        and (_no_embedding_table(model))
    )


def _no_embedding_table(model: Any) -> bool:
    """``get_input_embeddings`` is not implemented, or gives no layer (Perceiver's gives its
    latents array, a parameter: its text preprocessor embeds the token ids)."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return True
    return emb is not None and not isinstance(emb, torch.nn.Module)


def _context(model: Any) -> int | None:
    """The longest rows the model's positions take; ``None``: no limit (XLNet's relative
    positions: ``max_position_embeddings = -1``)."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if not (isinstance(limit, (int, float)) and limit > 0):
        return None
    # RoBERTa's family (XLM-R, CamemBERT, Longformer, Data2Vec, ESM, I-BERT) numbers positions
    # from padding_idx + 1: roberta-base's 514 positions take rows of 512 tokens
    offset = max(
        (int(m.padding_idx) + 1 for n, m in model.named_modules()
         if n.endswith("position_embeddings") and isinstance(getattr(m, "padding_idx", None), int)),
        default=0,
    )  # fmt: skip
    return int(limit) - offset


def _check_text_model(model: Any, spec: str, tokenized: bool = False) -> None:
    """Refuse, with the reason, a model that the text items cannot drive."""
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    kind = head_kind(model)
    if kind == "choice" and not tokenized:
        raise UserError(
            f"--data {spec!r}: the model is {arch}, a multiple-choice model: it reads several candidate sequences "
            "per sample, which plain text does not say. Give them tokenized in a .pt file: a dict with input_ids "
            "(N, choices, L), optionally attention_mask of the same shape, and labels (N,) (the right choice)."
        )
    # a sequence classifier or question-answering head of BART / T5 makes its decoder inputs from input_ids;
    # an encoder-decoder LM is given them (the target shifted right)
    if getattr(model.config, "is_encoder_decoder", False) and kind not in ("sequence", "regression", "span", "seq2seq"):
        raise UserError(
            f"--data {spec!r}: the model is {arch}, an encoder-decoder (sequence-to-sequence) model; text data "
            "drives causal LMs (...ForCausalLM), sequence classifiers and plain encoders, not a decoder that "
            "needs decoder_input_ids. Give a causal LM or encoder folder, or prune it from Python with "
            "StructuredPruner and example inputs that include decoder_input_ids."
        )


def _check_ids(ids: torch.Tensor, model: Any, source: str) -> None:
    """Token ids within the vocabulary, rows within the context."""
    v = vocab_size(model)
    lo, hi = int(ids.min()), int(ids.max())
    if v is not None and (lo < 0 or hi >= v):
        raise UserError(
            f"{source}: token ids go from {lo} to {hi}, but the model's vocabulary has {v} entries (ids 0..{v - 1}); "
            "tokenize the text with this model's own tokenizer."
        )
    limit = _context(model)
    if limit and ids.shape[-1] > limit:
        raise UserError(
            f"{source}: rows of {ids.shape[-1]} tokens are longer than the model's context ({limit} positions); "
            f"cut them to at most {limit} tokens (or give text and --seq-len)."
        )


def _token_items(obj: dict[str, Any], model: Any, source: str) -> TextItems:
    ids = obj["input_ids"]
    kind = head_kind(model)
    rank, form = (3, "(N, choices, L)") if kind == "choice" else (2, "(N, L)")
    if ids.dim() != rank or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        what = " for a multiple-choice model" if kind == "choice" else ""
        raise UserError(
            f"{source}: input_ids must be integer token ids of shape {form}{what}, not {ids.dtype} {tuple(ids.shape)}."
        )
    if ids.numel() == 0:
        raise UserError(f"{source}: input_ids {tuple(ids.shape)} hold no tokens.")
    _check_ids(ids, model, source)
    items = {"input_ids": ids.long()}
    mask = obj.get("attention_mask")
    if mask is not None:
        if tuple(mask.shape) != tuple(ids.shape):
            raise UserError(f"{source}: attention_mask {tuple(mask.shape)} must match input_ids {tuple(ids.shape)}.")
        items["attention_mask"] = _checked_mask(mask, source)
    obj = _answer_spans(obj, ids, kind, source)
    if getattr(model.config, "pad_token_id", 0) is None and kind in ("sequence", "regression", "multilabel"):
        tok = load_tokenizer(model, False)
        _pad_token_for(model, getattr(tok, "pad_token_id", None), source)
    items.update(_per_token_inputs(obj, ids, model, source))
    labels = obj.get("labels")
    decoder = items.get("decoder_input_ids")
    if kind == "seq2seq" and decoder is not None and labels is not None:  # given as they are: labels match them
        if tuple(torch.as_tensor(labels).shape) != tuple(decoder.shape):
            raise UserError(f"{source}: labels {tuple(torch.as_tensor(labels).shape)} must match decoder_input_ids "
                            f"{tuple(decoder.shape)} (the target each decoder position predicts).")  # fmt: skip
    if kind == "seq2seq" and decoder is None:  # the target: labels, else the input itself
        target = torch.as_tensor(labels if labels is not None else ids)
        if target.dim() != 2 or target.is_floating_point() or len(target) != len(ids):
            raise UserError(f"{source}: an encoder-decoder's labels are target token ids (N, T), not "
                            f"{target.dtype} {tuple(target.shape)}.")  # fmt: skip
        _check_ids(target.masked_fill(target == -100, 0), model, source)
        items.update(seq2seq_targets(model, target.masked_fill(target == -100, 0), (target != -100).long()))
        return TextItems(items)
    if labels is None and _is_causal(model):
        labels = own_next_tokens(items)  # -100 where the attention mask hides a position
    if labels is not None:  # a regression head's numbers stay numbers, a multi-label head's rows too
        labels = torch.as_tensor(labels)
        if kind in ("regression", "multilabel"):
            items["labels"] = labels.float()
            if labels.is_complex() or not bool(torch.isfinite(items["labels"]).all()):  # a NaN loss, exit 0
                raise UserError(f"{source}: labels hold NaN, inf or values beyond float32's range; the model is a "
                                f"{kind} head: give finite targets.")  # fmt: skip
        else:
            items["labels"] = _checked_token_labels(labels, ids, model, kind, source)
    elif is_masked_lm(model):  # masked with the folder's tokenizer, where it has one with a mask token
        items.update(masked_tokens(items["input_ids"], items.get("attention_mask"), load_tokenizer(model, False)))
    return TextItems(items)


def own_next_tokens(item: dict[str, torch.Tensor]) -> torch.Tensor:
    """A causal LM's labels: its own ``input_ids`` (it predicts each next one), -100 where
    the ``attention_mask`` hides a position."""
    labels = item["input_ids"].long()
    mask = item.get("attention_mask")
    return labels.masked_fill(mask == 0, -100) if isinstance(mask, torch.Tensor) else labels


class _OwnLabels(Dataset):
    """A data function's data set for a causal LM whose items are token ids without labels
    (a row of ids, or a dict with ``input_ids``): each item with :func:`own_next_tokens`."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        item = self.data[i]
        if _integer(item) and item.dim() == 1:
            return {"input_ids": item.long(), "labels": item.long()}
        if isinstance(item, dict) and "labels" not in item and _integer(item.get("input_ids")):
            return {**item, "labels": own_next_tokens(item)}
        return item


def _integer(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def function_data(data: Any, model: Any, spec: str) -> Any:
    """What a data function (``--data package.module:function``) returned, for a
    ``transformers`` model: token ids as a ``.pt`` holds them (a tensor ``(N, L)``, or a dict
    with ``input_ids``) are read as that file is (ids checked against the vocabulary and the
    context; a causal LM's labels are its own ids); a causal LM's data set of unlabelled ids
    gets those labels item by item. Anything else is returned as it is. The same ids gave
    ``Accuracy not measured: the data has no labels`` (a tensor, a data set) or ``reading item
    1 failed (KeyError: 1)`` (a dict) where a ``.pt`` of them gave the held-out perplexity."""
    if _integer(data) and data.dim() == 2:
        data = {"input_ids": data}
    if isinstance(data, dict) and isinstance(data.get("input_ids"), torch.Tensor):
        _check_text_model(model, spec, tokenized=True)
        return _token_items(data, model, spec)
    if _is_causal(model) and isinstance(data, (Dataset, list)):  # an (x, y) pair stays a pair
        return _OwnLabels(data)
    return data


def _checked_mask(mask: torch.Tensor, source: str) -> torch.Tensor:
    """An attention mask of 0 and 1 with a real token somewhere, as integers. A float mask of
    other values was cut to 0 (``mask.long()``: a mask of ``torch.rand`` became all 0) and a
    mask of zeros made every token padding; both ended in "the calibration data holds no
    samples (every batch is empty)"; a 2 was read as 1 without a word. A row of zeros
    among others (an empty document) stays: it is padding only."""
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        odd = mask[(mask != 0) & (mask != 1)].reshape(-1)[:1].tolist() if not mask.is_complex() else ["complex"]
        raise UserError(
            f"{source}: attention_mask holds {odd[0]!r}; a mask is 1 at real tokens and 0 at padding (the tokenizer's "
            "attention_mask), in integers or booleans."
        )
    if not bool(mask.bool().any()):
        raise UserError(
            f"{source}: attention_mask is 0 everywhere: no row holds a real token (a mask is 1 at the tokens and 0 "
            "at padding); give the tokenizer's attention_mask."
        )
    return mask.long()


def _checked_token_labels(labels: torch.Tensor, ids: torch.Tensor, model: Any, kind: str, source: str) -> torch.Tensor:
    """Class or token labels as integers: whole numbers, and for a label per token (a causal
    or masked LM's next or hidden tokens, a tagger's tags) within what the head predicts,
    ``-100`` marking positions left out; a causal LM's shaped like ``input_ids`` (a tagger's
    of another shape leave accuracy unmeasured, with a note naming the shapes). Float labels were
    cut to integers (a causal LM's ``torch.rand`` labels became all 0 and the report gave a
    perplexity of them), other shapes and ids beyond the vocabulary failed in the held-out
    pass with the model's own ``Expected input batch_size (124) to match target batch_size
    (60)`` / ``Target 1000000 is out of bounds``."""
    if labels.is_complex() or (labels.is_floating_point() and not bool((labels == labels.round()).all())):
        odd = labels[labels != labels.round()] if labels.is_floating_point() else labels
        raise UserError(f"{source}: labels must be integers (class indices or token ids), not {labels.dtype} values "
                        f"such as {odd.reshape(-1)[:1].tolist()[0]!r}.")  # fmt: skip
    labels = labels.long()
    causal = _is_causal(model)
    if not (causal or kind in ("masked", "token")):
        return labels
    if tuple(labels.shape) != tuple(ids.shape):
        if not causal:  # a tagger given a label per text: the evaluator's note names the shapes
            return labels
        raise UserError(f"{source}: labels {tuple(labels.shape)} must match input_ids {tuple(ids.shape)}: one label "
                        "per token (-100 where none is scored).")  # fmt: skip
    n = getattr(model.config, "num_labels", None) if kind == "token" else vocab_size(model)
    scored = labels[labels != -100]
    if n and scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= n):
        what = f"the model has {n} tags (0..{n - 1})" if kind == "token" else f"the vocabulary has {n} ids (0..{n - 1})"
        raise UserError(f"{source}: labels go from {int(scored.min())} to {int(scored.max())}, but {what}; -100 marks "
                        "a position that is not scored.")  # fmt: skip
    return labels


_TOKEN_KEYS = ("input_ids", "x", "attention_mask", "labels", "y")
#: a question-answering head's answer, one position each per row
_SPAN_KEYS = ("start_positions", "end_positions")


def _answer_spans(obj: dict[str, Any], ids: torch.Tensor, kind: str, source: str) -> dict[str, Any]:
    """For a question-answering head, ``start_positions`` and ``end_positions`` (one token
    position each per row) become ``labels`` ``(N, 2)``, which the evaluator scores (exact
    match of both); they were refused as per-token inputs not shaped like ``input_ids``."""
    given = [k for k in _SPAN_KEYS if obj.get(k) is not None]
    if kind != "span" or not given:
        return obj
    if len(given) == 1:
        raise UserError(f"{source}: {given[0]} without {({*_SPAN_KEYS} - {given[0]}).pop()}; give both or neither.")
    pos = [torch.as_tensor(obj[k]) for k in _SPAN_KEYS]
    for k, t in zip(_SPAN_KEYS, pos, strict=True):
        if tuple(t.shape) != (len(ids),) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise UserError(f"{source}: {k} must be {len(ids)} integer token positions (one per row of input_ids), "
                            f"not {t.dtype} {tuple(t.shape)}.")  # fmt: skip
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= ids.shape[-1]):
            raise UserError(f"{source}: {k} go from {int(t.min())} to {int(t.max())}; rows have {ids.shape[-1]} "
                            f"tokens (positions 0..{ids.shape[-1] - 1}).")  # fmt: skip
    if obj.get("labels") is not None:
        raise UserError(f"{source}: give the answers either as start_positions / end_positions or as labels, not both.")
    rest = {k: v for k, v in obj.items() if k not in _SPAN_KEYS}
    return {**rest, "labels": torch.stack(pos, dim=1).long()}


def _per_token_inputs(obj: dict[str, Any], ids: torch.Tensor, model: Any, source: str) -> dict[str, torch.Tensor]:
    """The other inputs of tokenized data (``token_type_ids`` of a sentence pair,
    ``position_ids``): integer tensors shaped like ``input_ids`` that the model's forward
    takes. They were dropped without a word, so a pair classifier ran on segment 0 only."""
    import inspect

    takes = inspect.signature(model.forward).parameters
    out = {}
    for key, value in obj.items():
        if key in _TOKEN_KEYS or value is None:
            continue
        if key not in takes:
            raise UserError(
                f"{source}: {type(model).__name__} takes no {key!r}; give input_ids, attention_mask, labels "
                "and the per-token inputs its forward takes (e.g. token_type_ids), or leave the key out."
            )
        t = torch.as_tensor(value)
        if key in _OTHER_INPUTS:  # pixels or audio beside the tokens (CLIP, SigLIP, BLIP): one row per row of ids
            out[key] = _signal(t, key, len(ids), source)
            continue
        decoder = key.startswith("decoder_") and getattr(model.config, "is_encoder_decoder", False)
        if decoder:  # an encoder-decoder's decoder side: its own length, the rows of input_ids
            first = obj.get("decoder_input_ids", t)
            shape, like = (len(ids), first.shape[-1] if first.dim() == 2 else -1), "(rows of input_ids, T)"
        else:
            shape, like = tuple(ids.shape), f"like input_ids {tuple(ids.shape)}"
        if tuple(t.shape) != shape or t.is_floating_point() or t.is_complex():
            raise UserError(f"{source}: {key} must be integers shaped {like}, not {t.dtype} {tuple(t.shape)}.")
        if key == "decoder_input_ids":
            _check_ids(t, model, source)
        types = getattr(model.config, "type_vocab_size", None) if key == "token_type_ids" else None
        if isinstance(types, int) and t.numel() and (int(t.min()) < 0 or int(t.max()) >= types):
            raise UserError(f"{source}: token_type_ids go from {int(t.min())} to {int(t.max())}; the model has "
                            f"{types} token types (0..{types - 1}).")  # fmt: skip
        out[key] = t.long()
    return out


def _signal(t: torch.Tensor, key: str, rows: int, source: str) -> torch.Tensor:
    """``pixel_values`` / ``input_features`` / ``input_values``: floating, ``rows`` rows."""
    if not t.is_floating_point() or t.dim() < 2 or len(t) != rows:
        raise UserError(
            f"{source}: {key} must be a floating tensor with {rows} rows (N, ...), not {t.dtype} {tuple(t.shape)}; "
            "give the values the model's feature extractor or image processor makes (floats)."
        )
    return t


def _keyword_pt(path: Path, model: Any) -> TextItems | None:
    """A ``.pt`` dict of the forward's own inputs for a model that reads no token ids alone
    (audio: ``input_values`` or ``input_features``; pixels: ``pixel_values``; with
    ``attention_mask`` and the like), and optionally ``labels``: what a feature extractor
    returns, saved as it is. Before session 21 only ``(x, y)`` or ``{'x', 'y'}`` were read,
    and this was refused ("expected keys 'x' and 'y'"). ``None`` where no key is an input
    of the forward (the other ``.pt`` readers explain)."""
    import inspect

    obj = _plain_pt(path)
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        return None
    takes = inspect.signature(model.forward).parameters
    main = [k for k in _OTHER_INPUTS if k in obj and k in takes]
    if not main:
        return None
    source, items = repr(str(path)), {}
    rows = len(torch.as_tensor(obj[main[0]]))
    for key, value in obj.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{source}: {key} is a {type(value).__name__}; every value must be a tensor (N, ...).")
        if key != "labels" and key not in takes:
            names = ", ".join(k for k in takes if k not in ("kwargs", "return_dict") and not k.startswith("output_"))
            raise UserError(
                f"{source}: {type(model).__name__} takes no {key!r}; give the inputs its forward takes ({names}) "
                "and labels, or leave the key out."
            )
        t = _signal(value, key, rows, source) if key in _OTHER_INPUTS else value
        if t.dim() == 0 or len(t) != rows:
            raise UserError(f"{source}: {key} has {len(t) if t.dim() else 0} rows, {main[0]} has {rows}; "
                            "every tensor needs one row per item.")  # fmt: skip
        items[key] = t
    if rows == 0:
        raise UserError(f"{source}: {main[0]} {tuple(obj[main[0]].shape)} holds no items.")
    if head_kind(model) == "seq2seq" and "decoder_input_ids" not in items:  # Whisper, Speech2Text
        labels = items.get("labels")
        if labels is not None:  # the transcript: what the decoder reads, shifted right after its start token
            if labels.dim() != 2 or labels.is_floating_point():
                raise UserError(f"{source}: an encoder-decoder's labels are target token ids (N, T), not "
                                f"{labels.dtype} {tuple(labels.shape)}.")  # fmt: skip
            _check_ids(labels.masked_fill(labels == -100, 0), model, source)
            items.update(seq2seq_targets(model, labels.masked_fill(labels == -100, 0), (labels != -100).long()))
        else:  # no transcript: the decoder reads its start token
            start = seq2seq_targets(model, torch.zeros(rows, 1, dtype=torch.long))["decoder_input_ids"]
            items["decoder_input_ids"] = start
    return TextItems(items)


def _plain_pt(path: Path) -> Any:
    """What a ``.pt`` data file holds, read as plain tensors only and never inflated past
    its size (:func:`~cleanai_core.special_files.check_not_packed`); ``None`` where it is
    not plain tensors (the other ``.pt`` readers explain)."""
    from cleanai_core.special_files import check_not_packed

    check_not_packed(path, "--data")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None


def _tokenized_pt(path: Path, model: Any) -> TextItems | None:
    obj = _plain_pt(path)
    if isinstance(obj, torch.Tensor):
        obj = {"input_ids": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("input_ids"), torch.Tensor):
        return None
    return _token_items(obj, model, repr(str(path)))


def _tokenized_npz(path: Path, model: Any) -> TextItems:
    from cleanai_plugins.io.datasets import read_npz

    arrays = read_npz(path)
    key = "input_ids" if "input_ids" in arrays else "x" if "x" in arrays else None
    if key is None:
        raise UserError(
            f"{str(path)!r} has arrays {sorted(arrays)}; token data needs 'input_ids' (or 'x'), and optionally "
            "'attention_mask' and 'labels' (or 'y')."
        )
    obj = {**arrays, "input_ids": arrays[key], "attention_mask": arrays.get("attention_mask")}
    obj.pop("x", None)
    labels = arrays.get("labels", arrays.get("y"))
    if labels is not None:
        obj["labels"] = labels
    obj.pop("y", None)
    return _token_items(obj, model, repr(str(path)))


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".txt" and p.is_file())


def load_text_dataset(spec: str, options: dict[str, Any]) -> Dataset | None:
    """Text data for a ``transformers`` model (see the module docstring), or ``None``."""
    model = options.get("model")
    path = Path(spec)
    suffix = path.suffix.lower()
    if not is_hf_model(model):
        return None
    files = _text_files(path) if path.is_dir() else []
    if not reads_token_ids(model):  # images, tensors, .npz go to the other loaders
        if files or (path.is_file() and suffix in (".txt", ".jsonl")):
            arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
            raise UserError(
                f"--data {spec!r} is text, but the model ({arch}) reads no token ids alone (it has no token "
                "embedding, or needs pixel or audio inputs too: a vision, audio or multimodal model). Give its own "
                "kind of data (an image folder, a .pt or .npz of input tensors), or a text model."
            )
        if path.is_file() and suffix in (".pt", ".pth"):
            return _keyword_pt(path, model)
        return None
    if path.is_dir() and not files:
        raise UserError(
            f"--data {spec!r} is a folder without .txt files; for a text model give a .txt file, a folder of .txt "
            "files (one document per line), a .jsonl file, or token ids in a .pt or .npz file."
        )
    if not files and not (path.is_file() and suffix in (".txt", ".jsonl", ".pt", ".pth", ".npz")):
        return None
    _check_text_model(model, spec, tokenized=suffix in (".pt", ".pth", ".npz"))
    if suffix in (".pt", ".pth"):
        return _tokenized_pt(path, model)
    if suffix == ".npz":
        return _tokenized_npz(path, model)
    seq_len = _seq_len(model, options.get("seq_len"))
    if suffix == ".jsonl":
        texts, labels = read_jsonl(path, "target" if head_kind(model) == "seq2seq" else "label")
        return _tokenize(texts, labels, model, seq_len, spec)
    texts = [line for f in (files or [path]) for line in text_lines(read_text(f)) if line.strip()]
    if not texts:
        what = f"the {len(files)} .txt file(s) in {spec!r} hold" if files else f"{spec!r} holds"
        raise UserError(f"{what} no text (only empty lines); give at least a few lines of text.")
    return _tokenize(texts, None, model, seq_len, spec)


@hookimpl(trylast=True)
def cleanai_load_dataset(spec, options):
    return load_text_dataset(spec, options)
