"""The LLM benchmark's corpus and models: byte-level text from Python's own standard
library (no download), and small Llama-style causal LMs trained on it on the CPU.

Corpus: ``pydoc_data.topics`` (the reference manual topics behind ``help()``) and the
docstrings of every module, class and function of the standard library's source files,
read with :mod:`ast` (nothing is imported). Each document is encoded as UTF-8 bytes shifted
by 3 (ids 0, 1, 2 are pad, end-of-document and unknown: ``transformers.ByT5Tokenizer``'s
layout with no extra ids), so the vocabulary is 259 ids. Documents are split into train /
calibration / held-out by a hash of their text, so the split does not depend on file order.

Trained checkpoints are cached under ``benchmarks/.cache/llm/`` (``save_pretrained``
folders, keyed by the model settings), so a rerun only prunes and evaluates.
"""

from __future__ import annotations

import ast
import hashlib
import math
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache" / "llm"
VOCAB = 259  # 256 bytes + pad, eos, unk (ByT5Tokenizer(extra_ids=0))
EOS = 1
SEQ_LEN = 128

#: the two benchmark models: full multi-head attention and grouped-query attention
MODELS = {
    "mha": dict(num_attention_heads=8, num_key_value_heads=8),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2),
}
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    max_position_embeddings=SEQ_LEN,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=EOS,
    pad_token_id=0,
)


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:
                out.append(doc)
    return out


def documents() -> list[str]:
    """Every document of the corpus, in a fixed order."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__")
    for path in sorted(stdlib.rglob("*.py")):
        if any(part in skip for part in path.relative_to(stdlib).parts):
            continue
        docs.extend(_docstrings(path))
    seen, unique = set(), []
    for d in docs:
        if d not in seen:
            seen.add(d)
            unique.append(d)
    return unique


def _bucket(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) % 100


def encode(texts: list[str]) -> torch.Tensor:
    """Bytes + 3, an end-of-document id after each text, as one stream."""
    ids: list[torch.Tensor] = []
    for t in texts:
        ids.append(torch.frombuffer(bytearray(t.encode("utf-8")), dtype=torch.uint8).long() + 3)
        ids.append(torch.tensor([EOS]))
    return torch.cat(ids)


def splits() -> dict[str, torch.Tensor]:
    """Token streams: ``train`` (hash buckets 10..99), ``calib`` (5..9), ``heldout`` (0..4)."""
    docs = documents()
    parts = {"train": [], "calib": [], "heldout": []}
    for d in docs:
        b = _bucket(d)
        parts["heldout" if b < 5 else "calib" if b < 10 else "train"].append(d)
    return {k: encode(v) for k, v in parts.items()}


def blocks(stream: torch.Tensor, n: int | None = None, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Consecutive non-overlapping blocks ``(N, seq_len)`` from the start of a stream."""
    total = stream.numel() // seq_len
    n = total if n is None else min(n, total)
    return stream[: n * seq_len].view(n, seq_len)


def build(kind: str, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**BASE, **MODELS[kind], attn_implementation=attn)
    return LlamaForCausalLM(cfg)


def _key(kind: str, steps: int, batch: int, seed: int) -> str:
    return f"{kind}-h{BASE['hidden_size']}-l{BASE['num_hidden_layers']}-s{steps}-b{batch}-seed{seed}"


def trained(kind: str, steps: int = 300, batch: int = 16, seed: int = 0, log=print):
    """The trained model (eval mode), from the cache or trained now on the CPU."""
    from transformers import LlamaForCausalLM

    folder = CACHE / _key(kind, steps, batch, seed)
    if (folder / "config.json").is_file():
        return LlamaForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    torch.manual_seed(seed)
    data = splits()["train"]
    model = build(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.time()
    for step in range(steps):
        starts = torch.randint(0, data.numel() - SEQ_LEN - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"[{kind}] step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return model
