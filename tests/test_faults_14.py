"""Fourteenth round of bad input and faults (docs/reliability.md, "Session 23: faults14"):
a model holding what cannot be copied, optional extras that are missing or broken, and the
cases below each heading."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from cleanai_core import StructuredPruner
from cleanai_core.cli import main
from cleanai_core.errors import UserError
from cleanai_core.extras import import_extra
from cleanai_plugins.io.demo import DigitsCNN

DEMO = "cleanai_plugins.io.demo:DigitsCNN"
ROOT = Path(__file__).resolve().parents[1]


def _digits_files(tmp_path):
    torch.manual_seed(0)
    torch.save(DigitsCNN().state_dict(), tmp_path / "w.pt")
    torch.save((torch.rand(24, 1, 8, 8), torch.randint(0, 10, (24,))), tmp_path / "d.pt")


def _bytes(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


# -- a model holding an object copy.deepcopy cannot copy --------------------------------------------------


class _Hooker:
    """An object whose bound method is a hook, holding a lock (a logger with a file handle)."""

    def __init__(self):
        self.lock = threading.Lock()

    def hook(self, module, inputs, output):
        return None


class _NoCopy(DigitsCNN):
    def __deepcopy__(self, memo):
        raise RuntimeError("this model cannot be copied")


def _with(kind):
    model = DigitsCNN()
    if kind == "lock":
        model.features[0].guard = threading.Lock()
    elif kind == "generator_in_a_list":
        model.fc.sources = [1, (i for i in range(3))]
    elif kind == "open_file":
        model.log = open(os.devnull, "w")  # noqa: SIM115 - held by the model, as a training logger's file is
    elif kind == "hook_of_a_locked_object":
        model.fc.register_forward_hook(_Hooker().hook)
    elif kind == "own_deepcopy":
        model = _NoCopy()
    return model


@pytest.mark.parametrize(
    "kind, words",
    [
        ("lock", "the attribute 'guard' of module 'features.0' (Conv2d) holds a _thread.lock"),
        ("generator_in_a_list", "the attribute 'sources' of module 'fc' (Linear) holds a list holding an object"),
        ("open_file", "the attribute 'log' of the model (DigitsCNN) holds a _io.TextIOWrapper"),
        ("hook_of_a_locked_object", "the forward hook _Hooker.hook of module 'fc' (Linear) is bound to an object"),
        ("own_deepcopy", "the model (_NoCopy) fails to copy itself (its class's own copy protocol)"),
    ],
)
def test_a_model_holding_what_cannot_be_copied_is_named_with_the_attribute(kind, words):
    # a model holding a lock, an open file, a generator (a TensorBoard writer, a logger) raised a bare
    # "TypeError: cannot pickle '_thread.lock' object" from copy.py, naming nothing of the model
    model = _with(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(UserError) as info:
        StructuredPruner(model, x, importance="magnitude", pruning_ratio=0.5).prune()
    text = str(info.value)
    assert text.startswith("the model cannot be copied: ") and words in text, text
    assert "CleanAI prunes, checks and measures copies of the model" in text
    fix = {"own_deepcopy": "make copy.deepcopy work on _NoCopy", "hook_of_a_locked_object": "handle.remove()"}
    assert fix.get(kind, "delete the attribute and set it again on the pruned model") in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_with_a_copyable_attribute_still_prunes():
    model = DigitsCNN()
    model.notes = {"epochs": 3, "history": [0.5, 0.7]}
    pruned = StructuredPruner(model, torch.rand(2, 1, 8, 8), importance="magnitude", pruning_ratio=0.5).prune()
    assert pruned.notes == model.notes and pruned.notes is not model.notes
    assert pruned.features[0].out_channels == 16 and pruned.fc.in_features == 32


def test_the_command_line_names_the_attribute_that_cannot_be_copied_and_writes_nothing(tmp_path, monkeypatch, capsys):
    # a --model factory whose model holds a lock: "failed: TypeError: cannot pickle '_thread.lock' object",
    # blamed on code outside CleanAI, exit 1
    monkeypatch.chdir(tmp_path)
    _digits_files(tmp_path)
    (tmp_path / "locked_models.py").write_text(
        "import threading\nfrom cleanai_plugins.io.demo import DigitsCNN\n\n\n"
        "def locked():\n    m = DigitsCNN()\n    m.lock = threading.Lock()\n    return m\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    before = _bytes(tmp_path)
    code = main(["prune", "--model", "locked_models:locked", "--weights", "w.pt", "--data", "d.pt", "--out", "o", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "the attribute 'lock' of the model (DigitsCNN) holds a _thread.lock" in err
    assert not (tmp_path / "o").exists()
    assert _bytes(tmp_path) == before


# -- optional extras missing, or installed and broken ------------------------------------------------------


def _package(root, name, body):
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(body)


def test_import_extra_tells_a_missing_extra_from_a_broken_one(tmp_path, monkeypatch):
    # every import site caught ImportError and said "needs torchvision: pip install torchvision" where torchvision
    # was installed and Pillow missing; a RuntimeError at import (a build for another torch) was not caught at all
    monkeypatch.syspath_prepend(str(tmp_path))
    _package(tmp_path, "cleanai_x_broken", "raise RuntimeError('operator cleanai_x::nms does not exist')\n")
    _package(tmp_path, "cleanai_x_needs", "import cleanai_x_absent_dependency\n")
    with pytest.raises(UserError) as missing:
        import_extra("cleanai_x_absent", "reading it", "pip install cleanai-x", "Or do without.")
    assert (
        str(missing.value)
        == "reading it needs cleanai_x_absent, which is not installed: pip install cleanai-x. Or do without."
    )
    with pytest.raises(UserError) as broken:
        import_extra("cleanai_x_broken.sub", "reading it", "pip install cleanai-x")
    assert "needs cleanai_x_broken, which is installed but fails to import (RuntimeError: operator" in str(broken.value)
    assert f"this is torch {torch.__version__}): reinstall a matching version (pip install cleanai-x)." in str(
        broken.value
    )
    with pytest.raises(UserError) as needs:
        import_extra("cleanai_x_needs", "reading it", "pip install cleanai-x")
    assert "it imports 'cleanai_x_absent_dependency', which is missing" in str(needs.value)
    assert "pip install --force-reinstall cleanai_x_needs" in str(needs.value)
    assert import_extra("json", "reading JSON", "-").loads("[1]") == [1]


def test_a_yaml_config_without_pyyaml_names_the_package_and_the_other_formats(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _digits_files(tmp_path)
    (tmp_path / "c.yaml").write_text("ratio: 0.4\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # what an environment without PyYAML finds
    code = main(["prune", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--config", "c.yaml", "--out", "o"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "is YAML; reading it needs PyYAML, which is not installed: pip install 'cleanai[yaml]'" in err
    assert "Or write the file as TOML or JSON." in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, use",
    [
        (["explain", "--model", "torchvision:resnet18"], "torchvision:NAME needs torchvision"),
        (["prune", "--model", DEMO, "--data", "imgs", "--image-size", "8", "--out", "o"], "reading image folders"),
    ],
)
def test_a_torchvision_that_fails_to_import_is_named_as_the_installs_fault(tmp_path, args, use):
    # torchvision built for another torch raises RuntimeError at import: exit 1, "raised by code outside CleanAI
    # (the model's forward, a data set, a factory or a plugin)"
    fake = tmp_path / "site"
    fake.mkdir()
    _package(fake, "torchvision", "raise RuntimeError('operator torchvision::nms does not exist')\n")
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "cleanai_core.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert use in run.stderr
    assert "torchvision, which is installed but fails to import (RuntimeError: operator torchvision::nms" in run.stderr
    assert "reinstall a matching version (pip install torchvision)" in run.stderr
    assert not (tmp_path / "o").exists()


# -- a file path where a module name goes; a module in the current folder the command cannot see -----------


@pytest.mark.parametrize(
    "args, shown, module",
    [
        (["--plugin", "x.py", "plugins"], "--plugin 'x.py' is a file path", "'x'"),
        (["--plugin", "./x.py", "plugins"], "--plugin './x.py' is a file path", "'x'"),
        (["prune", "--model", "x.py:build", "--data", "d.pt", "--out", "o"], "'x.py' is a file path", "'x'"),
        (["prune", "--model", "./x.py:build", "--data", "d.pt", "--out", "o"], "'./x.py' is a file path", "'x'"),
        (["prune", "--model", DEMO, "--data", "sub/x.py:data", "--out", "o"], "'sub/x.py' is a file path", "'x'"),
        (["explain", "--model", "./x.py:build"], "names a model factory by its file: './x.py' is a file path", "'x'"),
    ],
)
def test_a_file_path_given_for_a_module_name_is_named_and_runs_nothing(
    tmp_path, monkeypatch, capsys, args, shown, module
):
    # --plugin x.py imported x (running its code) and then said "No module named 'x.py'; 'x' is not a package";
    # ./x.py: "the 'package' argument is required to perform a relative import"; --model ./x.py:build: "(no such
    # file)" for a file that is there
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _digits_files(tmp_path)
    (tmp_path / "sub").mkdir()
    for where in ("x.py", "sub/x.py"):
        (tmp_path / where).write_text("import pathlib\npathlib.Path('RAN').touch()\n\n\ndef build():\n    return 1\n")
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert shown in err and f"where a module's import name goes: give {module}" in err
    folder = "sub" if "sub/" in " ".join(args) else "."
    assert f"(PYTHONPATH={folder} cleanai ...)" in err
    assert not (tmp_path / "RAN").exists() and not (tmp_path / "o").exists()


def test_a_module_in_the_current_folder_outside_the_search_path_gets_the_pythonpath_hint(tmp_path, monkeypatch, capsys):
    # the cleanai command does not import from the current folder (python -m does): --model mymodels:build beside
    # mymodels.py said only "No module named 'mymodels'. Check the spelling and that the package is installed"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    _digits_files(tmp_path)
    (tmp_path / "mymodels.py").write_text("def build():\n    return None\n")
    code = main(["prune", "--model", "mymodels:build", "--weights", "w.pt", "--data", "d.pt", "--out", "o"])
    code_plugin = main(["--plugin", "mymodels", "plugins"])
    err = capsys.readouterr().err
    assert code == code_plugin == 2 and "Traceback" not in err
    hint = (
        "There is 'mymodels.py' in the current folder, but the cleanai command does not import from the current folder"
    )
    assert err.count(hint) == 2 and "run it as PYTHONPATH=. cleanai ..." in err
    assert "No module named 'mymodels'" in err and not (tmp_path / "o").exists()
    (tmp_path / "mymodels.py").unlink()
    assert main(["--plugin", "mymodels", "plugins"]) == 2
    assert "current folder" not in capsys.readouterr().err  # no such file: no hint


# -- DependencyGraph's public queries given what they do not take ------------------------------------------


@pytest.mark.parametrize(
    "mask, got",
    [
        (
            torch.tensor([3, 5]),
            "got a torch.int64 tensor of shape (2,) (indices: make the mask with mask = torch.zeros(171",
        ),
        ([0, 1], "got [0, 1] (indices: make the mask"),
        (torch.zeros(5, dtype=torch.bool), "got a torch.bool tensor of shape (5,)"),
    ],
)
def test_keep_indices_names_a_mask_of_the_wrong_form(mask, got):
    # keep_indices (docs/api.md) given unit indices or a list: IndexError: index 1 is out of bounds for dimension 0
    # with size 1 / TypeError: bad operand type for unary ~: 'list', from inside it
    from cleanai_core import DependencyGraph

    graph = DependencyGraph(DigitsCNN(), torch.rand(1, 1, 8, 8))
    with pytest.raises(UserError) as info:
        graph.keep_indices(mask)
    assert "keep_indices' pruned_units must be a boolean mask over the graph's 171 units" in str(info.value)
    assert got in str(info.value)
    good = torch.zeros(171, dtype=torch.bool)
    good[graph.groups(prunable_only=True)[0].units[:4]] = True
    kept = graph.keep_indices(good)
    assert kept[("features.0", "out")].tolist() == list(range(4, 32))
    with pytest.raises(UserError, match=r"explain\(max_groups='5'\) must be an integer >= 0"):
        graph.explain("5")
    assert "5 groups (3 prunable):\n  ... 5 more" in graph.explain(0) and "group 0:" not in graph.explain(0)


# -- an input named through a link inside --out ----------------------------------------------------------


@pytest.mark.parametrize("option", ["--data", "--weights", "--config"])
def test_an_input_given_as_a_link_inside_out_is_refused_with_overwrite(tmp_path, monkeypatch, capsys, option):
    # --data o/d.pt (a link to ../d.pt) --out o --overwrite: exit 0, and the link the user named was deleted with
    # the old folder (the check compared the followed path, outside o); --config's path was resolved when read
    monkeypatch.chdir(tmp_path)
    _digits_files(tmp_path)
    (tmp_path / "c.toml").write_text("ratio = 0.4\n")
    (tmp_path / "o").mkdir()
    target = {"--data": "d.pt", "--weights": "w.pt", "--config": "c.toml"}[option]
    (tmp_path / "o" / target).symlink_to(Path("..") / target)
    args = {"--data": "d.pt", "--weights": "w.pt", "--config": None, option: f"o/{target}"}
    argv = ["prune", "--model", DEMO, "--out", "o", "--overwrite", "-q"]
    argv += [a for k, v in args.items() if v for a in (k, v)]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--out 'o' contains your input '" in err and f"o/{target}'; choose another folder." in err
    assert (tmp_path / "o" / target).is_symlink() and sorted(p.name for p in (tmp_path / "o").iterdir()) == [target]
    (tmp_path / "o" / target).unlink()  # the same run with the file itself outside: written
    argv = [a if a != f"o/{target}" else target for a in argv]
    assert main(argv) == 0 and (tmp_path / "o" / "model.pt").is_file()


# -- a local Hugging Face folder whose config.json transformers cannot read ------------------------------


@pytest.mark.parametrize(
    "config, words",
    [
        ("{", "'e/config.json' is not valid JSON (JSONDecodeError: "),
        ('{"model_type": "nosuchmodel"}', "cannot read 'e/config.json' (ValueError: "),
        (
            '{"model_type": "custom", "auto_map": {"AutoModel": "modeling.M"}}',
            "'e/config.json' names model code of its own (auto_map: modeling.M), which CleanAI neither imports "
            "nor runs without --trust-code",
        ),
    ],
)
def test_a_local_hf_folder_with_an_unreadable_config_is_named_as_the_folder_it_is(
    tmp_path, monkeypatch, capsys, config, words
):
    # all three said "no such local folder, and 'e' is not in the Hugging Face cache ... huggingface-cli download e"
    # of a folder that is there
    tf = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    _digits_files(tmp_path)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text(config)
    (tmp_path / "e" / "modeling.py").write_text("import pathlib\npathlib.Path('RAN').touch()\n")
    code = main(["prune", "--model", "hf:e", "--data", "d.pt", "--out", "o", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert words in err and "no such local folder" not in err and "huggingface-cli download" not in err
    if "nosuchmodel" in config:
        assert f"transformers {tf.__version__} cannot read" in err and "pip install -U transformers" in err
    assert not (tmp_path / "RAN").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "config_sizes"])
def test_a_local_hf_folder_with_damaged_weights_exits_2_naming_the_folder(tmp_path, monkeypatch, capsys, damage):
    # from_pretrained's SafetensorError (a truncated or empty model.safetensors) and RuntimeError (config.json's
    # sizes unlike the weights') came out of cleanai prune / explain as tracebacks, exit 1
    tf = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    # transformers' load report (a warning) goes to a handler that may hold an earlier test's closed stderr
    monkeypatch.setattr(logging.getLogger("transformers"), "level", logging.ERROR)
    cfg = tf.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    tf.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:3000])
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        config = tmp_path / "m" / "config.json"
        config.write_text(config.read_text().replace('"hidden_size": 32', '"hidden_size": 48'))
    torch.save({"input_ids": torch.randint(0, 100, (16, 12)), "labels": torch.randint(0, 2, (16,))}, "ids.pt")
    before = _bytes(tmp_path / "m")
    codes = [
        main(["prune", "--model", "hf:m", "--data", "ids.pt", "--out", "o", "-q"]),
        main(["explain", "--model", "hf:m"]),
    ]
    err = capsys.readouterr().err
    assert codes == [2, 2] and "Traceback" not in err
    if damage == "empty":  # named by its size since session 24 (leftovers16), in both commands
        assert err.count("--model 'hf:m': the weights file 'm/model.safetensors' is empty (0 bytes)") == 2
        assert "SafetensorError" not in err
    else:
        said = {"truncated": "SafetensorError: ", "config_sizes": "RuntimeError: "}[damage]
        assert err.count("transformers could not load the weights with BertForSequenceClassification (" + said) == 2
        assert "The weights files in 'm' may be truncated or damaged, or not fit its config.json (sizes)" in err
    assert _bytes(tmp_path / "m") == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["truncated", "no_added_tokens", "empty"])
def test_a_damaged_tokenizer_is_named_as_damaged_not_missing(tmp_path, monkeypatch, capsys, damage):
    # a tokenizer.json without 'added_tokens': KeyError traceback from transformers, exit 1; truncated or empty:
    # "no tokenizer next to the model", of a folder holding one
    tf = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(logging.getLogger("transformers"), "level", logging.ERROR)
    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=40)
    tf.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "m")
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghij"]))
    tf.BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "m")
    tokenizer = tmp_path / "m" / "tokenizer.json"
    bad = {"truncated": tokenizer.read_text()[:300], "no_added_tokens": '{"version": "1.0"}', "empty": ""}[damage]
    tokenizer.write_text(bad)
    (tmp_path / "docs.txt").write_text("a b c d e f\n" * 20)
    code = main(["prune", "--model", "hf:m", "--data", "docs.txt", "--out", "o", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "the tokenizer in 'm' (tokenizer.json, tokenizer_config.json) cannot be read (" in err
    assert "a file may be truncated or damaged. Save it again with tokenizer.save_pretrained" in err
    assert "no tokenizer next to" not in err and tokenizer.read_text() == bad and not (tmp_path / "o").exists()


# -- a network name offline; an operating-system error that names no file ---------------------------------


def test_a_timm_hub_name_not_in_the_cache_is_refused_at_once(tmp_path, monkeypatch, capsys):
    # timm:hf-hub:NAME fetched its config from the Hub (pretrained or not): offline, some 40 s of retries, then
    # "cannot use: An error happened while trying to locate the file on the Hub ... Check the path (its length,
    # links and permissions) and the disk"
    pytest.importorskip("timm")
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    code = main(["explain", "--model", "timm:hf-hub:timm/resnet18.a1_in1k"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "Retrying" not in err
    assert "timm reads 'timm/resnet18.a1_in1k' from the Hugging Face Hub, and it is not in the local cache" in err
    assert "huggingface-cli download timm/resnet18.a1_in1k" in err


def test_an_os_error_naming_no_file_is_not_blamed_on_a_path(tmp_path, monkeypatch, capsys):
    # a plugin's loader meeting a network error: "cannot use: Name or service not known. Check the path (its length,
    # links and permissions) and the disk"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _digits_files(tmp_path)
    (tmp_path / "netloader.py").write_text(
        "from cleanai_core import hookimpl\n\n\n@hookimpl\ndef cleanai_load_model(spec, options):\n"
        "    if spec.startswith('net:'):\n        raise ConnectionError('Name or service not known')\n"
    )
    code = main(["--plugin", "netloader", "prune", "--model", "net:x", "--data", "d.pt", "--out", "o", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "ConnectionError: Name or service not known. An operating-system or network error that names no file" in err
    assert "Check the path" not in err and not (tmp_path / "o").exists()


# -- a layer ratio for a layer whose output channels no group can prune ----------------------------------


def test_a_layer_ratio_for_a_layer_whose_outputs_cannot_be_pruned_is_refused(tmp_path, monkeypatch, capsys):
    # --layer-ratio fc=0.5 (the classifier, whose outputs are the model's): exit 0 with the group of fc's inputs
    # pruned at the global 0.1 (6 of 64 units), the 0.5 dropped without a word
    x = torch.rand(2, 1, 8, 8)
    for spec in ("fc", "Linear"):
        with pytest.raises(UserError) as info:
            StructuredPruner(
                DigitsCNN(), x, importance="magnitude", pruning_ratio=0.1, layer_pruning_ratios={spec: 0.5}
            )
        assert (
            f"layer_pruning_ratios[{spec!r}]=0.5 (--layer-ratio): the output channels of 'fc' (group 4: model output)"
            in str(info.value)
        )
        assert "its input channels are group 3's, produced by 'features.7': give the ratio to that layer" in str(
            info.value
        )
    pruner = StructuredPruner(
        DigitsCNN(), x, importance="magnitude", pruning_ratio=0.1, layer_pruning_ratios={"*": 0.5}
    )
    with pytest.raises(UserError, match=r"layer_pruning_ratios\['fc'\]=0.5"):
        pruner.set_layer_ratios({"fc": 0.5})
    assert pruner.layer_ratios["features.7"] == 0.5  # kept what it had
    assert [g.n_pruned for g in pruner.plan().groups] == [16, 32, 32]  # a region holding fc: valid
    ok = StructuredPruner(DigitsCNN(), x, importance="magnitude", pruning_ratio=0.1, layer_pruning_ratios={"fc": 0.0})
    assert [g.n_pruned for g in ok.plan().groups] == [3, 6, 6]  # a ratio of 0 keeps a layer whole: no conflict
    monkeypatch.chdir(tmp_path)
    _digits_files(tmp_path)
    code = main(
        ["prune", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--layer-ratio", "fc=0.5", "--out", "o"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "the output channels of 'fc'" in err
    assert not (tmp_path / "o").exists()


# -- save_pruned with a spec that rebuilds nothing -------------------------------------------------------


@pytest.mark.parametrize(
    "spec, words",
    [
        ("nope_pkg:build", "cannot import module 'nope_pkg' for model factory 'nope_pkg:build'"),
        ("cleanai_plugins.io.demo:Nope", "module 'cleanai_plugins.io.demo' has no attribute 'Nope'"),
        ("whatever", "no installed loader can rebuild 'whatever'"),
        (
            "torchvision:resnet18",
            "the history's step 0 slices features.0.weight, which the model 'torchvision:resnet18'",
        ),
    ],
)
def test_save_pruned_refuses_a_spec_that_rebuilds_nothing(tmp_path, spec, words):
    # the folder was written, and load_pruned then refused it ("cannot import module", "no installed loader can
    # rebuild"): save_pruned's trial rebuild took any failure as "cannot tell here"
    from cleanai_core.io import save_pruned

    pruner = StructuredPruner(DigitsCNN(), torch.rand(2, 1, 8, 8), importance="magnitude", pruning_ratio=0.5)
    model = pruner.prune()
    with pytest.raises(UserError) as info:
        save_pruned(tmp_path / "o", model, pruner.history, spec)
    assert str(info.value).startswith("save_pruned: load_pruned could not load the folder: ") and words in str(
        info.value
    )
    assert str(info.value).endswith(". Nothing was written.") and ".." not in str(info.value)
    assert not (tmp_path / "o").exists()
    save_pruned(tmp_path / "o", model, pruner.history, DEMO)  # the spec that builds it: written
    assert (tmp_path / "o" / "model.pt").is_file()
