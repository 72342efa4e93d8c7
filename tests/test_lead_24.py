"""Session 24, by the lead: one cause per test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_hf_text_15 import folder  # noqa: E402

from cleanai_core.cli import main  # noqa: E402

TOKENIZER_CODE = """import pathlib
pathlib.Path({sentinel!r}).write_text("the folder's tokenizer code ran")
from transformers import PreTrainedTokenizerFast


class Lead24Tokenizer(PreTrainedTokenizerFast):
    pass
"""


def tokenizer_with_code(where: Path, tokenizer_class: str) -> None:
    """The folder's tokenizer named as code of its own (``auto_map`` in
    ``tokenizer_config.json``, beside a model class transformers defines)."""
    config = json.loads((where / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_lead24.Lead24Tokenizer"]}
    config["tokenizer_class"] = tokenizer_class
    (where / "tokenizer_config.json").write_text(json.dumps(config))
    (where / "tokenization_lead24.py").write_text(TOKENIZER_CODE.format(sentinel=str(where / "RAN")))


def test_a_tokenizer_with_code_of_its_own_runs_only_with_trust_code(tmp_path, capsys):
    """A built-in model class (Llama) whose tokenizer is code the folder ships: without
    ``--trust-code`` the job said the tokenizer "cannot be read ... a file may be truncated
    or damaged" (transformers had refused to import it), and ``--trust-code`` could not help:
    the consent was read from the model's class alone. Now the refusal names the code and
    the flag, nothing runs and nothing is written; with the flag the code runs, prunes, and
    ``hf/`` keeps it."""
    src = folder(tmp_path)
    tokenizer_with_code(src, "Lead24Tokenizer")
    (tmp_path / "t.txt").write_text("the cat sat on a mat and the dog ran to the park with a ball.\n" * 20)
    argv = ["prune", "--model", f"hf:{src}", "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o"),
            "--seq-len", "16", "--threads", "1", "--latency-repeats", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tokenization_lead24.Lead24Tokenizer" in err and "--trust-code" in err and "damaged" not in err
    assert not (src / "RAN").exists() and not (tmp_path / "o").exists()

    assert main([*argv, "--trust-code"]) == 0
    assert (src / "RAN").exists()
    assert (tmp_path / "o" / "hf" / "tokenization_lead24.py").is_file()
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["params_after"] < report["params_before"]


def test_a_built_in_tokenizer_class_beside_code_of_its_own_runs_no_code(tmp_path, capsys):
    """``tokenizer_class`` names a class transformers defines while ``auto_map`` names the
    folder's code: the built-in class is used, without consent and without running it."""
    src = folder(tmp_path)
    tokenizer_with_code(src, "PreTrainedTokenizerFast")
    (tmp_path / "t.txt").write_text("the cat sat on a mat and the dog ran to the park with a ball.\n" * 20)
    argv = ["prune", "--model", f"hf:{src}", "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o"),
            "--seq-len", "16", "--threads", "1", "--latency-repeats", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert not (src / "RAN").exists()
