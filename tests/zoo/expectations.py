"""What the zoo fails today, in one table: case -> {check: why}. Checks not listed must pass.

The checks ("values", "replay", "fusion") are the three tests in test_zoo.py. Each entry is a strict
xfail, so when a fix lands the check passes, the xfail turns into a failure, and the line here is to
be deleted. `python -m tests.zoo.report [case...]` prints what each case fails now. Measured with
transformers 5.24 and torch 2.13 (CPU, Triton's interpreter); issue 10 names each cause.
"""

# values: crashes and wrong results
SDPA_MASK_BACKWARD = ("crash in backward: SDPA with attn_mask, the backward lowering drops the mask and passes "
                      "the 4-D mask where the log-sum-exp goes (RuntimeError: expand(FloatTensor[3, H, 8, 8], "
                      "size=[3, H, 8]) at flash_attention.py:284)")
SDPA_GQA_FORWARD = ("crash in forward: SDPA enable_gqa=True (RuntimeError: Attempting to broadcast a dimension "
                    "of length 2 at -1: [3, 2] vs [3, 4])")
LSTM = ("nn.LSTM(batch_first=True) forward is wrong (logits off by up to 0.05; batch_first=False is exact) and "
        "its backward crashes (IndexError at reference.py:267, indexing mkldnn_rnn_layer's backward outputs)")

# replay: a value read while tracing switches the module to re-tracing every call
PAD_TOKEN_READ = ("re-traces every call: transformers' warn_if_padding_and_no_attention_mask reads "
                  "`pad_token_id in input_ids[:, [-1, 0]]` while tracing (modeling_utils.py:4701)")
PADDING_ALL_READ = "re-traces every call: masking_utils reads padding_mask.all() while tracing (masking_utils.py:354)"
SDPA_SKIP_READ = ("re-traces every call: masking_utils' SDPA mask skip reads fast_all(padding_mask) while tracing "
                  "(masking_utils.py:292)")
NOT_REACHED = "not reached: the values check crashes first"

# fusion: attention not recognised, needless externs
NO_FLASH_ADDITIVE_MASK = "no flash attention: explicit softmax(QK^T * scale + additive float mask) V is not matched"
NO_FLASH_GQA = ("no flash attention: explicit attention with repeat_kv (GQA) and an additive causal mask is not "
                "matched; 18 aten.to.dtype f32 -> f32 externs in the backward")
NORM_EXTERNS = "BatchNorm in training runs aten.to.dtype (f32 -> f32) and aten.flatten.using_ints as externs"
CRASHED = "crashes first (see values); its SDPA call with a mask does not take the flash path either"

EXPECTED_FAILURES: dict[str, dict[str, str]] = {
    "gpt2-eager-nomask": {"replay": PAD_TOKEN_READ, "fusion": NO_FLASH_ADDITIVE_MASK},
    "gpt2-eager-mask": {"fusion": NO_FLASH_ADDITIVE_MASK},
    "gpt2-sdpa-nomask": {"replay": PAD_TOKEN_READ},
    "gpt2-sdpa-mask": {"values": SDPA_MASK_BACKWARD, "replay": NOT_REACHED, "fusion": CRASHED},
    "bert-eager-mask": {"replay": PADDING_ALL_READ, "fusion": NO_FLASH_ADDITIVE_MASK},
    "bert-sdpa-mask": {"values": SDPA_MASK_BACKWARD, "replay": NOT_REACHED, "fusion": CRASHED},
    "llama-eager-nomask": {"fusion": NO_FLASH_GQA},
    "llama-eager-mask": {"fusion": NO_FLASH_GQA},
    "llama-sdpa-nomask": {"values": SDPA_GQA_FORWARD, "replay": NOT_REACHED, "fusion": CRASHED},
    "llama-sdpa-mask": {"values": SDPA_MASK_BACKWARD, "replay": NOT_REACHED, "fusion": CRASHED},
    "bart-eager-mask": {"replay": PADDING_ALL_READ, "fusion": NO_FLASH_ADDITIVE_MASK},
    "bart-sdpa-nomask": {"replay": SDPA_SKIP_READ},
    "bart-sdpa-mask": {"values": SDPA_MASK_BACKWARD, "replay": NOT_REACHED, "fusion": CRASHED},
    "resnet": {"fusion": NORM_EXTERNS + " (195 + 36 in 3 steps)"},
    "nn-lstm": {"values": LSTM, "replay": NOT_REACHED, "fusion": "crashes first (see values)"},
    "nn-mha-padmask": {"values": SDPA_MASK_BACKWARD, "replay": NOT_REACHED, "fusion": CRASHED},
    "nn-encoder-padmask": {"values": SDPA_MASK_BACKWARD, "replay": NOT_REACHED, "fusion": CRASHED},
    "nn-conv-bn-pool": {"fusion": NORM_EXTERNS + " (66 + 12 in 3 steps)"},
}
