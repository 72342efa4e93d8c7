"""Hugging Face text models, session 19: one cause per test (tiny models from configs,
nothing downloaded). The task heads besides causal / masked LMs and sequence classifiers
(token classification, question answering, multiple choice, regression, encoder-decoder
classifiers, a model without a head) through ``cleanai prune --model hf:`` and the
``hf/`` folder it writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_families import BART, ENC, ENC_EXTRA, T5, V  # noqa: E402

from cleanai_core import StructuredPruner  # noqa: E402
from cleanai_core.cli import main  # noqa: E402
from cleanai_plugins.io.hf import cleanai_evaluate, head_kind, save_and_verify  # noqa: E402
from cleanai_plugins.io.text import load_text_dataset  # noqa: E402

ARGS = ["--ratio", "0.4", "--threads", "1", "--latency-repeats", "1", "--quiet"]


def tiny(cls: str, config: str = "BertConfig", **kw):
    torch.manual_seed(0)
    base = {**ENC, **ENC_EXTRA} if config == "BertConfig" else {}
    return getattr(transformers, cls)(getattr(transformers, config)(**{**base, **kw})).eval()


def ids(*shape: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(5, V, shape, generator=torch.Generator().manual_seed(seed))


def prune_job(model, data: dict, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    """``cleanai prune`` of ``model`` saved as a folder, on ``data`` saved as a ``.pt``."""
    model.save_pretrained(tmp_path / "m")
    torch.save(data, tmp_path / "d.pt")
    rc = main(["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.pt"),
               "--out", str(tmp_path / "o"), *ARGS, *extra])  # fmt: skip
    report = tmp_path / "o" / "report.json"
    return rc, json.loads(report.read_text()) if report.exists() else {}


def evaluate(model, data: dict) -> dict | None:
    """The ``hf:`` evaluator on ``data`` read as the job reads a ``.pt`` (batches of 4)."""
    from torch.utils.data import DataLoader

    path = Path(f"/tmp/cleanai-test-{id(data)}.pt")
    torch.save(data, path)
    try:
        items = load_text_dataset(str(path), {"model": model})
    finally:
        path.unlink()
    return cleanai_evaluate(model, DataLoader(items, batch_size=4), torch.device("cpu"))


@pytest.mark.parametrize(
    "cls, outputs",
    [
        ("BertForQuestionAnswering", "start and end logits"),
        ("BertModel", "hidden states"),
        ("BertForPreTraining", "prediction and next-sentence logits"),
    ],
)
def test_a_model_whose_output_has_no_logits_field_reloads_into_hf(cls, outputs, tmp_path, monkeypatch):
    """The ``hf/`` folder was verified on ``.logits`` alone: a question-answering head
    (``start_logits`` / ``end_logits``), a model without a head and BERT's pre-training
    heads (``prediction_logits``) failed with ``AttributeError: ... has no attribute
    'logits'``, so no ``hf/`` was written although ``from_pretrained`` reloads them. Every
    floating output is compared now; a changed one still refuses the folder."""
    model = tiny(cls)
    x = {"input_ids": ids(2, 8)}
    small = StructuredPruner(model, x, importance="magnitude", pruning_ratio=0.4).prune()
    result = save_and_verify(small, tmp_path / "hf", x)
    assert result["hf_reload_path"] == "from_pretrained", (outputs, result["hf_reload"])
    assert (tmp_path / "hf" / "config.json").exists()
    again = type(small).from_pretrained(tmp_path / "hf")
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in small.parameters())
    # a reload whose outputs differ is still refused
    import cleanai_plugins.io.hf as hf

    def off(config, folder, dtype=torch.float32, remote_code=False):
        m = type(small).from_pretrained(folder).eval()
        with torch.no_grad():
            m.get_input_embeddings().weight.mul_(1.5)
        return m

    monkeypatch.setattr(hf, "_quiet_reload", off)
    refused = save_and_verify(small, tmp_path / "hf2", x)
    assert refused["hf_folder"] is None and refused["hf_reload"].startswith("failed: ValueError: reloaded")
    assert not (tmp_path / "hf2").exists()


def predicted(model, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits.argmax(-1)


def test_a_token_classifier_is_scored_per_token_not_as_a_language_model():
    """A token classifier's ``(N, L)`` labels were read as a causal LM's: shifted by one
    token and reported as a perplexity (``accuracy_note: a causal language model``). Each
    token's tag is compared at its own position now (``-100`` skipped): labels the model
    predicts score 1.0, and every other tag changed scores below."""
    model = tiny("BertForTokenClassification", num_labels=5)
    x = {"input_ids": ids(8, 12)}
    tags = predicted(model, x)
    tags[:, :2] = -100  # not scored
    result = evaluate(model, {**x, "labels": tags})
    assert (result["accuracy"], result["evaluated"], result["tokens"]) == (1.0, 80, 80)
    assert result["recovery_task"] == "token"  # --recover-epochs scores the tags in place too
    assert "perplexity" not in result and "accuracy_note" not in result
    wrong = tags.clone()
    wrong[:4, 2:] = (wrong[:4, 2:] + 1) % 5
    assert evaluate(model, {**x, "labels": wrong})["accuracy"] == pytest.approx(40 / 80)


def test_a_token_classifier_takes_one_tag_per_word_from_jsonl(tmp_path):
    """A ``.jsonl`` for a token classifier (NER, tagging) gives one tag per word; a list
    ``label`` was refused (``is neither an integer nor a label name``). Each word's first
    sub-token carries its tag (integers or the config's names), the rest -100."""
    model = tiny("BertForTokenClassification", num_labels=3)
    model.config.label2id = {"O": 0, "B": 1, "I": 2}
    model.save_pretrained(tmp_path / "m")
    word_tokenizer(tmp_path / "m").save_pretrained(tmp_path / "m")
    model = type(model).from_pretrained(tmp_path / "m").eval()
    lines = [
        {"text": "pruning removes unknownword heads", "label": ["O", "B", "I", 0]},
        {"text": "the model", "label": [1, 2]},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    items = load_text_dataset(str(tmp_path / "d.jsonl"), {"model": model, "seq_len": 16}).tensors
    assert items["labels"].tolist() == [[-100, 0, 1, 2, 0, -100], [-100, 1, 2, -100, -100, -100]]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "the model", "label": [1]}) + "\n")
    with pytest.raises(Exception, match="text 1 has 2 words but its label is 1 tags"):
        load_text_dataset(str(tmp_path / "bad.jsonl"), {"model": model})


def test_question_answering_data_is_scored_on_its_answers(tmp_path):
    """A question-answering head returns ``start_logits`` / ``end_logits``: with labels the
    evaluator raised ``AttributeError: ... has no attribute 'logits'`` (a raw traceback,
    exit 1), and the answers' own keys ``start_positions`` / ``end_positions`` were refused
    (``must be integers shaped like input_ids``). They are read as the answer now and
    scored by exact match of both ends."""
    model = tiny("BertForQuestionAnswering")
    x = {"input_ids": ids(12, 16)}
    with torch.no_grad():
        out = model(**x)
    start, end = out.start_logits.argmax(-1), out.end_logits.argmax(-1)
    assert head_kind(model) == "span"
    assert evaluate(model, {**x, "start_positions": start, "end_positions": end}) == {"accuracy": 1.0, "evaluated": 12}
    assert evaluate(model, {**x, "start_positions": start, "end_positions": (end + 1) % 16})["accuracy"] == 0.0
    rc, report = prune_job(model, {**x, "start_positions": start, "end_positions": end}, tmp_path)
    assert rc == 0 and report["accuracy_before"] == 1.0 and report["accuracy_after"] is not None
    assert report["hf_reload_path"] == "from_pretrained"
    # a half answer or a position past the row is refused, naming the key
    half, past = {"start_positions": start}, {"start_positions": start, "end_positions": end + 16}
    for bad, says in ((half, "without end_positions"), (past, r"end_positions go from \d+ to \d+; rows have 16")):
        torch.save({**x, **bad}, tmp_path / "bad.pt")
        with pytest.raises(Exception, match=says):
            load_text_dataset(str(tmp_path / "bad.pt"), {"model": model})


def test_a_model_without_a_head_says_why_its_labels_are_not_scored():
    """``BertModel`` (``AutoModel``: hidden states only) with labelled data raised
    ``AttributeError: 'BaseModelOutputWithPoolingAndCrossAttentions' object has no
    attribute 'logits'`` out of the job. It says why no accuracy is reported now."""
    model = tiny("BertModel")
    result = evaluate(model, {"input_ids": ids(8, 12), "labels": torch.tensor([0, 1] * 4)})
    assert set(result) == {"accuracy_note"}
    assert result["accuracy_note"].startswith("BertModel returns no logits (a model without a task head")


def test_a_multiple_choice_model_takes_its_choices_tokenized(tmp_path):
    """``...ForMultipleChoice`` reads ``(N, choices, L)`` ids: a ``.pt`` of them was refused
    (``input_ids must be ... (N, L)``) and text failed inside the model (``shape '[-1, 14]'
    is invalid``, blamed on the data's channels and image size). A ``.pt`` with ``(N, C, L)``
    ids is read and scored now; text is refused with what to give instead."""
    model = tiny("BertForMultipleChoice")
    x = {"input_ids": ids(12, 3, 10), "attention_mask": torch.ones(12, 3, 10, dtype=torch.long)}
    right = predicted(model, x)
    assert evaluate(model, {**x, "labels": right}) == {"accuracy": 1.0, "evaluated": 12}
    rc, report = prune_job(model, {**x, "labels": right}, tmp_path)
    assert rc == 0 and report["accuracy_before"] == 1.0 and report["params_after"] < report["params_before"]
    assert report["hf_reload_path"] == "from_pretrained"
    (tmp_path / "t.txt").write_text("a question and its answers\n" * 8)
    with pytest.raises(Exception, match=r"multiple-choice model.*input_ids \(N, choices, L\)"):
        load_text_dataset(str(tmp_path / "t.txt"), {"model": model})
    torch.save({"input_ids": ids(12, 10)}, tmp_path / "flat.pt")
    with pytest.raises(Exception, match=r"shape \(N, choices, L\) for a multiple-choice model"):
        load_text_dataset(str(tmp_path / "flat.pt"), {"model": model})


def test_a_regression_head_keeps_its_numbers_and_reports_the_squared_error(tmp_path):
    """A sequence classifier with one output (``problem_type="regression"``): its float
    labels were cast to integers (0.7 -> 0) and an accuracy of the one output's argmax
    against them reported (0.83 on random targets); text labels that were numbers were
    refused. They stay numbers now and the report gives the mean squared error."""
    model = tiny("BertForSequenceClassification", num_labels=1, problem_type="regression")
    x = {"input_ids": ids(12, 10)}
    with torch.no_grad():
        scores = model(**x).logits[:, 0]
    target = scores + torch.linspace(-1, 1, 12)
    result = evaluate(model, {**x, "labels": target})
    assert result["mse"] == pytest.approx(float(torch.linspace(-1, 1, 12).pow(2).mean()), rel=1e-5)
    assert "accuracy" not in result and result["accuracy_note"].startswith("a regression head")
    rc, report = prune_job(model, {**x, "labels": target}, tmp_path)
    assert rc == 0 and report["accuracy_before"] is None and report["mse_before"] > 0 and report["mse_after"] > 0
    assert "Mean squared error (held-out)" in (tmp_path / "o" / "report.md").read_text()


WORDS = "pruning removes whole channels heads and neurons the model is smaller and faster on ordinary hardware".split()


def word_tokenizer(folder: Path):
    """A BERT word-piece tokenizer over ``WORDS`` (``[SEP]`` is id 3), written offline."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return transformers.BertTokenizer(str(folder / "vocab.txt"))


@pytest.mark.parametrize(
    "cls, config, kw",
    [
        ("BartForSequenceClassification", "BartConfig", {**BART, "eos_token_id": 3}),
        ("T5ForSequenceClassification", "T5Config", {**T5, "pad_token_id": 0, "eos_token_id": 3}),
    ],
)
def test_an_encoder_decoder_classifier_takes_text(cls, config, kw, tmp_path):
    """BART's and T5's sequence classifiers make their decoder inputs from ``input_ids``,
    but text data refused every encoder-decoder (``an encoder-decoder (sequence-to-sequence)
    model; text data drives causal LMs ...``). Classifier and question-answering heads take
    text now (a bare ``BartModel`` / ``T5Model`` is still refused)."""
    model = tiny(cls, config, **kw)
    model.save_pretrained(tmp_path / "m")
    word_tokenizer(tmp_path / "m").save_pretrained(tmp_path / "m")
    lines = [json.dumps({"text": " ".join(WORDS[i % 7 : i % 7 + 5]), "label": i % 2}) for i in range(24)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    rc = main(["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.jsonl"),
               "--out", str(tmp_path / "o"), *ARGS, "--seq-len", "16"])  # fmt: skip
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rc == 0 and 0 <= report["accuracy_before"] <= 1 and report["evaluation_samples"] > 0
    assert report["params_after"] < report["params_before"] and report["hf_reload_path"] == "from_pretrained"
    bare = tiny(cls.replace("ForSequenceClassification", "Model"), config, **kw)  # no head: still refused
    bare.save_pretrained(tmp_path / "b")
    word_tokenizer(tmp_path / "b").save_pretrained(tmp_path / "b")
    assert main(["prune", "--model", f"hf:{tmp_path / 'b'}", "--data", str(tmp_path / "d.jsonl"),
                 "--out", str(tmp_path / "o2"), *ARGS]) == 2  # fmt: skip


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_an_encoder_decoder_lm_takes_text_and_reports_its_target_perplexity(family, tmp_path):
    """``cleanai prune --model hf:`` of T5, BART, Marian, Pegasus... with text was refused
    (``an encoder-decoder (sequence-to-sequence) model``): no seq2seq model could be
    pruned from the command line. A ``.txt`` line is now both source and target, a
    ``.jsonl`` line gives ``text`` and ``target``; the decoder reads the target shifted
    right (the model's own ``prepare_decoder_input_ids_from_labels``), and the report
    gives the target tokens' perplexity, scored at their own positions."""
    from hf_families import build

    model, _, _ = build(family)
    model.save_pretrained(tmp_path / "m")
    word_tokenizer(tmp_path / "m").save_pretrained(tmp_path / "m")
    model = type(model).from_pretrained(tmp_path / "m").eval()
    assert head_kind(model) == "seq2seq"
    lines = [" ".join(WORDS[i % 9 : i % 9 + 6]) for i in range(24)]
    pairs = [json.dumps({"text": t, "target": " ".join(t.split()[::-1])}) for t in lines]
    (tmp_path / "d.jsonl").write_text("\n".join(pairs) + "\n")
    items = load_text_dataset(str(tmp_path / "d.jsonl"), {"model": model, "seq_len": 16})
    first = items[0]
    assert set(first) == {"input_ids", "attention_mask", "decoder_input_ids", "labels"}
    start = model.config.decoder_start_token_id
    assert int(first["decoder_input_ids"][0]) == start
    target = first["labels"][:-1] != -100  # the decoder reads each target token one position later
    assert torch.equal(first["decoder_input_ids"][1:][target], first["labels"][:-1][target])
    # the score: the mean negative log-likelihood of the labels at their own positions
    from torch.utils.data import DataLoader

    result = cleanai_evaluate(model, DataLoader(items, batch_size=8), torch.device("cpu"))
    batch = items.tensors
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert result["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-5)
    assert result["tokens"] == int((batch["labels"] != -100).sum())
    # tokenized: decoder inputs of their own length with labels to match, or labels alone (shifted for it)
    x, y = ids(6, 10), ids(6, 5, seed=4)
    torch.save({"input_ids": x, "decoder_input_ids": y, "labels": y}, tmp_path / "given.pt")
    given = load_text_dataset(str(tmp_path / "given.pt"), {"model": model}).tensors
    assert torch.equal(given["decoder_input_ids"], y) and torch.equal(given["labels"], y)
    torch.save({"input_ids": x, "labels": y}, tmp_path / "labels.pt")
    shifted = load_text_dataset(str(tmp_path / "labels.pt"), {"model": model}).tensors
    assert torch.equal(shifted["decoder_input_ids"][:, 1:], y[:, :-1]) and shifted["decoder_input_ids"].shape == (6, 5)
    torch.save({"input_ids": x, "decoder_input_ids": y, "labels": x}, tmp_path / "bad.pt")
    with pytest.raises(Exception, match=r"labels \(6, 10\) must match decoder_input_ids \(6, 5\)"):
        load_text_dataset(str(tmp_path / "bad.pt"), {"model": model})
    for data in ("d.jsonl", "d.txt"):
        (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
        rc = main(["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / data),
                   "--out", str(tmp_path / data[2:]), *ARGS, "--seq-len", "16"])  # fmt: skip
        report = json.loads((tmp_path / data[2:] / "report.json").read_text())
        assert rc == 0 and report["perplexity_before"] > 1 and report["perplexity_after"] > 1
        assert report["params_after"] < report["params_before"] and report["hf_reload_path"] == "from_pretrained"


def test_gradient_criteria_use_a_text_models_own_loss():
    """``importance="taylor"`` / ``"hessian"`` (API and ``--importance taylor``) on a causal
    LM, masked LM, token classifier or encoder-decoder with labelled batches was refused:
    ``taylor importance scores with cross-entropy over dim 1 of the output, which has shape
    (4, 8, 100), so it needs integer labels of shape (4, 100)``. Where cross-entropy over
    dim 1 does not fit, a model that takes ``labels`` and returns ``.loss`` is scored on its
    own loss (a causal LM shifts its labels itself): the gradients equal that loss's."""
    from hf_families import build

    from cleanai_core.collect import accumulate_gradients

    model, _, _ = build("llama-gqa")
    x = ids(3, 8)
    batch = {"input_ids": x, "labels": x}
    grads = accumulate_gradients(model, [batch], None, None)
    squares = accumulate_gradients(model, [batch], None, None, squared=True)
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.k_proj.weight", "lm_head.weight"]
    want = dict.fromkeys(names, 0)
    model.zero_grad()
    model(**batch).loss.backward()
    for n in names:
        torch.testing.assert_close(grads[n], model.get_parameter(n).grad, rtol=1e-5, atol=1e-8)
        model.get_parameter(n).grad = None
    for i in range(3):  # the empirical Fisher: each row's own gradient, squared
        model(input_ids=x[i : i + 1], labels=x[i : i + 1]).loss.backward()
        for n in names:
            want[n] = want[n] + model.get_parameter(n).grad ** 2
            model.get_parameter(n).grad = None
    for n in names:
        torch.testing.assert_close(squares[n], want[n], rtol=1e-4, atol=1e-10)
    # a token classifier prunes on its tags' loss
    tagger = tiny("BertForTokenClassification", num_labels=3)
    tags = {"input_ids": x, "labels": torch.randint(0, 3, (3, 8), generator=torch.Generator().manual_seed(0))}
    pruner = StructuredPruner(tagger, {"input_ids": x}, importance="taylor", pruning_ratio=0.4)
    small = pruner.collect_activations([tags], progress=False).prune()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in tagger.parameters())
    # labels that fit neither cross-entropy nor a loss of the model's own are still refused
    with pytest.raises(Exception, match="needs integer labels of shape"):
        accumulate_gradients(model, [{"input_ids": x, "labels": x}], lambda m, b: m(**b), None)


def test_recovery_of_a_token_classifier_trains_on_its_own_positions():
    """``--recover-epochs`` (``recover``, ``task="auto"``) read every ``(N, T, C)`` output as
    a causal LM's: it shifted a token classifier's tags by one position (each token taught
    the next token's tag), and a masked LM's or an encoder-decoder's labels the same way.
    On tags that are a function of each token (``id % 3``) recovery as a causal LM ends at
    0.35 accuracy; the ``"token"`` task (which the ``hf:`` evaluator names for these heads,
    the job passes on, and ``task="auto"`` finds for a tagger) scores them in place: 1.0."""
    from torch.utils.data import DataLoader

    from cleanai_core.recovery import distillation_loss, recover
    from cleanai_plugins.io.text import TextItems

    model = tiny("BertForTokenClassification", num_labels=3)
    train, test = ids(192, 12, seed=0), ids(48, 12, seed=1)
    train_set, test_set = (TextItems({"input_ids": x, "labels": x % 3}) for x in (train, test))
    small = StructuredPruner(model, {"input_ids": train[:2]}, importance="magnitude", pruning_ratio=0.4).prune()
    accuracy = {}
    for task in ("causal_lm", "auto"):  # "auto" finds the tagger ("token") from its config's num_labels
        recovered, _ = recover(small, model, train_set, epochs=3, lr=3e-3, task=task, progress=False, seed=0)
        result = cleanai_evaluate(recovered, DataLoader(test_set, batch_size=8), torch.device("cpu"))
        accuracy[task] = result["accuracy"]
    assert accuracy["causal_lm"] < 0.5 and accuracy["auto"] > 0.95, accuracy
    # the loss: cross-entropy at each labelled position, unshifted; KL over the real positions
    logits = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    tags = torch.tensor([[0, 1, 2, -100, 1], [2, 2, -100, -100, -100]])
    ce = distillation_loss(logits, None, tags, task="token", inputs={}, kd_weight=0.0)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits.flatten(0, 1), tags.flatten()))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    kl = distillation_loss(logits, logits.flip(0), None, task="token", inputs={"attention_mask": mask}, temperature=1.0)
    s, t = logits[mask.bool()].log_softmax(-1), logits.flip(0)[mask.bool()].log_softmax(-1)
    torch.testing.assert_close(kl, (t.exp() * (t - s)).sum(-1).mean())


def test_a_decoder_classifier_without_a_pad_token_takes_padded_text(tmp_path):
    """Llama / GPT-2 / Qwen2 sequence classifiers find each row's last token by
    ``config.pad_token_id``, which their checkpoints rarely set: the job padded the texts
    with the tokenizer's pad token and the model refused the batch (``Cannot handle batch
    sizes > 1 if no padding token is defined``), reported as badly shaped calibration
    batches. The tokenizer's pad token is written into the loaded config now; tokenized
    data without a tokenizer is refused with what to set."""
    from hf_families import LM

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**LM, "pad_token_id": None}, num_key_value_heads=2)
    model = transformers.LlamaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "m")
    lines = [json.dumps({"text": " ".join(WORDS[i % 9 : i % 9 + 2 + i % 4]), "label": i % 2}) for i in range(24)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    torch.save({"input_ids": ids(8, 6), "labels": torch.tensor([0, 1] * 4)}, tmp_path / "d.pt")
    with pytest.raises(Exception, match="has no pad_token_id in its config.*set pad_token_id in the folder's config"):
        load_text_dataset(str(tmp_path / "d.pt"), {"model": transformers.AutoModelForSequenceClassification
                                                   .from_pretrained(tmp_path / "m")})  # fmt: skip
    word_tokenizer(tmp_path / "m").save_pretrained(tmp_path / "m")
    rc = main(["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.jsonl"),
               "--out", str(tmp_path / "o"), *ARGS, "--seq-len", "16"])  # fmt: skip
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rc == 0 and 0 <= report["accuracy_before"] <= 1 and report["hf_reload_path"] == "from_pretrained"
    assert json.loads((tmp_path / "o" / "hf" / "config.json").read_text())["pad_token_id"] == 0  # [PAD]
    assert json.loads((tmp_path / "m" / "config.json").read_text()).get("pad_token_id") is None  # untouched


def test_a_multi_label_classifier_is_scored_on_every_class():
    """A multi-label head (``problem_type="multi_label_classification"``): its multi-hot
    float labels were cast to integers and the evaluator gave up, so the job reported
    ``the data has no labels``; ``.jsonl`` lists of classes were refused. They are read as
    multi-hot rows and scored by exact match of every class (logit > 0)."""
    model = tiny("BertForSequenceClassification", num_labels=3, problem_type="multi_label_classification")
    model.config.label2id = {"a": 0, "b": 1, "c": 2}
    x = {"input_ids": ids(8, 10)}
    with torch.no_grad():
        hot = (model(**x).logits > 0).float()
    assert evaluate(model, {**x, "labels": hot}) == {"accuracy": 1.0, "evaluated": 8}
    off = hot.clone()
    off[:3, 0] = 1 - off[:3, 0]
    assert evaluate(model, {**x, "labels": off}) == {"accuracy": 5 / 8, "evaluated": 8}
    from cleanai_plugins.io.text import _label_ids

    rows = _label_ids([[0, 2], [], ["b"]], model, "d.jsonl")
    assert rows.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    with pytest.raises(Exception, match="multi-label classifier: give each 'label' as a list"):
        _label_ids([1, 2], model, "d.jsonl")


def test_recovery_refuses_labels_that_do_not_fit_the_outputs_by_name():
    """``--recover-epochs`` on a question-answering head with its answers (``(N, 2)`` start
    and end positions, read since this session) ended in a raw ``RuntimeError: 0D or 1D
    target tensor expected, multi-target not supported`` (exit 1): recovery's cross-entropy
    takes one class index per row. Labels of another shape are refused with the shapes and
    what to do."""
    from cleanai_core.errors import UserError
    from cleanai_core.recovery import recover
    from cleanai_plugins.io.text import TextItems

    model = tiny("BertForQuestionAnswering")
    x = ids(8, 12)
    data = TextItems({"input_ids": x, "labels": torch.stack([x[:, 0] % 12, x[:, 1] % 12], dim=1)})
    with pytest.raises(UserError, match=r"one class index per row of the outputs \(\d+, 12\), but the labels"):
        recover(model, model, data, epochs=1, progress=False)


def test_labels_that_do_not_fit_the_head_are_named_not_called_missing():
    """A token classifier given one label per text (``.jsonl`` ``label``) reported ``the data
    has no labels``: the ``hf:`` evaluator passed, and the next one reads ``(x, y)`` pairs
    only. The note names the shapes and what the head takes."""
    model = tiny("BertForTokenClassification", num_labels=3)
    result = evaluate(model, {"input_ids": ids(8, 10), "labels": torch.tensor([0, 1, 2, 0] * 2)})
    assert set(result) == {"accuracy_note"}
    assert result["accuracy_note"].startswith("labels of shape (4,) do not fit BertForTokenClassification's logits")


def _padded(n: int = 8) -> dict:
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :3] = 0
    return {"input_ids": ids(2, n), "attention_mask": mask}


def _choices() -> dict:
    return {"input_ids": ids(2, 2, 8), "attention_mask": torch.ones(2, 2, 8, dtype=torch.long)}


def _eos(eos: int) -> dict:  # BART / T5 classifiers pool the end-of-sequence token of every row
    return {"input_ids": torch.cat([ids(2, 7), torch.full((2, 1), eos)], dim=1)}


#: the task heads swept for ``docs/compatibility.md`` "Session 19": (class, config, its keys, inputs)
HEADS = [
    ("BertForTokenClassification", "BertConfig", {"num_labels": 5}, _padded),
    ("BertForQuestionAnswering", "BertConfig", {}, _padded),
    ("BertForMultipleChoice", "BertConfig", {}, _choices),
    ("BertForNextSentencePrediction", "BertConfig", {}, _padded),
    ("BertForPreTraining", "BertConfig", {}, _padded),
    ("BertModel", "BertConfig", {}, _padded),
    ("RobertaForMultipleChoice", "RobertaConfig", {**ENC, **ENC_EXTRA, "pad_token_id": 1}, _choices),
    ("DebertaV2ForTokenClassification", "DebertaV2Config", {**ENC, **ENC_EXTRA}, _padded),
    ("DebertaV2ForMultipleChoice", "DebertaV2Config", {**ENC, **ENC_EXTRA}, _choices),
    (
        "DebertaV2ForSequenceClassification",
        "DebertaV2Config",
        {
            **ENC,
            **ENC_EXTRA,
            "relative_attention": True,
            "position_buckets": 8,
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
            "pos_att_type": ["p2c", "c2p"],
            "max_relative_positions": -1,
        },
        _padded,
    ),  # fmt: skip
    ("ElectraForQuestionAnswering", "ElectraConfig", {**ENC, **ENC_EXTRA, "embedding_size": 32}, _padded),
    ("AlbertForMultipleChoice", "AlbertConfig", {**ENC, **ENC_EXTRA, "embedding_size": 32}, _choices),
    (
        "XLNetForQuestionAnsweringSimple",
        "XLNetConfig",
        {"vocab_size": V, "d_model": 64, "n_layer": 2, "n_head": 4, "d_inner": 96},
        _padded,
    ),  # fmt: skip
    (
        "FunnelForMultipleChoice",
        "FunnelConfig",
        {"vocab_size": V, "block_sizes": [1, 1], "d_model": 64, "n_head": 4, "d_head": 16, "d_inner": 96},
        _choices,
    ),  # fmt: skip
    ("MPNetForQuestionAnswering", "MPNetConfig", {**ENC, **ENC_EXTRA, "pad_token_id": 1}, _padded),
    (
        "ModernBertForTokenClassification",
        "ModernBertConfig",
        {**ENC, **ENC_EXTRA, "global_attn_every_n_layers": 2, "local_attention": 4},
        _padded,
    ),  # fmt: skip
    (
        "ModernBertForMultipleChoice",
        "ModernBertConfig",
        {**ENC, **ENC_EXTRA, "global_attn_every_n_layers": 2, "local_attention": 4},
        _choices,
    ),  # fmt: skip
    ("RoFormerForSequenceClassification", "RoFormerConfig", {**ENC, **ENC_EXTRA, "embedding_size": 64}, _padded),
    ("LlamaForTokenClassification", "LlamaConfig", {"num_key_value_heads": 2}, _padded),
    ("LlamaForQuestionAnswering", "LlamaConfig", {"num_key_value_heads": 2}, _padded),
    ("Qwen2ForSequenceClassification", "Qwen2Config", {"num_key_value_heads": 2}, _padded),
    ("MistralForQuestionAnswering", "MistralConfig", {"num_key_value_heads": 2}, _padded),
    ("Gemma2ForTokenClassification", "Gemma2Config", {"num_key_value_heads": 2, "head_dim": 16}, _padded),
    (
        "GPT2ForQuestionAnswering",
        "GPT2Config",
        {"vocab_size": V, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64},
        _padded,
    ),  # fmt: skip
    ("BartForSequenceClassification", "BartConfig", BART, lambda: _eos(2)),
    ("BartForQuestionAnswering", "BartConfig", BART, _padded),
    ("T5ForSequenceClassification", "T5Config", T5, lambda: _eos(1)),
    ("T5ForTokenClassification", "T5Config", T5, _padded),
    ("T5EncoderModel", "T5Config", T5, _padded),
    ("UMT5ForSequenceClassification", "UMT5Config", T5, lambda: _eos(1)),
]


@pytest.mark.corpus
@pytest.mark.parametrize("cls, config, kw, inputs", HEADS, ids=[h[0] for h in HEADS])
def test_task_heads_prune_match_the_oracle_and_reload(cls, config, kw, inputs, tmp_path):
    """Every task head of the sweep: the masking oracle at 0.5, a calibrated default prune at
    0.5 that runs, says ``from_pretrained: True`` and reloads with the same outputs."""
    from hf_families import LM

    from cleanai_core.testing import check_pruner
    from cleanai_core.verify import output_leaves

    base = LM if config in ("LlamaConfig", "Qwen2Config", "MistralConfig", "Gemma2Config") else {}
    model = tiny(cls, config, **{**base, **kw}) if config != "BertConfig" else tiny(cls, **kw)
    x = inputs()
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.pruned_units > 0 and report.max_abs_diff < 1e-5
    small = StructuredPruner(model, x, pruning_ratio=0.5).collect_activations([x, x], progress=False).prune()
    assert small.config.cleanai_pruning["from_pretrained"] is True
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        for a, b in zip(output_leaves(small(**x)), output_leaves(again(**x)), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
