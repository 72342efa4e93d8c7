"""Hugging Face speech, audio, multimodal and time-series models, and what a training step
of a pruned model reads.

Tiny random models of each family, built from configs (no download), prune on the default
path (weight-activation scores, compensation, verification against the masking oracle),
shrink, keep their output shapes, reload from the folder ``save_pruned`` writes with the
same outputs, and **train**: a forward in training mode and a backward run on the pruned
model.

Before session 21 every wav2vec2-style encoder (wav2vec2, HuBERT, Data2Vec-audio,
UniSpeech(-SAT), SEW, wav2vec2-conformer, wav2vec2-BERT) pruned its hidden width but kept
``masked_spec_embed`` whole: a vector of the hidden width that only a training forward
writes over the masked time steps (SpecAugment), a bare parameter that no operation of the
eval trace read. The pruned model ran in eval mode and failed its first training step
("value tensor of shape [32] cannot be broadcast to indexing result of shape [20, 16]").
Parameters no operation read in eval mode now start the training-mode trace pass too
(``cleanai_core.graph.trace._training_pass``). A fast subset runs by default; the whole
list is marked ``corpus``.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.io import load_pruned, save_pruned
from cleanai_core.testing import run_model

T = pytest.importorskip("transformers")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


W2V = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    conv_dim=(16, 16, 16),
    conv_stride=(5, 2, 2),
    conv_kernel=(10, 3, 3),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    vocab_size=20,
)
WHISPER = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    num_mel_bins=16,
    max_source_positions=16,
    vocab_size=100,
)


def waves(n: int = 1, seed: int = 1) -> dict:
    return {"input_values": torch.randn(n, 1600, generator=gen(seed))}


def features(shape: tuple[int, ...], key: str = "input_features"):
    return lambda n=1, seed=1: {key: torch.randn(n, *shape, generator=gen(seed))}


#: family -> (model class, config class, config keys, inputs(n, seed))
FAMILIES = {
    "wav2vec2-ctc": ("Wav2Vec2ForCTC", "Wav2Vec2Config", W2V, waves),
    "wav2vec2-seq-cls": ("Wav2Vec2ForSequenceClassification", "Wav2Vec2Config", W2V, waves),
    "wav2vec2-frame-cls": ("Wav2Vec2ForAudioFrameClassification", "Wav2Vec2Config", W2V, waves),
    "wav2vec2-xvector": (
        "Wav2Vec2ForXVector",
        "Wav2Vec2Config",
        dict(W2V, tdnn_dim=(16, 16), tdnn_kernel=(3, 1), tdnn_dilation=(1, 1), xvector_output_dim=8),
        waves,
    ),
    "wav2vec2-stable-layer-norm": (
        "Wav2Vec2ForCTC",
        "Wav2Vec2Config",
        dict(W2V, do_stable_layer_norm=True, feat_extract_norm="layer"),
        waves,
    ),
    "wav2vec2-adapter": (
        "Wav2Vec2ForCTC",
        "Wav2Vec2Config",
        dict(W2V, add_adapter=True, output_hidden_size=32, adapter_stride=2, num_adapter_layers=1),
        waves,
    ),
    "hubert": ("HubertForSequenceClassification", "HubertConfig", W2V, waves),
    "wavlm": ("WavLMForCTC", "WavLMConfig", dict(W2V, num_buckets=16, max_bucket_distance=40), waves),
    "data2vec-audio": (
        "Data2VecAudioForCTC",
        "Data2VecAudioConfig",
        dict(W2V, conv_pos_kernel_size=5, num_conv_pos_embeddings=5),
        waves,
    ),
    "unispeech": ("UniSpeechForCTC", "UniSpeechConfig", W2V, waves),
    "unispeech-sat": ("UniSpeechSatForSequenceClassification", "UniSpeechSatConfig", W2V, waves),
    "sew": ("SEWForCTC", "SEWConfig", dict(W2V, squeeze_factor=2), waves),
    "sew-d": (
        "SEWDForCTC",
        "SEWDConfig",
        dict(W2V, squeeze_factor=2, position_buckets=16, max_relative_positions=32),
        waves,
    ),
    "wav2vec2-conformer": (
        "Wav2Vec2ConformerForCTC",
        "Wav2Vec2ConformerConfig",
        dict(W2V, conv_depthwise_kernel_size=3),
        waves,
    ),
    "wav2vec2-bert": (
        "Wav2Vec2BertForCTC",
        "Wav2Vec2BertConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            feature_projection_input_dim=16,
            conv_depthwise_kernel_size=3,
            vocab_size=20,
        ),
        features((20, 16)),
    ),
    "audio-spectrogram-transformer": (
        "ASTForAudioClassification",
        "ASTConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            num_mel_bins=16,
            max_length=32,
            frequency_stride=8,
            time_stride=8,
            patch_size=8,
        ),
        features((32, 16), "input_values"),
    ),
    "whisper-audio-cls": ("WhisperForAudioClassification", "WhisperConfig", WHISPER, features((16, 32))),
    "speech2text": (
        "Speech2TextForConditionalGeneration",
        "Speech2TextConfig",
        dict(
            {k: v for k, v in WHISPER.items() if k not in ("num_mel_bins", "max_source_positions")},
            input_feat_per_channel=16,
            conv_channels=16,
            max_source_positions=64,
            max_target_positions=64,
        ),
        lambda n=1, seed=1: {
            "input_features": torch.randn(n, 24, 16, generator=gen(seed)),
            "decoder_input_ids": torch.randint(3, 100, (n, 5), generator=gen(seed)),
        },
    ),
    "clap-audio": (
        "ClapAudioModelWithProjection",
        "ClapAudioConfig",
        dict(
            spec_size=64,
            patch_size=4,
            patch_embeds_hidden_size=16,
            depths=[1, 1],
            num_attention_heads=[2, 4],
            window_size=4,
            num_mel_bins=16,
            hidden_size=32,
            projection_dim=16,
            enable_fusion=False,
        ),
        features((1, 64, 16)),
    ),
}
TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
TEXT = dict(TOWER, vocab_size=100, max_position_embeddings=16)
VISION = dict(TOWER, image_size=32, patch_size=8)


def text_and_image(n: int = 1, seed: int = 1) -> dict:
    return {
        "input_ids": torch.randint(3, 100, (n, 8), generator=gen(seed)),
        "pixel_values": torch.randn(n, 3, 32, 32, generator=gen(seed)),
    }


def image_to_text(n: int = 1, seed: int = 1) -> dict:
    return {
        "pixel_values": torch.randn(n, 3, 32, 32, generator=gen(seed)),
        "decoder_input_ids": torch.randint(3, 100, (n, 5), generator=gen(seed)),
    }


def vision_encoder_decoder():
    enc = T.ViTConfig(**VISION)
    dec = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, add_cross_attention=True)
    config = T.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.decoder_start_token_id, config.pad_token_id = 1, 0
    return config


#: multimodal and time-series families: (model class, config builder, inputs(n, seed))
OTHERS = {
    "siglip": ("SiglipModel", lambda: T.SiglipConfig(text_config=TEXT, vision_config=VISION), text_and_image),
    "owlvit": (
        "OwlViTForObjectDetection",
        lambda: T.OwlViTConfig(text_config=TEXT, vision_config=VISION, projection_dim=32),
        text_and_image,
    ),
    "blip-image-text-retrieval": (
        "BlipForImageTextRetrieval",
        lambda: T.BlipConfig(
            text_config=dict(TEXT, encoder_hidden_size=32),
            vision_config=VISION,
            projection_dim=16,
            image_text_hidden_size=16,
        ),
        text_and_image,
    ),
    "vision-encoder-decoder": ("VisionEncoderDecoderModel", vision_encoder_decoder, image_to_text),
    "patchtst": (
        "PatchTSTForPrediction",
        lambda: T.PatchTSTConfig(
            num_input_channels=3,
            context_length=32,
            patch_length=8,
            patch_stride=8,
            prediction_length=8,
            d_model=32,
            num_attention_heads=4,
            num_hidden_layers=2,
            ffn_dim=48,
        ),
        features((32, 3), "past_values"),
    ),
    "patchtsmixer": (
        "PatchTSMixerForPrediction",
        lambda: T.PatchTSMixerConfig(
            num_input_channels=3,
            context_length=32,
            patch_length=8,
            patch_stride=8,
            prediction_length=8,
            d_model=16,
            num_layers=2,
        ),
        features((32, 3), "past_values"),
    ),
}
FAST = ["wav2vec2-ctc", "audio-spectrogram-transformer", "whisper-audio-cls"]


def build(name: str):
    if name in OTHERS:
        cls, make_config, inputs = OTHERS[name]
        if not hasattr(T, cls):
            pytest.skip(f"transformers {T.__version__} has no {cls}")
        torch.manual_seed(0)
        return getattr(T, cls)(make_config()).eval(), inputs
    cls, config, keys, inputs = FAMILIES[name]
    if not hasattr(T, cls):
        pytest.skip(f"transformers {T.__version__} has no {cls}")
    torch.manual_seed(0)
    return getattr(T, cls)(getattr(T, config)(**keys)).eval(), inputs


def floats(model, x) -> list[torch.Tensor]:
    return [t for t in run_model(model, x) if t.is_floating_point()]


def train_step(model: nn.Module, x: dict) -> None:
    """One training-mode forward and backward (the first step of recovery or fine-tuning)."""
    model.train()
    out = model(**x)
    leaf = out.logits if getattr(out, "logits", None) is not None else out[0]
    leaf.float().pow(2).mean().backward()
    model.eval()


def check_family(name: str, tmp_path) -> float:
    model, inputs = build(name)
    x = inputs()
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    pruner.collect_activations([inputs(2, seed) for seed in (2, 3)], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "this model's config can describe none of its prunable widths"
        small = pruner.prune()
    model.save_pretrained(tmp_path / "original")
    save_pruned(tmp_path / "out", small, pruner.history, spec=f"hf:{tmp_path / 'original'}")
    again = load_pruned(tmp_path / "out").eval()

    before, after = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in small.parameters())
    assert after < 0.95 * before, f"{name}: {before} -> {after} parameters"
    want, got, reloaded = floats(model, x), floats(small, x), floats(again, x)
    assert [t.shape for t in got] == [t.shape for t in want]
    assert len(reloaded) == len(got)
    for a, b in zip(got, reloaded, strict=True):  # float rounding apart (OWL-ViT's reload: 2 ulp at 13.5)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    train_step(small, inputs(2, 5))
    assert all(p.grad is None or p.grad.shape == p.shape for p in small.parameters())
    return after / before


@pytest.mark.parametrize("name", FAST)
def test_a_speech_or_audio_model_prunes_by_default_reloads_and_trains(name, tmp_path):
    check_family(name, tmp_path)


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(set(FAMILIES) - set(FAST)) + sorted(OTHERS))
def test_every_speech_audio_multimodal_and_time_series_family_prunes_reloads_and_trains(name, tmp_path):
    check_family(name, tmp_path)


def test_the_masked_time_step_vector_prunes_with_the_hidden_width():
    model, inputs = build("wav2vec2-ctc")
    hidden = model.config.hidden_size
    pruner = StructuredPruner(model, inputs(), pruning_ratio=0.5)
    pruner.collect_activations([inputs(2, 2)], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = pruner.prune()
    kept = small.wav2vec2.encoder.layers[0].attention.k_proj.in_features  # the residual width kept
    assert kept < hidden
    assert small.wav2vec2.masked_spec_embed.shape == (kept,)
    assert model.wav2vec2.masked_spec_embed.shape == (hidden,)  # the user's model is untouched
    assert not model.training and not small.training


class TrainOnlyVector(nn.Module):
    """A model with a parameter only its training forward reads: a learned vector written
    over every other position (the shape of wav2vec2's SpecAugment), beside a path that
    always runs."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 16)
        self.fill = nn.Parameter(torch.randn(16))
        self.down = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        if self.training:
            mask = torch.zeros(h.shape[:-1], dtype=torch.bool)
            mask[..., ::2] = True
            h = h.clone()
            h[mask] = self.fill
        return self.down(h)


def test_a_parameter_read_only_in_training_shrinks_with_the_channels_it_is_written_over():
    torch.manual_seed(0)
    model = TrainOnlyVector().eval()
    x = torch.randn(2, 5, 6)
    small = StructuredPruner(model, (x,), importance="magnitude", pruning_ratio=0.5).prune()
    assert small.up.out_features == 8 and small.down.in_features == 8
    assert small.fill.shape == (8,)
    # the 16 -> 8 hidden units: up 6*8+8, fill 8, down 8*3+3
    assert sum(p.numel() for p in small.parameters()) == 56 + 8 + 27
    small.train()
    out = small(x)
    assert out.shape == (2, 5, 3)
    out.sum().backward()
    assert small.fill.grad.shape == (8,)
    assert model.fill.shape == (16,) and not model.training


# -- data files of the forward's own inputs ----------------------------------------------


def cli_job(model, data: dict, tmp_path, *extra: str) -> tuple[int, dict]:
    from cleanai_core.cli import main

    model.save_pretrained(tmp_path / "m")
    torch.save(data, tmp_path / "d.pt")
    rc = main(["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.pt"), "--out",
               str(tmp_path / "o"), "--latency-repeats", "1", *extra])  # fmt: skip
    report = tmp_path / "o" / "report.json"
    return rc, json.loads(report.read_text()) if report.exists() else {}


def test_a_data_file_of_the_models_own_audio_inputs_and_labels_prunes_and_is_scored(tmp_path):
    """``{"input_values", "labels"}``, what a feature extractor returns, saved as it is:
    refused before session 21 ("holds a dict with keys [...]; expected keys 'x' and 'y'")."""
    model, _ = build("wav2vec2-seq-cls")
    g = gen(0)
    data = {"input_values": torch.randn(24, 1600, generator=g), "labels": torch.randint(0, 2, (24,), generator=g)}
    rc, report = cli_job(model, data, tmp_path)
    assert rc == 0, report
    assert report["input_shape"] == {"input_values": [1, 1600]}
    assert report["params_after"] < report["params_before"] == sum(p.numel() for p in model.parameters())
    assert report["evaluation_samples"] + report["calibration_samples"] == 24
    assert 0.0 <= report["accuracy_before"] <= 1.0 and 0.0 <= report["accuracy_after"] <= 1.0
    assert load_pruned(tmp_path / "o").wav2vec2.masked_spec_embed.numel() < model.config.hidden_size


@pytest.mark.parametrize(
    "data, named",
    [
        ({"input_values": torch.randn(8, 1600), "speaker": torch.zeros(8)}, ["'speaker'", "input_values"]),
        ({"input_values": torch.randint(0, 9, (8, 1600))}, ["input_values must be a floating tensor"]),
        ({"input_values": torch.randn(8, 1600), "labels": torch.zeros(5, dtype=torch.long)}, ["labels has 5 rows"]),
    ],
    ids=["a key the forward does not take", "integer audio", "labels of another length"],
)
def test_a_bad_data_file_of_the_models_own_inputs_is_refused_by_name(data, named, tmp_path, capsys):
    model, _ = build("wav2vec2-seq-cls")
    rc, report = cli_job(model, data, tmp_path)
    err = capsys.readouterr().err
    assert rc != 0 and report == {}
    for part in named:
        assert part in err, err
    assert not (tmp_path / "o").exists()


def test_pixels_beside_token_ids_are_read_for_a_text_and_image_model(tmp_path):
    """SigLIP reads token ids and pixels: ``pixel_values`` was refused as a per-token input
    ("must be integers shaped like input_ids")."""
    model, inputs = build("siglip")
    data = {k: torch.cat([v, v]) for k, v in inputs(12, 7).items()}
    rc, report = cli_job(model, data, tmp_path)
    assert rc == 0, report
    assert set(report["input_shape"]) == {"input_ids", "pixel_values"}
    assert report["params_after"] < report["params_before"]


def test_a_ctc_recogniser_is_scored_by_the_token_error_rate_of_greedy_decoding(tmp_path):
    """Wav2Vec2ForCTC's labels are transcripts (N, L), shorter than its frames: the job
    failed on the held-out part ("Expected input batch_size (936) to match target batch_size
    (60)"), scoring them as next tokens."""
    import functools
    import itertools

    from cleanai_plugins.io.hf import cleanai_evaluate

    model, _ = build("wav2vec2-ctc")
    g = gen(0)
    labels = torch.randint(1, 20, (24, 6), generator=g)
    labels[:, 4:] = -100
    data = {"input_values": torch.randn(24, 1600, generator=g), "labels": labels}

    # by hand: best token per frame, repeats merged, the blank (pad_token_id 0) dropped, then Levenshtein
    @functools.cache
    def dist(a: tuple, b: tuple) -> int:
        if not a or not b:
            return len(a) + len(b)
        return min(dist(a[1:], b) + 1, dist(a, b[1:]) + 1, dist(a[1:], b[1:]) + (a[0] != b[0]))

    with torch.no_grad():
        best = model(input_values=data["input_values"][:4]).logits.argmax(-1)
    said = [tuple(k for k, _ in itertools.groupby(row.tolist()) if k != 0) for row in best]
    refs = [tuple(t for t in row.tolist() if t != -100) for row in labels[:4]]
    want = sum(dist(s, r) for s, r in zip(said, refs, strict=True)) / sum(map(len, refs))
    got = cleanai_evaluate(model, [{"input_values": data["input_values"][:4], "labels": labels[:4]}], "cpu")
    assert got["error_rate"] == pytest.approx(want) and got["evaluated"] == 4 and got["tokens"] == 16

    rc, report = cli_job(model, data, tmp_path)
    assert rc == 0, report
    assert report["error_rate_before"] >= 0 and report["error_rate_after"] >= 0
    assert report["accuracy_before"] is None and "token error rate" in report["accuracy_note"]
    assert "Token error rate (held-out)" in (tmp_path / "o" / "report.md").read_text()


@pytest.mark.parametrize("with_labels", [True, False], ids=["transcripts", "audio only"])
def test_a_speech_encoder_decoder_reads_audio_with_or_without_transcripts(with_labels, tmp_path):
    """Whisper's forward needs decoder inputs: the job failed on the first sample ("You cannot
    specify both decoder_input_ids and decoder_inputs_embeds at the same time"). Transcripts
    become the decoder's inputs shifted right (and the perplexity's targets); without them
    the decoder reads its start token."""
    config = T.WhisperConfig(**WHISPER, decoder_start_token_id=1, pad_token_id=0, max_target_positions=32)
    torch.manual_seed(0)
    model = T.WhisperForConditionalGeneration(config).eval()
    g = gen(0)
    data = {"input_features": torch.randn(24, 16, 32, generator=g)}
    if with_labels:
        data["labels"] = torch.randint(3, 100, (24, 6), generator=g)
    rc, report = cli_job(model, data, tmp_path)
    assert rc == 0, report
    assert report["params_after"] < report["params_before"]
    assert report["input_shape"]["decoder_input_ids"] == [1, 6 if with_labels else 1]
    if with_labels:  # a random 100-token decoder: about 100
        assert 50 < report["perplexity_before"] < 200 and 50 < report["perplexity_after"] < 200
    else:
        assert report["perplexity_before"] is None and report["accuracy_note"] == "the data has no labels"


def test_recovery_of_a_ctc_recogniser_trains_on_its_transcripts():
    """``recover()`` read CTC transcripts as per-frame tags and failed on the first held-out
    batch (``IndexError: The shape of the mask [5] at index 0 does not match ... [78, 20]``).
    Now the task is ``"ctc"``: KL over the frames, the CTC loss of the transcripts, the held-out
    token error rate (lower is better)."""
    import torch.nn.functional as F

    from cleanai_core.recovery import distillation_loss, recover
    from cleanai_plugins.io.text import TextItems

    model, _ = build("wav2vec2-ctc")
    g = gen(0)
    audio = torch.randn(16, 1600, generator=g)
    labels = torch.randint(1, 20, (16, 6), generator=g)
    labels[::2, 4:] = -100
    # the loss without a teacher is the CTC loss of each row's own transcript (blank = pad_token_id 0)
    with torch.no_grad():
        logits = model(input_values=audio[:4]).logits
    rows = [row[row != -100] for row in labels[:4]]
    want = F.ctc_loss(
        F.log_softmax(logits, -1).transpose(0, 1),
        torch.cat(rows),
        torch.full((4,), logits.shape[1]),
        torch.tensor([len(r) for r in rows]),
        blank=0,
        zero_infinity=True,
    )
    got = distillation_loss(logits, None, labels[:4], task="ctc")
    torch.testing.assert_close(got, want)
    too_long = torch.randint(1, 20, (4, logits.shape[1] + 1), generator=g)
    with pytest.raises(Exception, match="one token per frame"):
        distillation_loss(logits, None, too_long, task="ctc")

    small = StructuredPruner(model, {"input_values": audio[:1]}, importance="magnitude", pruning_ratio=0.5).prune()
    data = TextItems({"input_values": audio, "labels": labels})  # dict items, as the command line reads them
    recovered, result = recover(small, model, data, epochs=2, batch_size=4, val_fraction=0.25, progress=False)
    assert result.metric == "error_rate" and not result.higher_is_better
    assert 0 <= result.best <= result.initial and len(result.history) == result.epochs
    assert sum(p.numel() for p in recovered.parameters()) == sum(p.numel() for p in small.parameters())


@pytest.mark.parametrize("name", ["wav2vec2-ctc", "whisper-audio-cls", "audio-spectrogram-transformer"])
def test_explain_traces_a_speech_model_with_the_input_its_config_describes(name, tmp_path, capsys):
    """``cleanai explain --model hf:<folder>`` traced every model that is not a text model
    with a (1, 3, 224, 224) image, and refused speech models ("Expected 2D (unbatched) or 3D
    (batched) input to conv1d, but got input of size: [1, 1, 3, 224, 224]")."""
    from cleanai_core.cli import main

    model, _ = build(name)
    model.save_pretrained(tmp_path / "m")
    assert main(["explain", "--model", f"hf:{tmp_path / 'm'}"]) == 0
    out = capsys.readouterr().out
    assert "prunable):" in out and "frozen: model output" in out


def test_explain_traces_an_image_model_at_its_configs_image_size(tmp_path, capsys):
    from cleanai_core.cli import main

    torch.manual_seed(0)
    model = T.ViTForImageClassification(T.ViTConfig(**VISION, num_labels=3)).eval()  # 32 px, not 224
    model.save_pretrained(tmp_path / "m")
    assert main(["explain", "--model", f"hf:{tmp_path / 'm'}"]) == 0
    assert "vit.layers.1.mlp.fc2:in(in)" in capsys.readouterr().out


class WritesRows(nn.Module):
    """``h[rows] = values`` through position indices, with values of one width (``fill``)
    that broadcast over the channels, or as wide as them but fresh (``fresh``)."""

    def __init__(self, fresh: bool) -> None:
        super().__init__()
        self.up, self.down, self.fresh = nn.Linear(4, 8), nn.Linear(8, 2), fresh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x).clone()
        rows = torch.tensor([0, 2])
        h[rows] = torch.ones(2, x.shape[1], 8) if self.fresh else torch.full((1,), 0.5)
        return self.down(h)


def test_rows_written_with_a_broadcast_value_prune_and_a_fresh_full_width_write_freezes():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 4)
    small = StructuredPruner(WritesRows(fresh=False).eval(), (x,), importance="magnitude", pruning_ratio=0.5).prune()
    assert small.up.out_features == 4 and small(x).shape == (4, 3, 2)
    with pytest.raises(Exception, match="writes values that cannot shrink with the channels"):
        StructuredPruner(WritesRows(fresh=True).eval(), (x,), importance="magnitude", pruning_ratio=0.5).prune()


def test_a_packed_data_file_of_the_models_own_inputs_is_refused_before_it_is_inflated(tmp_path, capsys):
    """The keyword reader goes through the same guard as the other ``.pt`` readers (faults11's
    zip-bomb check): a small file of deflated zeros is not unpacked."""
    import zipfile

    model, _ = build("wav2vec2-seq-cls")
    torch.save(
        {"input_values": torch.zeros(2**13, 1600), "labels": torch.zeros(2**13, dtype=torch.long)}, tmp_path / "z.pt"
    )
    with zipfile.ZipFile(tmp_path / "z.pt") as z, zipfile.ZipFile(tmp_path / "d.pt", "w", zipfile.ZIP_DEFLATED) as out:
        for info in z.infolist():
            out.writestr(info.filename, z.read(info.filename))
    assert (tmp_path / "d.pt").stat().st_size < 2**20 < (tmp_path / "z.pt").stat().st_size
    from cleanai_core.cli import main

    model.save_pretrained(tmp_path / "m")
    rc = main(
        ["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.pt"), "--out", str(tmp_path / "o")]
    )
    assert rc == 2 and "is a zip archive of" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
