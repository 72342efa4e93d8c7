"""What the "no new bias" rule costs (issue #15): held-out perplexity of the small GQA
Llama of ``benchmarks/llm.py`` pruned with the default options, with and without the
biases that compensation creates.

Llama's config can declare biases (``attention_bias`` / ``mlp_bias``), so the default
gives ``o_proj`` and ``down_proj`` a bias and still reloads. Qwen2, Mistral, Phi-3,
Mixtral (and Qwen3/Gemma's MLP) cannot: there the layers are filed under the
``no_new_bias`` finding and compensation folds into the kept columns only. This script
puts the Llama under that rule (a test plugin files every decoder ``nn.Linear``), so the
same trained weights measure the cost:

- ``bias allowed``: the default on Llama (reconstruction + mean into a new bias);
- ``no new bias``: the default under the rule (reconstruction's slope only);
- ``no new bias, second-moment scores``: the same, ranking on E[x^2] instead of Var(x);
- ``no new bias, no-intercept LS``: reconstruction regressed on the uncentered second
  moment (a kernel change: the slope that is best when there is no intercept);
- ``no new bias, no LS``: mean compensation only, which the rule turns into nothing;
- ``no compensation``: ``bias_compensation=False`` (what reloaded before the rule).

Run::

    python benchmarks/llm_bias.py            # gqa; --models mha,gqa for both
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm  # noqa: E402
import llm_corpus as corpus  # noqa: E402

import cleanai_core.pruner as kernel  # noqa: E402
from cleanai_core import hookimpl  # noqa: E402
from cleanai_core.metrics import count_params  # noqa: E402
from cleanai_core.plugins import get_plugin_manager  # noqa: E402
from cleanai_plugins.layers.linear import no_new_bias  # noqa: E402


class NoBiasAnywhere:
    """Files every ``nn.Linear`` of the decoder layers under ``no_new_bias``."""

    @hookimpl
    def cleanai_prepare_model(self, model):
        return no_new_bias(*(m for n, m in model.named_modules() if ".layers." in n and isinstance(m, nn.Linear)))


def regress_without_intercept(cov, mean, removed, kept, damping: float = 1e-3):
    """``x_removed ~ coef @ x_kept`` on the uncentered second moment ``cov + mean mean^T``
    (no intercept, so no bias is needed); shift 0."""
    m2 = cov + torch.outer(mean, mean)
    c_kk, c_kr = m2[kept][:, kept], m2[kept][:, removed]
    lam = damping * float(c_kk.diagonal().mean().clamp(min=1e-12))
    coef = torch.linalg.solve(c_kk + lam * torch.eye(c_kk.shape[0], dtype=m2.dtype), c_kr).T
    return coef, torch.zeros(len(removed), dtype=m2.dtype)


WA = llm._wa
#: name -> (importance, options, rule on, no-intercept regression)
VARIANTS = {
    "bias allowed (default on Llama)": (WA, dict(), False, False),
    "no new bias (default on Qwen2/Mistral/...)": (WA, dict(), True, False),
    "no new bias, second-moment scores": (lambda: WA(statistic="second_moment"), dict(), True, False),
    "no new bias, no-intercept LS (kernel change)": (WA, dict(), True, True),
    "no new bias, no LS": (WA, dict(reconstruction=False), True, False),
    "no compensation (bias_compensation=False)": (WA, dict(bias_compensation=False), False, False),
}


def run(kind: str, log) -> list[dict]:
    model = corpus.trained(kind, log=log)
    data = corpus.splits()
    calib, held = corpus.blocks(data["calib"], llm.CALIB_BLOCKS), corpus.blocks(data["heldout"], llm.EVAL_BLOCKS)
    total, block = count_params(model), llm.block_params(model)
    rows = [dict(model=kind, method="dense", fraction=0.0, removed=0.0, ppl=llm.perplexity(model, held))]
    pm = get_plugin_manager()
    for frac in llm.FRACTIONS:
        keep = 1 - frac * block / total
        for name, (imp, opts, rule, no_intercept) in VARIANTS.items():
            t0 = time.time()
            plugin = NoBiasAnywhere() if rule else None
            if plugin:
                pm.register(plugin, name="no-bias-anywhere")
            try:
                patch = mock.patch.object(kernel, "_regress", regress_without_intercept) if no_intercept else None
                with patch or mock.patch.object(kernel, "_regress", kernel._regress):
                    pruned = llm.prune(model, calib, imp, opts, target_params=keep)
            finally:
                if plugin:
                    pm.unregister(plugin)
            new = [n for n, _ in pruned.named_parameters() if n.endswith(".bias")]
            removed, ppl = 1 - llm.block_params(pruned) / block, llm.perplexity(pruned, held)
            log(
                f"[{kind}] {name} @ {frac:.0%}: removed {removed:.1%}, ppl {ppl:.3f}, "
                f"{len(new)} biases ({time.time() - t0:.0f}s)"
            )
            rows.append(dict(model=kind, method=name, fraction=frac, removed=removed, ppl=ppl))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gqa", help="comma-separated: mha, gqa")
    args = ap.parse_args()
    torch.set_num_threads(1)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    rows = [r for kind in args.models.split(",") for r in run(kind, log)]
    print(llm.table(rows))


if __name__ == "__main__":
    main()
