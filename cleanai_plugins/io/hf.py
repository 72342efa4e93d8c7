"""Hugging Face ``transformers`` models for the command line: ``--model hf:PATH``.

``PATH`` is a local folder written by ``save_pretrained`` or a model name already in the
Hugging Face cache. Nothing is downloaded: every load passes ``local_files_only=True``.
The class follows the config's ``architectures``: ``...ForCausalLM`` loads with
``AutoModelForCausalLM``, ``...ForSequenceClassification`` with
``AutoModelForSequenceClassification``, anything else with ``AutoModel``.

This module also gives the job, for these models:

- an evaluator: held-out **perplexity** for causal LMs (token-weighted mean negative
  log-likelihood of the next token, exponentiated), **accuracy** for sequence
  classifiers, and for masked LMs both, of the masked tokens (the text data masks 15% of
  the real tokens, the same ones in every run), on dict batches (``input_ids``,
  ``attention_mask``, ``labels``);
- the ``hf/`` output folder: the pruned model through ``save_pretrained`` (plus the
  tokenizer), kept only when ``from_pretrained`` reloads it with the same logits (in the
  model's dtype). The job computes in float32 (models load in it); the loader tells it the
  floating dtype the folder stores (``options["stored_dtype"]``), and the pruned weights
  (``model.pt`` and ``hf/``) are written in it: a ``bfloat16`` checkpoint stays ``bfloat16``;
- a report section saying which of these the user got.

``transformers`` is an optional extra: ``pip install cleanai[hf]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cleanai_core import hookimpl
from cleanai_core.calibration import split_batch
from cleanai_core.errors import UserError, model_fault
from cleanai_core.extras import import_extra
from cleanai_core.metrics import ctc_errors, perplexity
from cleanai_plugins.io.models import is_saved_folder

__all__ = ["auto_class", "is_hf_model", "is_masked_lm", "load_hf_model", "load_tokenizer"]

log = logging.getLogger("cleanai")

PREFIX = "hf:"
#: largest relative difference of logits for a reload to count as identical
RELOAD_RTOL = 1e-4


def _transformers():
    return import_extra("transformers", "an hf:PATH model", "pip install 'cleanai[hf]' (or pip install transformers)")


@contextlib.contextmanager
def _bars_as_cleanai_logs() -> Any:
    """transformers' progress bars ("Loading weights", "Writing model shards") off while
    the ``cleanai`` logger is set above INFO (``cleanai prune --quiet``), as it was
    before; ``--quiet`` promises no progress bars, and these two came through on stderr.
    A library caller who leaves the logger alone keeps transformers' own setting."""
    tf_logging = _transformers().utils.logging
    hide = log.level > logging.INFO and tf_logging.is_progress_bar_enabled()
    if hide:
        tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            tf_logging.enable_progress_bar()


def is_hf_model(model: Any) -> bool:
    """A ``transformers`` model: a module with a ``config`` carrying a ``model_type``."""
    return isinstance(model, nn.Module) and hasattr(getattr(model, "config", None), "model_type")


def auto_class(config: Any) -> Any:
    """The class for a config, from its ``architectures``: the named transformers class
    when transformers has it (``BertForMaskedLM``, ``SwinForImageClassification``: the
    saved weights carry its head and prefixes), else the ``AutoModel*`` class (the one the
    config's ``auto_map`` maps to that class, for a folder with code of its own)."""
    tf = _transformers()
    arch = (getattr(config, "architectures", None) or [""])[0]
    named = getattr(tf, arch, None) if arch.isidentifier() else None
    if isinstance(named, type) and hasattr(named, "from_pretrained") and hasattr(named, "config_class"):
        return named
    for key, ref in (getattr(config, "auto_map", None) or {}).items():  # code of the folder's own (auto_map)
        if isinstance(ref, str) and ref.rpartition(".")[2] == arch and key.startswith("AutoModel") and hasattr(tf, key):
            return getattr(tf, key)  # AutoModelForTokenClassification for its token classifier: AutoModel lost the head
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return tf.AutoModelForCausalLM
    if arch.endswith("ForSequenceClassification"):
        return tf.AutoModelForSequenceClassification
    return tf.AutoModel


def _source(spec: str) -> str:
    src = spec[len(PREFIX) :].strip()
    if not src:
        raise UserError("--model hf: needs a folder or a model name, e.g. hf:./my-model or hf:gpt2.")
    return src


def load_hf_model(spec: str, trust_remote_code: bool = False) -> nn.Module:
    """Load ``hf:PATH`` from a local folder or the Hugging Face cache (never the network).
    A folder whose config names code of its own (``auto_map``: ``modeling_*.py`` beside the
    weights) loads only with ``trust_remote_code`` (the user's ``--trust-code``): importing
    it runs that code. Without it, transformers asked on the terminal (``Do you wish to run
    the custom code? [y/N]``) and the refusal read ``no such local folder``."""
    tf = _transformers()
    src = _source(spec)
    path = Path(src).expanduser()
    if is_saved_folder(path):  # its config.json is the job's options: "no such local folder ... Unrecognized model"
        hf = (
            f" (or --model hf:{path / 'hf'} for its Hugging Face copy)"
            if (path / "hf" / "config.json").is_file()
            else ""
        )
        raise UserError(
            f"--model {spec!r}: {str(path)!r} is a folder `cleanai prune` wrote (its config.json holds the job's "
            f"options, not a transformers config); give --model {str(path)!r} without hf: to prune it further{hf}."
        )
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(
            f"--model {spec!r}: {str(path)!r} has no config.json; give a folder written by save_pretrained."
        )
    where = str(path) if path.exists() else src
    try:
        config = tf.AutoConfig.from_pretrained(where, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if not model_fault(exc):  # CleanAI's own errors, running out of memory
            raise
        if "trust_remote_code" in str(exc):
            raise UserError(_remote_code_refusal(spec, path if path.exists() else _cached_folder(src))) from exc
        if path.exists():  # said "no such local folder, and 'e' is not in the Hugging Face cache" of a folder here
            raise UserError(
                _unreadable_config(spec, path / "config.json", tf.__version__, exc, trust_remote_code)
            ) from exc
        raise UserError(
            f"--model {spec!r}: no such local folder, and {src!r} is not in the Hugging Face cache "
            f"(nothing is downloaded). Download it first (huggingface-cli download {src}) or give a folder "
            f"written by save_pretrained. ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    cls = auto_class(config)
    _check_weight_files(path if path.exists() else _cached_folder(src), spec)
    try:
        model = cls.from_pretrained(
            where, config=config, local_files_only=True, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    except ImportError as exc:  # a raw traceback, exit 1: bitsandbytes / GPTQ / FP8 folders need accelerate, optimum
        raise UserError(
            f"--model {spec!r}: transformers needs a package that is not installed to load this model "
            f"({_one_line(exc)}).{_quantized_note(config) or ' Install it, then run again.'}"
        ) from exc
    except Exception as exc:  # a damaged weights file: safetensors' SafetensorError; sizes unlike config.json's:
        if not model_fault(exc):  # RuntimeError (both were tracebacks, exit 1)
            raise
        folder = path if path.exists() else _cached_folder(src)
        files = sorted(folder.glob("*")) if folder is not None else []
        empty = [f for f in files if f.suffix in (".safetensors", ".bin") and _size(f) == 0]
        if empty:  # said "SafetensorError: Error while deserializing header: header too small"
            raise UserError(
                f"--model {spec!r}: the weights file {str(empty[0])!r} is empty (0 bytes); save the model again "
                "with save_pretrained."
            ) from None
        raise UserError(
            f"--model {spec!r}: transformers could not load the weights with {cls.__name__} "
            f"({type(exc).__name__}: {str(exc)[:300]}). The weights files in {where!r} may be truncated or damaged, "
            "or not fit its config.json (sizes); save the model again with save_pretrained."
        ) from exc
    _check_span_head(model, spec)
    if getattr(model.config, "return_dict", True) is False:
        _returns_outputs(model)
    return model.eval()


def _quantized_note(config: Any) -> str:
    """What to do with a checkpoint whose config holds a ``quantization_config``; ``""``
    for any other."""
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return ""
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    return (
        f" The folder holds a quantized model (quantization_config: quant_method {method!r}): CleanAI slices "
        "floating-point weights, which a quantized checkpoint does not hold. Give the unquantized checkpoint "
        "(float32, bfloat16 or float16), prune it, and quantize the pruned model afterwards."
    )


def _names_code(spec: str) -> bool:
    """Whether the folder ``spec`` names has a config with ``auto_map`` (code of its own)."""
    src = _source(spec)
    path = Path(src).expanduser()
    folder = path if path.exists() else _cached_folder(src)
    try:
        return bool(json.loads((folder / "config.json").read_text()).get("auto_map")) if folder else False
    except (OSError, ValueError, AttributeError):
        return False


def _remote_code_refusal(spec: str, folder: Path | None) -> str:
    try:
        auto_map = json.loads((folder / "config.json").read_text()).get("auto_map") if folder else None
    except (OSError, ValueError, AttributeError):
        auto_map = None
    named = sorted({str(v) for v in (auto_map or {}).values() if isinstance(v, str)})
    return (
        f"--model {spec!r}: the model's config.json names Python code that comes with it (auto_map: "
        f"{', '.join(named) or 'custom code'}); building the model imports and runs that code. If you trust the "
        "folder, pass --trust-code (load_pruned(..., trust_code=True)); else give a folder of a model "
        "transformers defines itself."
    )


#: folders whose own code the user consented to (``--trust-code`` or
#: ``load_pruned(..., trust_code=True)`` when the model was loaded from them), resolved; the
#: latest load of a folder decides (a load without consent takes it back)
_CONSENTED: set[str] = set()


def _folder_key(where: str) -> str:
    try:
        return str(Path(where).expanduser().resolve())
    except (OSError, RuntimeError, ValueError):
        return where


def trusts_remote_code(model: nn.Module) -> bool:
    """Whether the user consented to the code ``model``'s folder ships (``auto_map`` in its
    config or its tokenizer's config): its class is such code (transformers imports it as
    ``transformers_modules...``), or it was loaded from the folder with ``--trust-code``.
    The folder's config and tokenizer and the ``hf/`` copy are then read with it."""
    if type(model).__module__.startswith("transformers_modules"):
        return True
    where = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    return bool(where) and _folder_key(where) in _CONSENTED


def _tokenizer_code(where: str) -> list[str]:
    """The Python classes ``where/tokenizer_config.json`` maps to code of the folder's own
    (``auto_map``: ``tokenization_x.MyTokenizer``)."""
    try:
        auto_map = json.loads((Path(where) / "tokenizer_config.json").read_text(encoding="utf-8")).get("auto_map")
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return []
    refs = auto_map.values() if isinstance(auto_map, dict) else auto_map if isinstance(auto_map, list) else []
    flat = [r for ref in refs for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
    return sorted({r for r in flat if isinstance(r, str) and r})


def _unreadable_config(spec: str, config: Path, version: str, exc: Exception, trusted: bool = False) -> str:
    """Why transformers could not read the ``config.json`` of a local folder, and the fix
    (``trusted``: ``--trust-code`` was given)."""
    said = f"({type(exc).__name__}: {str(exc)[:200]})"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as bad:
        return (
            f"--model {spec!r}: {str(config)!r} is not valid JSON ({type(bad).__name__}: {bad}); it may be truncated "
            "or edited by hand. Save the model again with save_pretrained."
        )
    if isinstance(data, dict) and data.get("auto_map"):
        return (
            f"--model {spec!r}: {str(config)!r} names model code of its own (auto_map: "
            f"{', '.join(map(str, data['auto_map'].values()))[:120]}), "
            + (
                f"which could not be loaded {said}; check the folder holds the .py files auto_map names."
                if trusted
                else "which CleanAI neither imports nor runs without --trust-code: pass it if you trust the folder, "
                f"or give a model of a class transformers ships {said}."
            )
        )
    return (
        f"--model {spec!r}: transformers {version} cannot read {str(config)!r} {said}. A model type newer than this "
        "transformers needs an upgrade (pip install -U transformers); otherwise save the model again with "
        "save_pretrained."
    )


def _cached_folder(src: str) -> Path | None:
    """The Hugging Face cache's folder of the model named ``src`` (its ``config.json``'s)."""
    try:
        found = _transformers().utils.cached_file(src, "config.json", local_files_only=True)
    except (OSError, ValueError):
        return None
    return Path(found).parent if found else None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _check_weight_files(folder: Path | None, spec: str) -> None:
    """Refuse a folder whose ``torch.save`` weights (``pytorch_model.bin`` and its shards,
    which transformers reads with ``torch.load``) are zip archives of compressed records
    that unpack far beyond their size (:func:`~cleanai_core.special_files.check_not_packed`,
    as for ``.pt`` files): a 1 MB file unpacked to GBs in ``from_pretrained``."""
    from cleanai_core.special_files import check_not_packed

    if folder is None or not folder.is_dir():
        return
    for path in sorted(folder.glob("*.bin")):
        check_not_packed(path, f"--model {spec!r}: the weights file")


#: a model loaded from a folder whose config says ``return_dict: false`` (set back in ``hf/``)
TUPLE_OUTPUTS = "cleanai_config_returns_tuples"


def _returns_outputs(model: nn.Module) -> None:
    """A config with ``return_dict: false`` makes the model return tuples, which the job
    cannot read by name (a BERT classifier's logits were taken for a model without a head),
    and with which transformers' own causal LMs fail (``'tuple' object has no attribute
    'last_hidden_state'``, unpruned too): the job's copy returns output objects; the ``hf/``
    folder keeps the user's setting (:func:`save_and_verify`)."""
    model.config.return_dict = True
    setattr(model, TUPLE_OUTPUTS, True)
    log.info("config.return_dict set to true while pruning (the folder's config says false; hf/ keeps false)")


def _check_span_head(model: nn.Module, spec: str) -> None:
    """A question-answering head splits its output layer into start and end logits, so it
    runs only with two outputs; a folder whose config says another ``num_labels`` builds a
    model that fails on every input (``too many values to unpack``), which the job then
    blamed on the data. Refused here, naming the key."""
    head = getattr(model, "qa_outputs", None)
    if head_kind(model) != "span" or not isinstance(head, nn.Linear) or head.out_features == 2:
        return
    raise UserError(
        f"--model {spec!r}: {type(model).__name__} splits qa_outputs into a start and an end logit, so it needs "
        f"2 outputs; the folder's config.json has num_labels={model.config.num_labels}, which built "
        f'{head.out_features} (the model fails on any input). Set "num_labels": 2 (and two id2label entries) in '
        "config.json, or load the folder with a head that takes that many labels."
    )


def _one_line(exc: BaseException, limit: int = 200) -> str:
    return " ".join(str(exc).split())[:limit]


def load_tokenizer(model: nn.Module, required: bool = True) -> Any | None:
    """The tokenizer saved next to ``model`` (its ``config.name_or_path``). Where
    ``AutoTokenizer`` cannot build one, or builds one that makes no tokens, the class the
    folder's ``tokenizer_config.json`` names: transformers 5 picks the tokenizer of some
    model types from the model's config (Qwen2's, Mistral's, Phi-3's) whatever the folder
    holds, and from a folder holding another tokenizer (a byte-level one) made an empty
    ``Qwen2Tokenizer`` or failed."""
    tf = _transformers()
    where = getattr(model.config, "name_or_path", "") or ""
    try:
        if where and Path(where).is_dir() and not any(_is_tokenizer_file(f.name) for f in Path(where).iterdir()):
            raise OSError("the folder holds no tokenizer file")  # none to read: transformers 5 makes an empty one
        tok = tf.AutoTokenizer.from_pretrained(
            where, local_files_only=True, trust_remote_code=trusts_remote_code(model)
        )
        if _makes_tokens(tok):
            return tok
        return _declared_tokenizer(tf, where) or tok
    except ImportError as exc:  # the family's tokenizer class needs a package (BioGPT's: sacremoses)
        if not required:
            return None
        raise UserError(
            f"the tokenizer of the model ({where!r}) needs a package that is not installed: {_one_line(exc)} "
            "Install it, or give already tokenized data as a .pt file (a LongTensor of ids (N, L) or a dict "
            "with input_ids)."
        ) from exc
    except Exception as exc:  # a damaged tokenizer.json: KeyError, the tokenizers library's bare Exception
        if not model_fault(exc):
            raise
        declared = _declared_tokenizer(tf, where)
        if declared is not None:
            return declared
        if not required:
            return None
        said = f"({type(exc).__name__}: {_one_line(exc)})"
        code = [] if trusts_remote_code(model) else _tokenizer_code(where)
        if code:  # transformers refused to import it: no consent, not a damaged file
            raise UserError(
                f"the tokenizer in {where!r} is Python code that comes with the folder (tokenizer_config.json "
                f"auto_map: {', '.join(code)}); building it imports and runs that code. If you trust the folder, "
                "pass --trust-code (load_pruned(..., trust_code=True)); or give already tokenized data as a .pt "
                "file (a LongTensor of ids (N, L) or a dict with input_ids)."
            ) from exc
        files = (
            sorted(f.name for f in Path(where).iterdir() if _is_tokenizer_file(f.name)) if Path(where).is_dir() else []
        )
        if files:  # said "no tokenizer next to the model" of a folder holding one that does not read
            raise UserError(
                f"the tokenizer in {where!r} ({', '.join(files)}) cannot be read {said}: a file may be truncated or "
                "damaged. Save it again with tokenizer.save_pretrained(model_folder), or give already tokenized data "
                "as a .pt file (a LongTensor of ids (N, L) or a dict with input_ids)."
            ) from exc
        raise UserError(
            f"no tokenizer next to the model ({where!r}): text data needs one. Save it with "
            "tokenizer.save_pretrained(model_folder), or give already tokenized data as a .pt file "
            f"(a LongTensor of ids (N, L) or a dict with input_ids). {said}"
        ) from exc


def _is_tokenizer_file(name: str) -> bool:
    """A file a tokenizer is read from (``tokenizer_config.json``, which every
    ``save_pretrained`` writes, ``tokenizer.json``, a vocabulary, merges, a SentencePiece or
    tiktoken model). Without one, transformers 5 builds the tokenizer of the config's model
    type with no vocabulary (Gemma's, Qwen3's, Cohere's: every word one ``<unk>``), and text
    data was pruned and scored on it, the tokenizer written into ``hf/``."""
    name = name.lower()
    return (
        "tokenizer" in name
        or name.startswith(("vocab", "merges", "special_tokens_map", "added_tokens"))
        or name.endswith((".model", ".spm", ".tiktoken"))
    )


def _makes_tokens(tok: Any) -> bool:
    try:
        return len(tok("a b c")["input_ids"]) > 0
    except Exception:  # noqa: BLE001 - a tokenizer that cannot even tokenize a probe
        return False


def _declared_tokenizer(tf: Any, where: str) -> Any | None:
    """The tokenizer of the class ``where/tokenizer_config.json`` names, if it loads and
    makes tokens; else ``None``."""
    try:
        name = json.loads((Path(where) / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    cls = getattr(tf, name, None) if isinstance(name, str) and name.isidentifier() else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        return None
    try:
        tok = cls.from_pretrained(where, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure: the caller says what the folder lacks
        if not model_fault(exc):
            raise
        return None
    return tok if _makes_tokens(tok) else None


@hookimpl(trylast=True)
def cleanai_load_model(spec, options):
    if not spec.startswith(PREFIX):
        return None
    if options.get("weights"):
        raise UserError("--weights does not apply to hf:PATH models: the weights are read from the folder.")
    path = Path(_source(spec)).expanduser()
    if path.is_dir():  # the saved architecture.json must rebuild it from any working directory
        options["resolved_spec"] = PREFIX + str(path.resolve())
    consent = options.get("trust_folder_code", options.get("trust_code"))  # the command line's --trust-code
    if consent and options.get("meta_probe") and _names_code(spec):
        return None  # load_pruned's shape check: the folder's code runs once, in the real build
    with _bars_as_cleanai_logs():
        model = load_hf_model(spec, trust_remote_code=bool(consent))
    if getattr(model.config, "name_or_path", ""):  # its tokenizer's code too (auto_map)
        # each load's own answer: a consent given once (--trust-code in an earlier run of this process) was kept
        # for every later load of the folder, which then built its tokenizer code without the flag
        (_CONSENTED.add if consent else _CONSENTED.discard)(_folder_key(model.config.name_or_path))
    stored = source_dtype(model)
    if stored is not None:  # computed in float32; the pruned weights are written back in this dtype
        options["stored_dtype"] = stored
        options["stored_float32"] = kept_in_float32(model, stored)
        configs = (getattr(m, "config", None) for m in model.modules())
        for config in {id(c): c for c in configs if hasattr(c, "to_dict")}.values():
            config.dtype = stored  # the dtype the widths must suit (experts: 16-byte rows in it), sub-configs too
    return model


# ---------------------------------------------------------------------------
# Evaluation: perplexity (causal LMs), accuracy (classifiers, taggers, question answering)
# ---------------------------------------------------------------------------


#: what a head predicts, by the end of its class name (``BertForTokenClassification``)
_HEADS = (
    ("ForMaskedLM", "masked"),
    ("ForTokenClassification", "token"),
    ("ForQuestionAnswering", "span"),
    ("ForQuestionAnsweringSimple", "span"),
    ("ForMultipleChoice", "choice"),
    ("ForSequenceClassification", "sequence"),
    ("ForCTC", "ctc"),
)


def head_kind(model: Any) -> str:
    """What ``model``'s head predicts, from its class (or its config's ``architectures``):
    ``"masked"`` (a masked LM), ``"token"`` (a label per token), ``"span"`` (extractive
    question answering: a start and an end position), ``"choice"`` (one of several
    sequences), ``"sequence"`` (a class per sequence), ``"regression"`` (a sequence
    classifier with one output or ``problem_type="regression"``), ``"multilabel"``
    (``problem_type="multi_label_classification"``: any number of classes per sequence), ``"ctc"`` (a
    speech recogniser trained with CTC: wav2vec2, HuBERT), ``"seq2seq"`` (an
    encoder-decoder that generates: T5, BART, Marian), else ``""``. An LM head whose config says it
    attends both ways (``causal=False``: XLM, Flaubert) is a masked LM."""
    names = [type(model).__name__, *(getattr(model.config, "architectures", None) or [])[:1]]
    kind = next((k for n in names for end, k in _HEADS if n.endswith(end)), "")
    if not kind and getattr(model.config, "causal", None) is False and names[0].endswith("LMHeadModel"):
        return "masked"  # XLM's, Flaubert's LM head without a causal mask: a masked LM (xlm-mlm-*)
    if not kind and getattr(model.config, "is_encoder_decoder", False):
        generates = getattr(model, "can_generate", None)
        return "seq2seq" if callable(generates) and generates() else ""
    if kind == "sequence":
        problem = getattr(model.config, "problem_type", None)
        if problem == "regression" or (problem is None and getattr(model.config, "num_labels", 2) == 1):
            return "regression"
        if problem == "multi_label_classification":
            return "multilabel"
    return kind


def is_masked_lm(model: Any) -> bool:
    """A masked language model: ``...ForMaskedLM`` (BERT, RoBERTa, ModernBERT, ...)."""
    return head_kind(model) == "masked"


def _masked_token_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """Summed negative log-likelihood of the labelled tokens (labels other than -100, at
    their own positions: masked tokens, or a token classifier's tags), their number, and
    how many the model predicts exactly."""
    logits, labels = logits.float(), labels.to(logits.device)
    nll = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    picked = labels != -100
    return float(nll), int(picked.sum()), int((logits.argmax(-1)[picked] == labels[picked]).sum())


def _next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of each next token, and the number of tokens."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
    nll = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return float(nll), int((labels != -100).sum())


def _span_hits(out: Any, labels: torch.Tensor) -> tuple[int, int]:
    """Question answering: how many rows of ``labels`` ``(N, 2)`` (start, end) the model's
    most likely start and end both hit (exact match), and the number of rows. A SQuAD head
    with beam search (XLNet's, XLM's ``...ForQuestionAnswering``) returns the indices of its
    best starts and of the best ends for each (``start_top_index``, ``end_top_index``, best
    first): its answer is the first of each."""
    if _has_span_logits(out):
        start, end = out.start_logits.argmax(-1).cpu(), out.end_logits.argmax(-1).cpu()
    else:
        start, end = out.start_top_index[:, 0].cpu(), out.end_top_index[:, 0].cpu()
    return int(((start == labels[:, 0]) & (end == labels[:, 1])).sum()), len(labels)


def _has_span_logits(out: Any) -> bool:
    return isinstance(getattr(out, "start_logits", None), torch.Tensor)


def _has_span(out: Any) -> bool:
    """Start and end logits, or a beam-search SQuAD head's best start and end indices."""
    return _has_span_logits(out) or all(
        isinstance(getattr(out, k, None), torch.Tensor) and getattr(out, k).dim() == 2
        for k in ("start_top_index", "end_top_index")
    )


_SPAN_NOTE = (
    "a question-answering head is scored on its answers (start_positions and end_positions, one each per row), "
    "not on labels {}"
)


_MISFIT_NOTE = (
    "labels of shape {} do not fit {}'s logits {}: a token classifier or masked LM takes one label per token "
    "(N, L), a sequence classifier one class per row (N,), a causal LM its input ids"
)


def _no_logits_note(model: Any) -> str:
    return (
        f"{type(model).__name__} returns no logits (a model without a task head: hidden states only), so "
        "there is nothing to compare the labels with; give a folder of a model with its head (...ForCausalLM, "
        "...ForSequenceClassification, ...)"
    )


#: what a masked LM's accuracy and perplexity are (the report said "Perplexity (held-out)"
#: with no word of which tokens, where a causal LM's says so)
MASKED_LM_NOTE = (
    "a masked language model: accuracy and perplexity are those of the masked tokens (the labels not -100; "
    "the text data masks 15% of each document's tokens, a fixed draw), each predicted at its own position with "
    "the rest of the text visible: not comparable with a causal LM's next-token perplexity, and not a "
    "pseudo-perplexity (every token masked in turn, one forward per token)"
)


@hookimpl(trylast=True)
def cleanai_evaluate(model, loader, device):
    """Perplexity for causal LMs; accuracy for sequence, token and multiple-choice
    classifiers; the masked tokens' accuracy and perplexity for masked LMs; the exact
    match of the answer's start and end for question answering; the mean squared error
    for regression heads; on dict batches."""
    from cleanai_core.calibration import move_to

    if not is_hf_model(model):
        return None
    nll = squared = 0.0
    tokens = correct = total = values = edits = 0
    kind = head_kind(model)
    with torch.no_grad():
        for batch in loader:
            inputs, labels = split_batch(batch, model)
            if labels is None:
                return None
            inputs = move_to(inputs, device)  # a tensor goes in first place: input_ids, or pixel_values for ViT
            out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
            if kind == "span" and _has_span(out):
                if labels.dim() != 2 or labels.shape[1] != 2:
                    return {"accuracy_note": _SPAN_NOTE.format(tuple(labels.shape))}
                hit, n = _span_hits(out, labels)
                correct, total = correct + hit, total + n
                continue
            logits = getattr(out, "logits", None)
            if not isinstance(logits, torch.Tensor):
                return {"accuracy_note": _no_logits_note(model)}
            if kind == "multilabel" and logits.dim() == 2 and tuple(labels.shape) == tuple(logits.shape):
                hit = ((logits.float().cpu() > 0) == (labels.cpu() > 0.5)).all(dim=1)  # every class right
                correct, total = correct + int(hit.sum()), total + len(hit)
            elif kind == "ctc" and logits.dim() == 3 and labels.dim() == 2:
                wrong, n = ctc_errors(logits, labels, getattr(model.config, "pad_token_id", None))
                edits, tokens, total = edits + wrong, tokens + n, total + len(labels)
            elif kind == "regression":
                diff = logits.float().reshape(len(labels), -1).cpu() - labels.float().reshape(len(labels), -1)
                squared += float((diff**2).sum())
                total, values = total + len(labels), values + diff.numel()
            elif logits.dim() == 3 and labels.dim() == 2 and kind in ("masked", "token", "seq2seq"):  # unshifted
                s, n, hit = _masked_token_scores(logits, labels)
                nll, tokens, correct, total = nll + s, tokens + n, correct + hit, total + n
            elif logits.dim() == 3 and labels.dim() == 2:
                s, n = _next_token_nll(logits, labels)
                nll, tokens = nll + s, tokens + n
            elif logits.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point():
                correct += int((logits.argmax(-1).cpu() == labels).sum())
                total += len(labels)
            else:  # said "the data has no labels" (the next evaluator reads (x, y) pairs only)
                return {"accuracy_note": _MISFIT_NOTE.format(tuple(labels.shape), type(model).__name__,
                                                             tuple(logits.shape))}  # fmt: skip
    if kind == "ctc" and total:
        return {
            "error_rate": edits / max(tokens, 1),
            "evaluated": total,
            "tokens": tokens,
            "accuracy_note": "a CTC speech recogniser: the token error rate of greedy decoding (edit distance to the "
            "labels over their length) is reported instead",
        }
    if kind == "regression" and total:
        return {
            # per value, as the model's own MSELoss and recovery's held-out metric: per sample it was num_labels x it
            "mse": squared / values,
            "evaluated": total,
            "accuracy_note": "a regression head: the mean squared error (per output value) is reported instead",
        }
    # recovery (--recover-epochs) scores labels at their own positions for these, not shifted as a causal LM's
    own = {"recovery_task": "token"} if kind in ("masked", "token", "seq2seq") else {}
    if tokens and kind == "masked":
        return {
            "accuracy": correct / total,
            "evaluated": total,
            "perplexity": perplexity(nll, tokens),
            "loss": nll / tokens,
            "tokens": tokens,
            "metric_note": MASKED_LM_NOTE,
            **own,
        }
    if tokens and kind == "token":  # the tags' accuracy; a tagger's "perplexity" would mislead
        return {"accuracy": correct / total, "evaluated": total, "loss": nll / tokens, "tokens": tokens, **own}
    if tokens:
        what = "an encoder-decoder's target tokens" if kind == "seq2seq" else "a causal language model"
        return {
            "perplexity": perplexity(nll, tokens),
            "loss": nll / tokens,
            "tokens": tokens,
            "accuracy_note": f"{what}: the held-out perplexity is reported instead",
            **own,
        }
    if total:
        return {"accuracy": correct / total, "evaluated": total}
    return None


# ---------------------------------------------------------------------------
# Output: a save_pretrained folder, verified by reloading it
# ---------------------------------------------------------------------------


def _quiet_reload(
    config: Any, folder: Path, dtype: torch.dtype = torch.float32, remote_code: bool = False
) -> nn.Module:
    """``from_pretrained`` without transformers' load report (a mismatch raises anyway);
    ``remote_code``: the folder's own code, copied by ``save_pretrained`` from a model loaded
    with the user's consent (:func:`trusts_remote_code`)."""
    tf_logging = _transformers().utils.logging
    level = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()
    try:
        cls = auto_class(config)
        return cls.from_pretrained(folder, local_files_only=True, dtype=dtype, trust_remote_code=remote_code).eval()
    finally:
        tf_logging.set_verbosity(level)


def source_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype the folder ``model`` was loaded from stores its weights in (its
    config's ``dtype``; where the config names none, as older and converted checkpoints,
    the dtype most of the ``.safetensors`` weights have), where it is not the float32 the
    job computes in; else ``None``."""
    where = getattr(model.config, "name_or_path", "") or ""
    try:
        remote = trusts_remote_code(model)
        dtype = _transformers().AutoConfig.from_pretrained(where, local_files_only=True, trust_remote_code=remote).dtype
    except (OSError, ValueError, TypeError):
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype is None:  # a bfloat16 folder without the key was written back in float32: 1.7x its bytes
        folder = Path(where) if Path(where).is_dir() else _cached_folder(where)
        dtype = _weights_dtype(folder) if folder is not None else None
    floating = isinstance(dtype, torch.dtype) and dtype.is_floating_point
    return dtype if floating and dtype != torch.float32 else None


#: floating dtypes of the ``.safetensors`` header, by their names there
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _weights_dtype(folder: Path) -> torch.dtype | None:
    """The floating dtype holding most of the values in ``folder``'s ``.safetensors`` files,
    read from their JSON headers alone (8 bytes of length, then the header), else in its
    ``.bin`` files (older checkpoints: ``torch.load`` of tensors only, memory-mapped, so no
    value is read); ``None`` when there is none to read."""
    import math

    counts: dict[torch.dtype, int] = {}
    for path in [] if any(folder.glob("*.safetensors")) else sorted(folder.glob("*.bin")):
        try:  # checked for packed records first (_check_weight_files); transformers reads them the same way
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - an older (not zip) file or another kind of .bin: no answer from it
            continue
        for tensor in state.values() if isinstance(state, dict) else ():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size)) if 0 < size <= 100_000_000 else {}  # safetensors' own limit
        except (OSError, ValueError):
            continue
        for name, entry in header.items() if isinstance(header, dict) else ():
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
            shape = entry.get("shape") if dtype is not None and name != "__metadata__" else None
            if isinstance(shape, list) and all(isinstance(d, int) for d in shape):
                counts[dtype] = counts.get(dtype, 0) + math.prod(shape)
    return max(counts, key=counts.__getitem__) if counts else None


def kept_in_float32(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """The ``state_dict`` names that ``from_pretrained(..., dtype=dtype)`` keeps in float32:
    those its class's ``_keep_in_fp32_modules`` (for float16) and
    ``_keep_in_fp32_modules_strict`` (float16 and bfloat16) patterns find, as transformers
    matches them (``*`` any text, found anywhere in the name). The job wrote them in the
    folder's dtype: T5's ``wo`` in float16 (which the family keeps in float32 against
    overflow; ``hf/`` was then refused, its reload differing), routers' ``gate.weight``
    rounded to bfloat16."""
    import re

    plan = getattr(model, "_get_dtype_plan", None)
    try:
        patterns = [k for k, v in plan(dtype).items() if v == torch.float32] if callable(plan) else []
    except Exception:  # noqa: BLE001 - a transformers without the plan: nothing kept
        return []
    if not patterns:
        return []
    found = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns))
    return [name for name in model.state_dict() if found.search(name)]


def _compared(out: Any) -> list[torch.Tensor]:
    """The outputs a reload must reproduce: the logits where the model has them, else every
    floating tensor it returns (a question-answering head's start and end logits, a model
    without a head's hidden states); comparing ``.logits`` alone refused those folders."""
    from cleanai_core.verify import output_leaves

    logits = getattr(out, "logits", None)
    leaves = [logits] if isinstance(logits, torch.Tensor) else output_leaves(out)
    return [t.float() for t in leaves if t.is_floating_point()]


def _relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest difference of two output lists relative to each output's largest value."""
    if not a or [t.shape for t in a] != [t.shape for t in b]:
        shapes = lambda ts: [tuple(t.shape) for t in ts]  # noqa: E731
        raise ValueError(f"reloaded outputs have shapes {shapes(b)}, the pruned model's {shapes(a)}")
    return max(float((x - y).abs().max() / x.abs().max().clamp(min=1e-12)) for x, y in zip(a, b, strict=True))


def save_and_verify(model: nn.Module, folder: Path, example: Any) -> dict[str, Any]:
    """``save_pretrained`` into ``folder`` and reload it with ``from_pretrained``; keep the
    folder only if the reloaded model gives the same logits on ``example``. Returns the
    report entries (``hf_folder``: the folder name or ``None``; ``hf_reload``: what happened)."""
    from cleanai_core.calibration import move_to

    model = model.cpu().eval()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    record = getattr(model.config, "cleanai_pruning", None) or {}
    if record.get("from_pretrained") is False and record.get("why"):  # the config cannot describe it: say why
        why = "; ".join(record["why"])
        log.warning("hf/ not written: the config cannot describe the pruned model (%s)", why)
        return {"hf_folder": None, "hf_reload": f"not possible: {why}", "hf_reload_path": "load_pruned"}
    tuples = getattr(model, TUPLE_OUTPUTS, False) and model.config.return_dict is True
    try:
        if tuples:  # the user's return_dict: false (see _returns_outputs)
            model.config.return_dict = False
        try:
            model.save_pretrained(folder)
        finally:
            if tuples:
                model.config.return_dict = True
        tokenizer = load_tokenizer(model, required=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        reloaded = _quiet_reload(model.config, folder, dtype, trusts_remote_code(model))
        if tuples:  # compared by name, as the pruned model answers
            reloaded.config.return_dict = True
        with torch.no_grad():
            inputs = move_to(example, torch.device("cpu"))
            call = (lambda m: m(**inputs)) if isinstance(inputs, dict) else (lambda m: m(inputs))
            err = _relative_error(_compared(call(model)), _compared(call(reloaded)))
        if err > RELOAD_RTOL:
            raise ValueError(f"reloaded logits differ from the pruned model's (max relative error {err:.3g})")
    except Exception as exc:  # any failure: the folder must not mislead, the job goes on
        shutil.rmtree(folder, ignore_errors=True)
        why = f"{type(exc).__name__}: {str(exc)[:300]}"
        if "mismatched_sizes" in str(exc):
            why = (
                "the saved config does not describe the pruned tensor shapes (intermediate_size, "
                "num_attention_heads, head_dim...), so from_pretrained rebuilds the unpruned shapes"
            )
        log.warning("hf/ not written: save_pretrained -> from_pretrained does not reproduce the pruned model (%s)", why)
        return {"hf_folder": None, "hf_reload": f"failed: {why}", "hf_reload_path": "load_pruned"}
    return {
        "hf_folder": folder.name,
        "hf_reload": f"identical logits (max relative error {err:.1e})",
        "hf_reload_path": "from_pretrained",
        "hf_dtype": str(dtype).replace("torch.", ""),
    }


def default_example(model: nn.Module) -> Any:
    """The input ``cleanai explain`` traces a Hugging Face model with where none is given: a
    few token ids within its vocabulary, or noise of the shape its config describes for a
    speech, audio or image model (drawn from a generator of its own); ``None`` if neither."""
    from cleanai_core.cli.explain import default_shape, example_input, signal_example, token_vocabulary

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    signal = signal_example(model, dtype)
    if signal is not None:
        return signal
    return example_input(model, default_shape(model), dtype) if token_vocabulary(model) is not None else None


@hookimpl(trylast=True)
def cleanai_save_outputs(model, folder, options):
    if not is_hf_model(model) or not hasattr(model, "save_pretrained"):
        return None
    example = options.get("example")
    if example is None:  # save_pruned without example_inputs
        example = default_example(model)
    if example is None:
        why = "no example input to check the reload on; give save_pruned(..., example_inputs=one_batch)"
        log.warning("hf/ not written: %s", why)
        return {"hf_folder": None, "hf_reload": f"not checked: {why}", "hf_reload_path": "load_pruned"}
    with _bars_as_cleanai_logs():
        result = save_and_verify(model, Path(folder) / "hf", example)
    if not result.get("hf_folder"):  # no hf/ (which holds it): keep the tokenizer beside model.pt
        tokenizer = load_tokenizer(model, required=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(Path(folder) / "tokenizer")
            result["tokenizer_folder"] = "tokenizer"
    return result


@hookimpl(trylast=True)
def cleanai_report_sections(report):
    if "hf_reload" not in report and report.get("perplexity_before") is None:
        return None
    lines = []
    pb, pa = report.get("perplexity_before"), report.get("perplexity_after")
    if pb is not None and pa is not None:
        lines.append(
            f"Held-out perplexity {pb:.3f} -> {pa:.3f} ({100 * (pa - pb) / pb:+.1f}%), "
            f"over {report.get('evaluation_tokens') or '?'} predicted tokens, without retraining."
        )
    if report.get("hf_folder"):
        lines.append(
            f"`{report['hf_folder']}/` holds the pruned model as a Hugging Face folder: "
            f"`AutoModel*.from_pretrained('{report['hf_folder']}')` reloads it ({report['hf_reload']})."
        )
    elif "hf_reload" in report:
        lines.append(
            "No `hf/` folder: `save_pretrained` -> `from_pretrained` cannot reproduce the pruned model "
            f"({report['hf_reload']}). Reload it with `cleanai_core.io.load_pruned(out_dir)`, which replays "
            "the history on the original architecture (identical logits)."
            + (
                f" The tokenizer is in `{report['tokenizer_folder']}/` "
                f"(`AutoTokenizer.from_pretrained('{report['tokenizer_folder']}')`)."
                if report.get("tokenizer_folder")
                else ""
            )
        )
    return [("Hugging Face", "\n\n".join(lines))]
