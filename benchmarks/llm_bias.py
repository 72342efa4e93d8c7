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

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm  # noqa: E402
import llm_corpus as corpus  # noqa: E402

from cleanai_core import hookimpl  # noqa: E402
from cleanai_core.metrics import count_params  # noqa: E402
from cleanai_core.plugins import get_plugin_manager  # noqa: E402
from cleanai_plugins.layers.linear import no_new_bias  # noqa: E402


class NoBiasAnywhere:
    """Files every ``nn.Linear`` of the decoder layers under ``no_new_bias``."""

    @hookimpl
    def cleanai_prepare_model(self, model):
        return no_new_bias(*(m for n, m in model.named_modules() if ".layers." in n and isinstance(m, nn.Linear)))


WA = llm._wa
#: name -> (importance, options, rule on)
VARIANTS = {
    "bias allowed (default on Llama)": (WA, dict(), False),
    "no new bias: LS through the origin (default on Qwen2/Mistral/...)": (WA, dict(), True),
    "no new bias, second-moment scores": (lambda: WA(statistic="second_moment"), dict(), True),
    "no new bias, no LS": (WA, dict(reconstruction=False), True),
    "no compensation (bias_compensation=False)": (WA, dict(bias_compensation=False), False),
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
        for name, (imp, opts, rule) in VARIANTS.items():
            t0 = time.time()
            plugin = NoBiasAnywhere() if rule else None
            if plugin:
                pm.register(plugin, name="no-bias-anywhere")
            try:
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
