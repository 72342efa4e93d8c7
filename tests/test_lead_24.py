"""Session 24, by the lead: one cause per test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


def tokenizer_job(tmp_path: Path, tokenizer_class: str) -> tuple[Path, list[str]]:
    """A tiny Llama folder whose tokenizer names code of its own, and the ``cleanai prune``
    arguments of a text job on it."""
    src = folder(tmp_path)
    tokenizer_with_code(src, tokenizer_class)
    (tmp_path / "t.txt").write_text("the cat sat on a mat and the dog ran to the park with a ball.\n" * 20)
    argv = ["prune", "--model", f"hf:{src}", "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o"),
            "--seq-len", "16", "--threads", "1", "--latency-repeats", "1", "--quiet"]  # fmt: skip
    return src, argv


def test_a_tokenizer_with_code_of_its_own_runs_only_with_trust_code(tmp_path, capsys):
    """A built-in model class (Llama) whose tokenizer is code the folder ships: without
    ``--trust-code`` the job said the tokenizer "cannot be read ... a file may be truncated
    or damaged" (transformers had refused to import it), and ``--trust-code`` could not help:
    the consent was read from the model's class alone. Now the refusal names the code and
    the flag, nothing runs and nothing is written; with the flag the code runs, prunes, and
    ``hf/`` keeps it."""
    src, argv = tokenizer_job(tmp_path, "Lead24Tokenizer")
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
    src, argv = tokenizer_job(tmp_path, "PreTrainedTokenizerFast")
    assert main(argv) == 0
    assert not (src / "RAN").exists()


# -- sensitivity trials and the --auto allocation under torch.distributed --------------------------

WORLD = 2


class _OutOfMemoryOnRank(torch.nn.Module):
    """Passes its input on; on rank 1, fails as out of memory on a batch of fewer than 8
    channels (a trial that pruned the layer before it)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank == 1 and x.shape[0] > 1 and x.shape[1] < 8:
            raise MemoryError("rank 1 is out of memory")
        return x


def _sens_worker(rank: int, init_file: str, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from cleanai_core import StructuredPruner
    from cleanai_core.distributed import from_writer
    from cleanai_core.job.auto import sensitivity_and_ratios

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    result: dict = {}
    try:
        result["writer"] = from_writer({"rank": rank})
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5),
        ).eval()  # fmt: skip
        g = torch.Generator().manual_seed(1)
        data = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(3)]
        pruner = StructuredPruner(model, torch.randn(1, 3, 8, 8), pruning_ratio=0.4, covariance_rows=0)
        pruner.collect_activations(data, progress=False)
        # the latency each rank measures differs: rank 1's candidates look twice as slow
        import cleanai_core.metrics as metrics

        metrics.measure_latency = lambda m, *a, **k: sum(p.numel() for p in m.parameters()) * (1.0 + rank)
        cfg = {"sensitivity_ratios": (0.25, 0.5), "auto": True, "target_latency": 0.6, "latency_repeats": 1}
        result["ratios"] = sensitivity_and_ratios(cfg, pruner, data, progress=False)["allocation"]["layer_ratios"]
        # a trial that fails on rank 1 alone (out of memory there) while rank 0 runs on
        plain = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), _OutOfMemoryOnRank(rank),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5),
        ).eval()  # fmt: skip
        pruner = StructuredPruner(plain, torch.randn(1, 3, 8, 8), pruning_ratio=0.4, covariance_rows=0)
        pruner.collect_activations(data, progress=False)
        try:
            sensitivity_and_ratios({"sensitivity_ratios": (0.5,)}, pruner, data, progress=False)
            result["failed"] = None
        except BaseException as exc:  # noqa: BLE001 - the outcome is the test's
            result["failed"] = f"{type(exc).__name__}: {exc}"
    finally:
        torch.save(result, Path(out) / f"rank-{rank}.pt")
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_stop_together_on_a_trials_error_and_prune_as_rank_0_allocated(tmp_path):
    """Under ``torch.distributed`` the sensitivity trials ran outside any collective stage: a
    trial failing on one rank (out of memory) left the other rank to finish and wait in its
    next collective (gloo: "Connection closed by peer"; NCCL: until the timeout). And the
    ``--auto`` allocation of a latency target was each rank's own, from latencies that
    differ between ranks, so the ranks could plan different models and stop with "the ranks
    computed different pruning plans". Now every rank stops, naming the failing one, and
    every rank takes rank 0's allocation."""
    import torch.multiprocessing as mp

    mp.spawn(_sens_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"rank-{r}.pt") for r in range(WORLD)]
    assert [g["writer"] for g in got] == [{"rank": 0}, {"rank": 0}]
    assert got[0]["ratios"] == got[1]["ratios"] and got[0]["ratios"]
    assert got[1]["failed"] == "MemoryError: rank 1 is out of memory"
    assert got[0]["failed"] is not None and "failed on rank(s) [1]" in got[0]["failed"]


def test_a_pruned_model_out_of_memory_is_no_pruning_failure():
    """A trial or a pruned model that ran out of memory was taken for a pruning that broke
    the model (``PruningError``): the sensitivity curve of the group ended there, in silence,
    and verification kept the group whole. Out of memory now stops with its own error."""
    from cleanai_core import StructuredPruner
    from cleanai_core.sensitivity import analyse_sensitivity

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), _OutOfMemoryOnRank(1),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5),
    ).eval()  # fmt: skip
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))) for _ in range(2)]
    pruner = StructuredPruner(model, torch.randn(2, 3, 8, 8), pruning_ratio=0.4, covariance_rows=0)
    pruner.collect_activations(data, progress=False)
    with pytest.raises(MemoryError, match="out of memory"):
        analyse_sensitivity(pruner, data, ratios=(0.5,), progress=False)
    with pytest.raises(MemoryError, match="out of memory"):
        pruner.prune()
    model[2].rank = 0  # memory enough: both run
    assert len(analyse_sensitivity(pruner, data, ratios=(0.5,), progress=False).curves) == 2
    assert pruner.prune()[0].out_channels == 5


def test_the_weight_energies_follow_new_data_given_to_the_same_parameter():
    """An in-place prune keeps the user's Parameter objects and gives them the pruned data
    (``p.data = ...``, api16), which leaves the version counter as it was; the energies
    scoring caches per weight were returned for the weight before the prune, so a
    ``GradualPruner`` step ranked the channels of the previous step's weights (the merged
    tree kept 2 + 14 of a tuple scope's channels where one prune keeps 4 + 12)."""
    from cleanai_core.interfaces import squared_weight

    p = torch.nn.Parameter(torch.arange(12.0).reshape(4, 3))
    rows, _ = squared_weight(p)
    assert rows.tolist() == [5.0, 50.0, 149.0, 302.0]
    version = p._version
    p.data = p.data[[0, 2]].clone()
    assert p._version == version  # what made the cache stale
    rows, cols = squared_weight(p)
    assert rows.tolist() == [5.0, 149.0] and cols.tolist() == [36.0, 50.0, 68.0]
