"""Hugging Face text models, session 23 (text14): one cause per test (tiny models from
configs, nothing downloaded). Models as users hand them over after training: gradient
checkpointing still on, code of their own in the folder."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_families import LM, V, dots3_note  # noqa: E402

from cleanai_core import StructuredPruner  # noqa: E402
from cleanai_core.cli import main  # noqa: E402
from cleanai_core.errors import UserError  # noqa: E402
from cleanai_core.io import load_pruned  # noqa: E402


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, shape, generator=torch.Generator().manual_seed(seed))


def llama(**kw):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LM, "num_key_value_heads": 2, **kw})).eval()


def test_a_model_with_gradient_checkpointing_keeps_the_hook_that_feeds_its_checkpoints_gradients():
    """``gradient_checkpointing_enable()`` (as after training with it) registers
    transformers' ``make_inputs_require_grads`` forward hook on the token embedding, an
    ``nn.Embedding``: a hook of another library than its module's was taken for the
    user's, dropped from the pruned copy with a warning to register it again. With
    reentrant checkpointing and frozen embeddings (adapters, partial fine-tuning) the
    pruned layers then got no gradient at all."""
    model = llama()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.model.embed_tokens.weight.requires_grad_(False)
    x = ids(2, 8)
    pruner = StructuredPruner(model, (x,), pruning_ratio=0.4)
    pruner.collect_activations([(x,)], num_batches=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # was: "1 forward/backward hook(s) on model.embed_tokens ..."
        small = pruner.prune()
    assert params(small) == 60_328 < params(model) == 74_560
    assert len(small.model.embed_tokens._forward_hooks) == 1  # was 0
    small.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: use_cache is off under checkpointing
        small(input_ids=x, labels=x).loss.backward()
    grads = [small.model.layers[i].mlp.down_proj.weight.grad for i in range(2)]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)  # was None: no gradient reached them
    small.disable_input_require_grads()  # the copy's handle removes the copy's hook, not the user's
    assert len(small.model.embed_tokens._forward_hooks) == 0
    assert len(model.model.embed_tokens._forward_hooks) == 1


CONFIG_CODE = """
from transformers import LlamaConfig


class Text14Config(LlamaConfig):
    model_type = "cleanai_text14_llama"
"""
MODEL_CODE = """
from transformers import LlamaForCausalLM

from .configuration_text14 import Text14Config


class Text14ForCausalLM(LlamaForCausalLM):
    config_class = Text14Config
"""


def remote_code_folder(
    folder: Path,
    model=None,
    code: str | None = None,
    architecture: str = "Text14ForCausalLM",
    classes: dict[str, str] | None = None,
) -> None:
    """``model`` (a Llama by default) saved with code of its own: ``config.json`` maps the
    auto classes (``classes``: auto class -> class of ``modeling_text14.py``, beside
    ``AutoConfig``) to the ``configuration_text14.py`` / ``modeling_text14.py`` files
    beside the weights."""
    (model if model is not None else llama()).save_pretrained(folder)
    (folder / "configuration_text14.py").write_text(CONFIG_CODE)
    (folder / "modeling_text14.py").write_text(MODEL_CODE if code is None else code)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="cleanai_text14_llama", architectures=[architecture])
    classes = classes or {"AutoModelForCausalLM": "Text14ForCausalLM"}
    config["auto_map"] = {
        "AutoConfig": "configuration_text14.Text14Config",
        **{auto: f"modeling_text14.{cls}" for auto, cls in classes.items()},
    }
    (folder / "config.json").write_text(json.dumps(config))


def test_an_hf_folder_with_code_of_its_own_prunes_with_trust_code_and_reloads(tmp_path, capsys):
    """A folder whose ``config.json`` names its own code (``auto_map``, as many hub text
    models): ``cleanai prune --model hf:DIR`` left the choice to transformers, which asked
    on the terminal (``Do you wish to run the custom code? [y/N]``) and, refused, was
    reported as ``no such local folder, and ... is not in the Hugging Face cache``;
    ``--trust-code`` could not help. The code now runs only with ``--trust-code``, which
    the refusal names; ``hf/`` keeps the code and reloads with ``trust_remote_code``."""
    remote_code_folder(tmp_path / "m")
    torch.save({"input_ids": ids(24, 16, seed=3)}, tmp_path / "d.pt")
    argv = [
        "prune",
        "--model",
        f"hf:{tmp_path / 'm'}",
        "--data",
        str(tmp_path / "d.pt"),
        "--out",
        str(tmp_path / "o"),
        "--threads",
        "1",
        "--latency-repeats",
        "1",
    ]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "names Python code that comes with it" in err and "--trust-code" in err and "no such local" not in err
    assert "modeling_text14.Text14ForCausalLM" in err and not (tmp_path / "o").exists()

    assert main([*argv, "--quiet", "--trust-code"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["hf_reload_path"] == "from_pretrained" and report["hf_folder"] == "hf"
    assert (tmp_path / "o" / "hf" / "modeling_text14.py").is_file()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "hf", trust_remote_code=True).eval()
    assert type(again).__name__ == "Text14ForCausalLM" and params(again) < 74_560
    with pytest.raises(UserError, match="names Python code that comes with it"):
        load_pruned(tmp_path / "o")  # the saved folder names hf:DIR: its code runs only with consent
    small = load_pruned(tmp_path / "o", trust_code=True)
    x = ids(2, 8)
    with torch.no_grad():
        assert torch.equal(small(x).logits, again(x).logits)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_folder_whose_config_names_no_dtype_is_written_back_in_its_own(dtype, weights, tmp_path):
    """A ``bfloat16`` / ``float16`` checkpoint whose ``config.json`` has no ``dtype`` (older
    and converted checkpoints, ``pytorch_model.bin`` ones too): the job read the stored
    dtype from the config alone and wrote ``model.pt`` and ``hf/`` in the float32 it
    computes in, 1.7x the bytes of the folder it pruned (259,528 bytes of safetensors for
    a 151,256-byte checkpoint). The weight files say it now: the ``.safetensors`` headers,
    else the ``.bin`` tensors' dtypes (memory-mapped, no value read)."""
    model = llama().to(dtype)
    model.save_pretrained(tmp_path / "m")
    if weights.endswith(".bin"):  # as older transformers wrote them
        (tmp_path / "m" / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / "m" / weights)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config.pop("dtype") == str(dtype).removeprefix("torch.")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    torch.save({"input_ids": ids(24, 16, seed=3)}, tmp_path / "d.pt")
    argv = ["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.pt"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--quiet", "--threads", "1", "--latency-repeats", "1"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["hf_dtype"] == str(dtype).removeprefix("torch.")  # was float32
    source = (tmp_path / "m" / weights).stat().st_size
    assert (tmp_path / "o" / "hf" / "model.safetensors").stat().st_size < 0.9 * source  # was 1.7x
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "hf")
    assert {p.dtype for p in again.parameters()} == {dtype}
    assert {p.dtype for p in load_pruned(tmp_path / "o").parameters()} == {dtype}


TAGGER_CODE = """
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import TokenClassifierOutput

from .configuration_text14 import Text14Config


class Text14Model(LlamaModel):
    config_class = Text14Config


class Text14ForTokenClassification(LlamaPreTrainedModel):
    config_class = Text14Config

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return TokenClassifierOutput(logits=self.score(hidden))
"""


def test_a_task_head_of_a_folders_own_code_loads_with_the_auto_class_its_auto_map_names(tmp_path):
    """An ``hf:`` folder with its own token classifier (``architectures``
    ``Text14ForTokenClassification``, ``auto_map`` naming ``AutoModel`` and
    ``AutoModelForTokenClassification``): a class transformers does not define was loaded
    with ``AutoModel``, the bare model, its head's weights dropped (no logits to score).
    The auto class the ``auto_map`` maps to the named class loads it."""
    from cleanai_plugins.io.hf import load_hf_model

    folder = tmp_path / "m"
    torch.manual_seed(0)
    tagger = transformers.LlamaForTokenClassification(transformers.LlamaConfig(**{**LM, "num_labels": 5}))
    remote_code_folder(
        folder,
        tagger,
        TAGGER_CODE,
        "Text14ForTokenClassification",
        {"AutoModel": "Text14Model", "AutoModelForTokenClassification": "Text14ForTokenClassification"},
    )
    model = load_hf_model(f"hf:{folder}", trust_remote_code=True)
    assert type(model).__name__ == "Text14ForTokenClassification"  # was Text14Model
    assert torch.equal(model.score.weight, tagger.score.weight)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("accelerate") is not None, reason="transformers can load them here"
)
@pytest.mark.parametrize("method", ["bitsandbytes", "gptq", "fp8", "mxfp4"])
def test_a_quantized_folder_is_refused_by_name_not_with_a_traceback(method, tmp_path, capsys):
    """A folder whose config holds a ``quantization_config`` (bitsandbytes, GPTQ, FP8, the
    MXFP4 of GPT-OSS checkpoints): transformers raised ``ImportError`` for the package it
    needs (``accelerate``, ``optimum``), which escaped the loader: a raw traceback, exit 1."""
    llama().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    extra = {"bitsandbytes": {"load_in_8bit": True}, "gptq": {"bits": 4}}.get(method, {})
    config["quantization_config"] = {"quant_method": method, **extra}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    torch.save({"input_ids": ids(4, 16, seed=3)}, tmp_path / "d.pt")
    argv = ["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.pt"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--quiet"]) == 2  # was 1
    err = capsys.readouterr().err
    assert "needs a package that is not installed" in err and f"quant_method {method!r}" in err
    assert "Give the unquantized checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "family, before, after", [("deepseek-v3", 85_152, 63_240), ("minicpm3", 66_208, 48_880)]
)  # fmt: skip
def test_latent_attention_prunes_its_query_lora_rank_and_writes_it(family, before, after, tmp_path):
    """Latent attention's query LoRA (``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``,
    DeepSeek-V2 / V3 / V3.2, MiniCPM3, Youtu): the default kept its rank, blamed on the
    heads (``this family's config derives the head size from the width``): no fix-up wrote
    ``q_lora_rank``, so a pruned rank did not rebuild (DeepSeek-V3 66,336 parameters at
    0.4, MiniCPM3 51,976). The rank is written; it prunes and reloads."""
    from hf_families import build
    from test_hf_text_7 import assert_generates_alike, default_prune

    model, inputs, _ = build(family)
    model.eval()
    _, small = default_prune(model, inputs, 0.4)
    ranks = {layer.self_attn.q_a_proj.out_features for layer in small.model.layers}
    assert ranks == {20} and small.config.q_lora_rank == 20  # was 32, kept
    assert (params(model), params(small)) == (before, after)
    assert small.config.cleanai_pruning["from_pretrained"] is True
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    x = ids(2, 8)
    with torch.no_grad():
        assert float((small(x).logits - again(x).logits).abs().max()) <= 1e-6
    assert_generates_alike(small, inputs)


def test_a_scale_derived_from_the_query_rank_keeps_it_with_that_reason():
    """Dots3-Note derives ``q_lora_scale`` from ``q_lora_rank``: with the rank written, a
    pruned rank rebuilds every shape but not that scale. The default keeps the rank with
    that reason (it was blamed on the heads), and a scale mismatch no longer outweighs
    tensors of another shape when the fix-up puts a written key back (its 4 scales had put
    the dense MLP's ``intermediate_size`` back, and the MLP was then kept)."""
    from cleanai_core.graph.dependency import DependencyGraph
    from cleanai_plugins.zoo.transformers.describable import undescribable

    model = dots3_note()
    graph = DependencyGraph(model, (ids(1, 8),))
    kept = undescribable(graph, 0.5)
    why = {}
    for group in graph.groups(prunable_only=True):
        first = group.slices[0].module
        for units, reason in kept:
            if torch.isin(group.units, torch.as_tensor(units)).any():
                why[first] = reason.partition(" (")[0]
    ranks = {m: w for m, w in why.items() if m.endswith("q_a_proj")}
    assert len(ranks) == 4  # a scale of the same attention (q_lora_scale, kv_lora_scale), was "heads: ..."
    assert all(w.startswith(m.removesuffix("q_a_proj")) and w.endswith("lora_scale") for m, w in ranks.items())
    assert "model.layers.0.mlp.gate_proj" not in why  # the dense MLP prunes
