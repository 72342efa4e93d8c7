"""The zoo plugins look up timm's, torchvision's and transformers' classes only once those
are imported (``cleanai_plugins.zoo.loaded``): loading the plugins imports none of them,
and the pruned classes the plugins swap in still load by name from a pickle, also in a
process that has not imported their library yet."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

HEAVY = ("timm", "torchvision", "transformers", "torch._dynamo")


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_loading_the_plugins_imports_no_model_library():
    got = _run(
        f"""
        import sys
        from cleanai_core.plugins import get_plugin_manager
        pm = get_plugin_manager()
        assert pm.has_plugin("cleanai_plugins.zoo.timm") and pm.has_plugin("cleanai_plugins.zoo.transformers")
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
        """
    )
    assert got == "[]"


def test_a_plain_model_prunes_without_importing_them():
    got = _run(
        f"""
        import sys, torch
        from torch import nn
        from cleanai_core import StructuredPruner
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
        pruned = StructuredPruner(model, torch.randn(1, 3, 12, 12), "magnitude", pruning_ratio=0.5).prune()
        print(pruned[0].out_channels, sorted(m for m in {HEAVY[:3]!r} if m in sys.modules))
        """
    )
    assert got == "4 []"  # (torch imports torch._dynamo itself, for the trace's dispatch mode)


def _pickled(tmp_path, module: torch.nn.Module) -> str:
    path = tmp_path / "m.pt"
    torch.save(module, path)
    return str(path)


PICKLE_CHECK = """
import sys, torch
assert not any(m in sys.modules for m in ("timm", "torchvision"))
m = torch.load({path!r}, weights_only=False)
print(type(m).__module__, type(m).__name__)
"""


def test_pruned_timm_classes_unpickle_before_timm_is_imported(tmp_path):
    pytest.importorskip("timm")
    from timm.models.xcit import XCA

    from cleanai_plugins.zoo.timm.cross_covariance import pruned_cross_covariance_classes

    attn = XCA(16, num_heads=2)
    attn.__class__ = pruned_cross_covariance_classes()[XCA]
    x = torch.randn(1, 5, 16)
    expected = attn(x)
    got = _run(PICKLE_CHECK.format(path=_pickled(tmp_path, attn)))
    assert got == "cleanai_plugins.zoo.timm.cross_covariance PrunedXCA"
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.allclose(back(x), expected)


def test_pruned_torchvision_classes_unpickle_before_torchvision_is_imported(tmp_path):
    pytest.importorskip("torchvision")
    from torchvision.models.optical_flow.raft import CorrBlock
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    from cleanai_plugins.zoo.torchvision import pruned_corr_block
    from cleanai_plugins.zoo.torchvision_swin import pruned_classes

    attn = ShiftedWindowAttention(8, [2, 2], [0, 0], num_heads=2)
    attn.__class__ = pruned_classes()[ShiftedWindowAttention]
    got = _run(PICKLE_CHECK.format(path=_pickled(tmp_path, attn)))
    assert got == "cleanai_plugins.zoo.torchvision_swin PrunedShiftedWindowAttention"
    block = CorrBlock(num_levels=2, radius=1)
    block.__class__ = pruned_corr_block()
    block.channels = 7
    got = _run(PICKLE_CHECK.format(path=_pickled(tmp_path, block)))
    assert got == "cleanai_plugins.zoo.torchvision PrunedCorrBlock"


def test_the_plugins_act_on_a_library_imported_after_they_loaded():
    pytest.importorskip("timm")
    got = _run(
        """
        from cleanai_core.plugins import get_plugin_manager
        from cleanai_plugins.zoo.timm.cross_covariance import pruned_cross_covariance_classes
        get_plugin_manager()
        before = pruned_cross_covariance_classes()
        import timm
        after = pruned_cross_covariance_classes()
        print(before, sorted(c.__name__ for c in after.values()))
        """
    )
    assert got == "None ['PrunedCrossCovarianceAttn', 'PrunedXCA']"
