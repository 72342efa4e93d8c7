"""Session 19, outputs: what CleanAI writes after pruning (report numbers, history replay,
save/load), checked against independent counts."""

from __future__ import annotations

import json
import textwrap
import warnings

import torch
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.history import PruningHistory
from cleanai_core.io import load_pruned, save_pruned


def _prune(model, x, example=None, **kw):
    pruner = StructuredPruner(model, x[:1] if example is None else example, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.collect_activations([x], num_batches=1, progress=False)
        pruned = pruner.prune()
    return pruner, pruned


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def _encoder_flops(tokens: int, width: int, ff: int) -> int:
    """Linears (embedding, q/k/v, output, two MLP layers, head) and the two attention
    products of the two layers, 2 x MACs."""
    per_layer = tokens * width * 3 * width + tokens * width * width + 2 * tokens * width * ff
    per_layer += 2 * tokens * tokens * width
    return 2 * (tokens * 8 * width + 2 * per_layer + width * 5)


def test_a_transformer_encoders_flops_count_its_linears_and_attention():
    torch.manual_seed(0)
    model = _Encoder().eval()
    pruner, pruned = _prune(model, torch.randn(8, 10, 8), pruning_ratio=0.5)
    report = pruner.report()
    # in eval mode without gradients each layer ran as one fused call the counter did not see: 5,440
    assert report["flops_before"] == _encoder_flops(10, 32, 64) == 358_720
    width, ff = pruned.emb.out_features, pruned.enc.layers[0].linear1.out_features
    assert (width, ff) == (16, 32) and pruned.enc.layers[1].linear1.out_features == 32
    assert report["flops_after"] == _encoder_flops(10, width, ff) == 97_440
    assert report["params_after"] == sum(p.numel() for p in pruned.parameters()) == 4_677
    assert torch.backends.mha.get_fastpath_enabled()  # switched back on
    from cleanai_core.metrics import count_flops

    attention = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    q = torch.randn(1, 5, 8)
    # the fused _native_multi_head_attention: 0
    assert count_flops(_Fn(lambda q: attention(q, q, q, need_weights=False)[0]), q) == 2 * (5 * 8 * 32 + 2 * 5 * 5 * 8)


TIED = """
    import torch
    from torch import nn


    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.l1, self.l2 = nn.Linear(32, 64), nn.Linear(64, 32)
            self.out = nn.Linear(32, 50, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(self.l2(torch.relu(self.l1(self.emb(ids)))))
"""


def _tied_class(tmp_path, monkeypatch):
    """The class ``Tied``, importable as ``tied_model_o9:Tied`` (the spec ``load_pruned`` rebuilds)."""
    (tmp_path / "tied_model_o9.py").write_text(textwrap.dedent(TIED))
    monkeypatch.syspath_prepend(str(tmp_path))
    from tied_model_o9 import Tied

    return Tied


def test_tied_weights_stay_one_parameter_through_compensation_and_reload(tmp_path, monkeypatch):
    Tied = _tied_class(tmp_path, monkeypatch)
    torch.manual_seed(0)
    model = Tied().eval()
    ids = torch.randint(0, 50, (64, 10))
    pruner, pruned = _prune(model, ids, pruning_ratio=0.25)  # compensation and least squares: the defaults
    # compensation copied the output layer's weight and left the embedding the original's: two tensors
    assert pruned.out.weight is pruned.emb.weight and pruned.emb.weight.shape == (50, 24)
    n_params = 50 * 24 + (24 * 48 + 48) + (48 * 24 + 24) + 50
    assert sum(p.numel() for p in pruned.parameters()) == pruner.report()["params_after"] == n_params == 3_626
    # least squares is not folded into a weight another module reads (it rewrote the embedding's columns)
    keep = next(e.keep for e in pruner.history.steps[0] if e.module == "emb")
    assert torch.equal(pruned.emb.weight, model.emb.weight[:, keep])
    assert pruned.out.bias is not None and pruner.history.meta["added_biases"] == ["out"]
    with torch.no_grad():
        want = pruned(ids)
        fresh = PruningHistory.from_json(json.loads(json.dumps(pruner.history.to_json()))).replay(Tied().eval())
        fresh.load_state_dict(pruned.state_dict())
        # the embedding loaded the output layer's compensated values: outputs 9.3 apart
        assert torch.equal(fresh(ids), want)
        save_pruned(tmp_path / "out", pruned, pruner.history, "tied_model_o9:Tied")
        again = load_pruned(tmp_path / "out", trust_code=True)
        assert again.out.weight is again.emb.weight and torch.equal(again(ids), want)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.rnn, self.fc = nn.Linear(6, 24), nn.LSTM(24, 16, batch_first=True), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.rnn(torch.relu(self.emb(x)))[0][:, -1])


def test_an_lstms_flops_are_counted():
    from cleanai_core.metrics import count_flops

    def flops(e: int, h: int) -> int:  # 10 steps of 4 gates over the input and the hidden state
        return 2 * (10 * 6 * e + 10 * 4 * h * (e + h) + h * 3)

    torch.manual_seed(0)
    pruner, pruned = _prune(_Recurrent().eval(), torch.randn(8, 10, 6), pruning_ratio=0.5)
    report = pruner.report()
    # oneDNN ran the LSTM as one mkldnn_rnn_layer call, which the counter does not see: 2,976 -> 736
    assert report["flops_before"] == flops(24, 16) == 54_176
    assert (pruned.emb.out_features, pruned.rnn.hidden_size) == (12, 8)
    assert report["flops_after"] == flops(12, 8) == 14_288
    two_layers = nn.LSTM(24, 16, num_layers=2, bidirectional=True, batch_first=True).eval()
    assert count_flops(two_layers, torch.randn(1, 10, 24)) == 2 * 2 * 10 * 4 * (16 * (24 + 16) + 16 * (32 + 16))
    assert torch.backends.mkldnn.enabled and torch.backends.cudnn.enabled  # switched back on
    # a FLOPs target saw the linears alone: "kept 0.5" where the model kept 0.26 of its FLOPs (widths 12 and 8)
    target, small = _prune(_Recurrent().eval(), torch.randn(16, 10, 6), target_flops=0.5)
    kept = flops(small.emb.out_features, small.rnn.hidden_size) / flops(24, 16)
    assert target.report()["flops_after"] / target.report()["flops_before"] == kept and 0.45 < kept <= 0.5


def test_the_library_report_names_the_input_its_flops_were_counted_on():
    from cleanai_core.report import render_markdown
    from cleanai_plugins.io.demo import DigitsCNN

    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    one, _ = _prune(DigitsCNN().eval(), x, pruning_ratio=0.4)
    four, _ = _prune(DigitsCNN().eval(), x, example=x[:4], pruning_ratio=0.4)
    assert (one.report()["input_shape"], four.report()["input_shape"]) == ([1, 1, 8, 8], [4, 1, 8, 8])
    assert one.report()["flops_before"] == 3_577_088 and four.report()["flops_before"] == 4 * 3_577_088
    # report.md said "FLOPs (1 input) | 14.31M" for the batch of 4: four times the command line's figure
    assert "| FLOPs (1 input) | 3.58M | 1.36M |" in render_markdown(one.report())
    md = render_markdown(four.report())
    assert "| FLOPs (batch of 4) | 14.31M | 5.44M |" in md and "FLOPs of the example input of shape [4, 1, 8, 8]" in md
    from cleanai_core.pruning_report import input_shape

    two_inputs = input_shape((torch.zeros(2, 3), torch.zeros(2, 5)))
    assert two_inputs == {"0": [2, 3], "1": [2, 5]}
    assert "FLOPs (batch of 2)" in render_markdown({"input_shape": two_inputs, "flops_before": 1, "flops_after": 1})


class _Pooled(nn.Module):
    """Attention pooling with a learned query vector (``h @ q``: a matrix times a vector) and
    a bilinear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(6, 12)
        self.q = nn.Parameter(torch.randn(16))
        self.bil = nn.Bilinear(16, 12, 5)

    def forward(self, x):
        h, g = torch.relu(self.a(x)), torch.relu(self.b(x))
        w = torch.softmax(h @ self.q, dim=1).unsqueeze(-1)
        return self.bil((w * h).sum(1), (w * g).sum(1))


def test_matrix_vector_products_and_bilinear_layers_count_their_flops():
    from cleanai_core.metrics import count_flops

    def flops(h: int, g: int) -> int:  # two linears over 10 tokens, h @ q, and the bilinear x1 W x2
        return 2 * (10 * 6 * h + 10 * 6 * g + 10 * h + h * g * 5)

    torch.manual_seed(0)
    pruner, pruned = _prune(_Pooled().eval(), torch.randn(8, 10, 6), pruning_ratio=0.5)
    report = pruner.report()
    # mv and _trilinear have no formula in PyTorch's counter: 3,360 (the two linears alone)
    assert report["flops_before"] == flops(16, 12) == 5_600
    assert (pruned.a.out_features, pruned.b.out_features) == (16, 6)
    assert report["flops_after"] == flops(16, 6) == 3_920
    vec = torch.ones(8)
    assert count_flops(_Fn(lambda x: x @ vec), torch.randn(2, 3, 8)) == 2 * 6 * 8
    assert count_flops(_Fn(lambda x: x @ vec), torch.randn(8)) == 2 * 8
    assert count_flops(nn.Bilinear(8, 6, 4), (torch.randn(2, 5, 8), torch.randn(2, 5, 6))) == 2 * 10 * 8 * 6 * 4


class _Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def test_the_report_names_every_criterion_with_its_options():
    from cleanai_core.pruning_report import describe_importance
    from cleanai_core.scoring import WeightActivationImportance, get_importance
    from cleanai_plugins.io.demo import DigitsCNN

    names = {
        "magnitude": "MagnitudeImportance(p=2, reducer='mean')",
        "bn_scale": "BNScaleImportance(reducer='mean')",
        "lamp": "LAMPImportance(p=2, reducer='mean')",
        "random": "RandomImportance(seed=0)",
        "taylor": "TaylorImportance(reducer='sum')",
    }
    for name, text in names.items():
        assert describe_importance(get_importance(name)) == text
    torch.manual_seed(0)
    pruner, _ = _prune(DigitsCNN().eval(), torch.rand(16, 1, 8, 8), importance="magnitude", pruning_ratio=0.4)
    # the default repr: "<cleanai_plugins.importance.criteria.MagnitudeImportance object at 0x7f5dce11d510>"
    assert pruner.report()["importance"] == "MagnitudeImportance(p=2, reducer='mean')"
    assert describe_importance(WeightActivationImportance()) == (
        "WeightActivationImportance(weight_ratio=0.5, activation_ratio=0.5, form='multiplicative')"
    )
    varied = WeightActivationImportance(statistic="variance", reducer="max")
    assert describe_importance(varied).endswith("form='multiplicative', statistic='variance', reducer='max')")


def test_a_latency_target_run_reports_its_target(tmp_path):
    from digits_setup import cli_prune_args

    from cleanai_core.cli import main

    common = [*cli_prune_args(tmp_path), "--latency-repeats", "5"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = ["--auto", "--target-latency", "0.7", "--sensitivity-batches", "1"]
        assert main([*common, *auto, "--out", str(tmp_path / "lat")]) == 0
    report = json.loads((tmp_path / "lat" / "report.json").read_text())
    # pruning ratio, FLOPs and parameter targets all null, and the latency target named nowhere
    assert (report["pruning_ratio"], report["target_flops"], report["target_params"]) == (None, None, None)
    assert report["target_latency"] == 0.7 and report["allocation"]["target"] == "latency"
    assert "target latency 0.7" in (tmp_path / "lat" / "report.md").read_text()


def test_a_gradual_step_trains_the_bias_compensation_gave_a_tied_output_layer(tmp_path, monkeypatch):
    from cleanai_core import GradualPruner, PruningSchedule

    Tied = _tied_class(tmp_path, monkeypatch)
    torch.manual_seed(0)
    model, ids = Tied(), torch.randint(0, 50, (16, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gp = GradualPruner(model, ids[:2], opt, PruningSchedule(final=0.5, steps=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
            opt.step()
            opt.zero_grad()
            gp.step([ids])
    assert model.out.weight is model.emb.weight and model.out.bias is not None
    params = list(model.parameters())
    # the new bias was looked up beside "out.weight", a name the tied weight does not have: 5 of 6
    assert len(params) == 6 and {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in params}
    history = gp.histories[0].then(gp.histories[1])
    fresh = history.replay(Tied())
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), model.eval()(ids))


class _Mixer(nn.Module):
    """A token-mixing block: a linear layer over the 16 tokens of each of the 32 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 32)
        self.tokens = nn.Linear(16, 16)
        self.up, self.down, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.tokens(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h.mean(1))


def test_the_flops_of_pruned_copies_follow_a_layer_that_runs_once_per_channel():
    from cleanai_core.metrics import FlopsOfCopies, count_flops

    def flops(c: int, hidden: int) -> int:  # 16 tokens; the token mixing runs once per channel
        return 2 * (16 * 6 * c + c * 16 * 16 + 16 * c * hidden * 2 + c * 3)

    torch.manual_seed(0)
    model, x = _Mixer().eval(), torch.randn(8, 16, 6)
    copies = FlopsOfCopies(model, x[:1])
    pruned = StructuredPruner(model, x[:1], importance="magnitude", pruning_ratio=0.5).prune()
    widths = (pruned.embed.out_features, pruned.up.out_features)
    assert widths == (16, 32) and pruned.tokens.weight.shape == (16, 16)
    # taken from the layers' weights, the token mixing kept its FLOPs: 52,320 said
    assert copies(pruned) == count_flops(pruned, x[:1]) == flops(*widths) == 44_128
    # the FLOPs target searched with those counts: widths 21 and 41, 0.455 of the FLOPs kept for 0.5
    target, small = _prune(_Mixer().eval(), x, target_flops=0.5)
    assert (small.embed.out_features, small.up.out_features) == (22, 43)
    kept = flops(22, 43) / flops(32, 64)
    assert target.report()["flops_after"] / target.report()["flops_before"] == kept and 0.49 < kept <= 0.5
