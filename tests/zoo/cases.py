"""The zoo: models nobody here wrote, from tiny random configs (no network, no downloads).

Sizes are the smallest that keep each model's structure (two layers where layers repeat, several
heads, grouped-query attention with fewer key/value heads), so a case runs in seconds with Triton's
interpreter on a CPU. Dropout is 0 everywhere: eager and compiled draw different random numbers.
Batches are odd-sized where it costs nothing; padded rows have their last tokens masked out.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

from tests.zoo.harness import Case

transformers.logging.set_verbosity_error()  # tiny configs trip warnings about token ids and vocab

VOCAB, B, T = 64, 3, 8
HF_COMMON = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _tokens(masked: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(input_ids, attention_mask or None, labels): rows 1 and 2 padded by 3 and 5 tokens."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (B, T), generator=gen)
    if not masked:
        return ids, None, ids.clone()
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0
    mask[2, -5:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _lm_inputs(masked: bool):
    def inputs():
        ids, mask, labels = _tokens(masked)
        kw = {"input_ids": ids, "labels": labels}
        if mask is not None:
            kw["attention_mask"] = mask
        return (), kw
    return inputs


def _classifier_inputs(masked: bool):
    def inputs():
        ids, mask, _ = _tokens(masked)
        kw = {"input_ids": ids, "labels": torch.tensor([0, 1, 1])}
        if mask is not None:
            kw["attention_mask"] = mask
        return (), kw
    return inputs


def _image_inputs(channels: int, size: int, classes: int):
    def inputs():
        gen = torch.Generator().manual_seed(1)
        return (), {"pixel_values": torch.randn(B, channels, size, size, generator=gen),
                    "labels": torch.randint(0, classes, (B,), generator=gen)}
    return inputs


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------


def gpt2(attn: str):
    cfg = transformers.GPT2Config(n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn, **HF_COMMON)
    return transformers.GPT2LMHeadModel(cfg)


def bert(attn: str):
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=2, attn_implementation=attn,
                                  **HF_COMMON)
    return transformers.BertForSequenceClassification(cfg)


def llama(attn: str):
    # 4 query heads share 2 key/value heads (GQA); RoPE, RMSNorm and a SwiGLU MLP are Llama's own
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                   attention_dropout=0.0, attn_implementation=attn, **HF_COMMON)
    return transformers.LlamaForCausalLM(cfg)


def bart(attn: str):
    cfg = transformers.BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                  max_position_embeddings=16, dropout=0.0, attention_dropout=0.0,
                                  activation_dropout=0.0, decoder_start_token_id=2, forced_eos_token_id=None,
                                  attn_implementation=attn, **HF_COMMON)
    return transformers.BartForConditionalGeneration(cfg)


def vit(attn: str):
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, num_labels=3, attn_implementation=attn)
    return transformers.ViTForImageClassification(cfg)


def resnet():
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="basic", num_labels=3)
    return transformers.ResNetForImageClassification(cfg)


# ---------------------------------------------------------------------------------------------
# torch.nn, each with a head and its loss inside forward: (logits, loss)
# ---------------------------------------------------------------------------------------------


class RNNClassifier(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]):
        super().__init__()
        self.rnn = cell(input_size=6, hidden_size=8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x, y):
        out, _ = self.rnn(x)
        logits = self.head(out[:, -1])
        return logits, F.cross_entropy(logits, y)


class SelfAttention(nn.Module):
    """nn.MultiheadAttention over a padded batch: padded keys are masked out by key_padding_mask."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x, pad, y):
        out, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)
        logits = self.head(out.mean(1))
        return logits, F.cross_entropy(logits, y)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x, pad, y):
        out = self.encoder(x, src_key_padding_mask=pad)
        logits = self.head(out.mean(1))
        return logits, F.cross_entropy(logits, y)


class ConvNet(nn.Module):
    # no conv bias before a BatchNorm (as in every real network): its true gradient is 0, and Adam
    # would turn the rounding noise left in its place into full-size steps on both sides
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(8, 3)

    def forward(self, x, y):
        logits = self.head(torch.flatten(self.features(x), 1))
        return logits, F.cross_entropy(logits, y)


def _rnn_inputs():
    # a recurrence unrolls into kernels per time step: 5 steps keep it to seconds in the interpreter
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(B, 5, 6, generator=gen), torch.randint(0, 3, (B,), generator=gen)), {}


def _padded_sequence_inputs():
    gen = torch.Generator().manual_seed(1)
    pad = torch.zeros(B, T, dtype=torch.bool)  # True: this key is padding, attend to it nowhere
    pad[1, -3:] = True
    pad[2, -5:] = True
    return (torch.randn(B, T, 16, generator=gen), pad, torch.randint(0, 3, (B,), generator=gen)), {}


def _conv_inputs():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(B, 3, 8, 8, generator=gen), torch.randint(0, 3, (B,), generator=gen)), {}


# ---------------------------------------------------------------------------------------------
# the table of cases, by name (the test ids and the keys of expectations.py)
# ---------------------------------------------------------------------------------------------


def _hf_text_cases() -> list[Case]:
    out = []
    for name, build, inputs in (("gpt2", gpt2, _lm_inputs), ("bert", bert, _classifier_inputs),
                                ("llama", llama, _lm_inputs), ("bart", bart, _lm_inputs)):
        for attn in ("eager", "sdpa"):
            for masked in (False, True):
                out.append(Case(f"{name}-{attn}-{'mask' if masked else 'nomask'}",
                                lambda b=build, a=attn: b(a), inputs(masked), attention=True))
    return out


CASES: dict[str, Case] = {c.name: c for c in [
    *_hf_text_cases(),
    Case("vit-eager", lambda: vit("eager"), _image_inputs(3, 8, 3), attention=True),
    Case("vit-sdpa", lambda: vit("sdpa"), _image_inputs(3, 8, 3), attention=True),
    Case("resnet", resnet, _image_inputs(3, 16, 3)),
    Case("nn-lstm", lambda: RNNClassifier(nn.LSTM), _rnn_inputs),
    Case("nn-gru", lambda: RNNClassifier(nn.GRU), _rnn_inputs),
    Case("nn-mha-padmask", SelfAttention, _padded_sequence_inputs, attention=True),
    Case("nn-encoder-padmask", Encoder, _padded_sequence_inputs, attention=True),
    Case("nn-conv-bn-pool", ConvNet, _conv_inputs),
]}
