"""Why a pruned transformers model cannot be rebuilt from its config, in words.

:func:`.config.rebuild_mismatches` lists the tensors whose shape the model rebuilt from
the rewritten config does not have. Each is put down to what the family's config cannot
say: fewer heads (BERT, GPT-2, OPT... derive the head size as ``hidden_size /
num_attention_heads``; Swin per stage), an MLP width tied to the hidden width (Bloom's
``4 * hidden_size``, ConvNeXt's ``4 * hidden_sizes[i]``, Swin's ``mlp_ratio``), or another
width the config has no key for (Whisper's convolution stem). The reasons go into
``config.cleanai_pruning["why"]``, with ``"reload": "load_pruned"``: the saved folder
(``cleanai_core.save_pruned`` / ``cleanai prune``) reloads it through
``cleanai_core.load_pruned``, which replays the history on the original architecture.
"""

from __future__ import annotations

import re

from torch import nn

from cleanai_plugins.zoo.transformers.attention import is_attention

__all__ = ["reasons"]

_MLP = re.compile(
    r"(^|\.)(mlp|intermediate|output|ffn|DenseReluDense)\.|(^|\.)(fc1|fc2|pwconv1|pwconv2|dense_h_to_4h|dense_4h_to_h)$"
)
HEADS = "heads: this family's config derives the head size from the width and the head count, so fewer heads of the "
HEADS += "same size cannot be written"
ALIBI = "ALiBi: each pruned attention takes its kept heads' slopes through a hook that only load_pruned restores"
MLP = "MLP width: this family's config has no key for it (it is a fixed multiple of the hidden or stage width)"


def reasons(model: nn.Module, mismatched: list[str]) -> list[str]:
    """One line per kind of width the config cannot describe, for ``mismatched``."""
    names = dict(model.named_modules())
    found: list[str] = []
    for key in mismatched:
        if key.startswith("<"):  # the rebuild itself failed
            why = f"the config cannot rebuild the model ({key.strip('<>')})"
        elif " " in key:  # a scale derived from the config (already in words)
            why = key
        else:
            module = key.rpartition(".")[0]
            parents = [module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)]
            if any(
                is_attention(names[p]) and not type(names[p]).__name__.endswith("Layer") for p in parents if p in names
            ):
                why = HEADS
            elif _MLP.search(module):
                why = MLP
            else:
                why = f"{module}: its width is not a key of the config"
        if why not in found:
            found.append(why)
    if ALIBI not in found and any(getattr(m, "cleanai_kept_heads", None) is not None for m in names.values()):
        found.append(ALIBI)
    return found
