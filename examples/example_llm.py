"""A Hugging Face causal LM: prune heads and MLP, save_pretrained, reload, generate.

A tiny Llama with grouped-query attention (8 query heads sharing 4 key/value heads) is
built from a ``LlamaConfig`` (nothing downloaded) and trained for a few steps on the bytes
of Python's own docstrings, so its weights are not pure noise. CleanAI removes whole
KV groups of heads and MLP channels, the result is written with ``save_pretrained``,
read back with plain ``AutoModelForCausalLM.from_pretrained`` and generates with a KV
cache. Needs ``transformers`` (``pip install cleanai[hf]``). From the repository root::

    python examples/example_llm.py              # about 15 s on one CPU core
    python examples/example_llm.py --steps 20   # what CI runs
"""

from __future__ import annotations

import argparse
import inspect
import tempfile

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from cleanai_core import StructuredPruner
from cleanai_core.metrics import count_params

SEQ = 64


def docstring_bytes() -> torch.Tensor:
    """The docstrings of a few standard-library modules as one long tensor of byte ids."""
    text = "\n".join(inspect.getdoc(m) or "" for m in (argparse, inspect, tempfile, torch.nn.Module))
    text += "\n".join(inspect.getdoc(f) or "" for f in vars(inspect).values() if inspect.isfunction(f))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def batches(data: torch.Tensor, n: int, size: int, seed: int) -> list[torch.Tensor]:
    """``n`` batches of ``size`` random windows of ``SEQ`` bytes."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - SEQ, (n, size), generator=g)
    return [torch.stack([data[s : s + SEQ] for s in row]) for row in starts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps before pruning (default 60)")
    parser.add_argument("--ratio", type=float, default=0.5, help="share of heads and channels to remove (default 0.5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    config = LlamaConfig(
        vocab_size=256,  # bytes
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,  # grouped-query attention: two query heads per KV head
        max_position_embeddings=SEQ,
    )
    model = LlamaForCausalLM(config)

    # A few steps of next-byte prediction on Python's docstrings (held-out windows from another seed).
    data = docstring_bytes()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for ids in batches(data, args.steps, 16, seed=0):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()
    held_out = batches(data, 1, 16, seed=1)[0]

    # Prune: calibration on a few token batches. Heads go in whole KV groups, head_dim stays.
    # The defaults fold the removed channels into the kept ones (least squares) and their mean
    # into new o_proj / down_proj biases, which the config declares (attention_bias, mlp_bias:
    # cleanai_pruning lists them), so plain from_pretrained rebuilds the model exactly. In a
    # family without such switches (Qwen2, Mistral, ...) no bias is created instead.
    # ignored embed_tokens: the hidden size (the most sensitive width) stays.
    pruner = StructuredPruner(
        model,
        (held_out[:1],),
        pruning_ratio=args.ratio,
        ignored_layers=["model.embed_tokens"],
    )
    pruner.collect_activations(batches(data, 4, 8, seed=2))
    pruned = pruner.prune()  # a copy: `model` is unchanged

    with tempfile.TemporaryDirectory() as folder:
        pruned.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()

    with torch.no_grad():
        loss_before = F.cross_entropy(model(held_out).logits[:, :-1].flatten(0, 1), held_out[:, 1:].flatten()).item()
        logits = pruned(held_out).logits
        loss_after = F.cross_entropy(logits[:, :-1].flatten(0, 1), held_out[:, 1:].flatten()).item()
        diff = (reloaded(held_out).logits - logits).abs().max().item()
        prompt = torch.tensor([list(b"Return the ")])
        out = reloaded.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)

    c = reloaded.config
    print(f"params: {count_params(model)} -> {count_params(pruned)}")
    print(
        f"heads: {config.num_attention_heads}/{config.num_key_value_heads} -> "
        f"{c.num_attention_heads}/{c.num_key_value_heads} (query/kv), mlp: {config.intermediate_size} -> "
        f"{c.intermediate_size}"
    )
    print(f"held-out loss: {loss_before:.3f} -> {loss_after:.3f} (nats per byte)")
    print(f"max logit difference after reload: {diff:.3g}")
    print(f"cleanai_pruning: {c.cleanai_pruning}")
    print(f"generated {out.shape[1] - prompt.shape[1]} tokens: {bytes(out[0].tolist())!r}")


if __name__ == "__main__":
    main()
