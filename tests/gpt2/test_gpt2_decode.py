"""Static key/value cache decoding (gpt2.decode): equal to the model without a cache, and through
lazygraph.compile one program for every new token, with eager's tokens and logits."""

import pytest
import torch
from torch.testing import assert_close

import lazygraph as lg
from gpt2.decode import CachedGPT, Decoder, sampler
from gpt2.model import GPT, GPTConfig
from gpt2.sample import main as sample_main


def _model(block_size: int = 32, **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(block_size=block_size, **overrides)).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Single-token steps are tiny ops: on a shared machine torch's thread pool only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)




@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_static_cache_equals_model_without_cache(attention):
    model = _model(attention=attention)
    idx = torch.randint(0, 256, (3, 13))  # odd batch, odd length below block_size
    with torch.no_grad():
        want, _ = model(idx)
        cached = CachedGPT(model, batch_size=3)
        assert_close(cached(idx, torch.arange(13)), want, rtol=1e-5, atol=1e-5)  # the whole prompt at once
        cached.reset()
        split = cached(idx[:, :6], torch.arange(6))  # a prompt, then one token per step
        steps = [cached(idx[:, t:t + 1], torch.tensor([t])) for t in range(6, 13)]
    assert_close(torch.cat([split, *steps], dim=1), want, rtol=1e-5, atol=1e-5)


def test_static_cache_rejects_what_it_cannot_hold():
    model = _model(block_size=8)
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        Decoder(model).generate(torch.zeros(1, 5, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="batch size 2"):
        CachedGPT(model, batch_size=1)(torch.zeros(2, 1, dtype=torch.long), torch.tensor([0]))


def test_decoder_equals_generate_without_cache():
    """The eager static-cache decoder samples what GPT.generate (no cache) samples, same seed."""
    model = _model()
    idx = torch.randint(0, 256, (1, 4))
    want = model.generate(idx, 12, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(3))
    got = Decoder(model).generate(idx, 12, sampler(0.8, 40, torch.Generator().manual_seed(3)))
    assert torch.equal(got, want)


def _decode_both(model: GPT, prompt: torch.Tensor, new_tokens: int):
    """Greedy decoding, eager and compiled; every step's logits of each."""
    logits = {"eager": [], "compiled": []}
    out = {}
    B = prompt.shape[0]
    for name, dec in (("eager", Decoder(model, B)), ("compiled", Decoder(model, B, compile=True))):
        out[name] = dec.generate(prompt, new_tokens, on_logits=lambda t, n=name: logits[n].append(t.clone()))
    return out, logits, dec


def test_compiled_decode_64_tokens_one_program(reference_backend):
    """64 new tokens: the compiled decode step is traced once and replayed (0 recompiles), and its
    greedy tokens are eager's. Reference backend: the compile machinery (guards, buffer updates)
    without Triton's interpreter, so it stays fast."""
    model = _model(block_size=80)
    prompt = torch.randint(0, 256, (1, 5))
    before = lg.stats()
    out, logits, dec = _decode_both(model, prompt, 64)
    after = lg.stats()
    assert out["compiled"].shape == (1, 69)
    assert torch.equal(out["compiled"], out["eager"])
    assert dec.timing.recompiles == 0 and dec.timing.steps == 62
    assert after["recompiles"] == before["recompiles"]  # neither the prompt's nor the step's module
    assert after["recompile_reasons"] == before["recompile_reasons"]
    assert dec.step._lg_count == 1  # one trace of the decode step for all 63 steps
    for t in (0, 1, 31, 63):
        assert_close(logits["compiled"][t], logits["eager"][t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention,batch", [("explicit", 1), ("sdpa", 2)])
def test_compiled_decode_step_fused_equals_eager(fused_backend, attention, batch):
    """The same through fused kernels (Triton's interpreter here): logits of every step close to
    eager's, tokens equal, no recompile after the first decode step."""
    model = _model(block_size=24, attention=attention)
    prompt = torch.randint(0, 256, (batch, 3))
    before = lg.stats()["recompiles"]
    out, logits, dec = _decode_both(model, prompt, 5)
    assert torch.equal(out["compiled"], out["eager"])
    assert dec.timing.recompiles == 0 and lg.stats()["recompiles"] == before
    assert dec.step._lg_count == 1
    for got, want in zip(logits["compiled"], logits["eager"], strict=True):
        assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_decode_64_tokens_fused(fused_backend):
    model = _model(block_size=80)
    prompt = torch.randint(0, 256, (1, 5))
    out, _, dec = _decode_both(model, prompt, 64)
    assert torch.equal(out["compiled"], out["eager"])
    assert dec.timing.recompiles == 0 and dec.step._lg_count == 1


def test_sample_compile_prints_both_rates(reference_backend, capsys):
    texts = sample_main(["--random", "--compile", "--greedy", "--max-new-tokens", "6", "--prompt", "ab",
                         "--num-samples", "2", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert len(texts) == 2 and texts[0] == texts[1]  # greedy: the seed does not matter
    assert printed.count("decode, tokens/s: eager") == 2
    assert "recompiles after the first token: 0; compiled tokens equal to eager" in printed


def test_sample_compile_rejects_what_the_cache_cannot_hold():
    with pytest.raises(SystemExit):
        sample_main(["--random", "--compile", "--max-new-tokens", "40", "--device", "cpu"])  # tiny: 32


def test_benchmark_decode_measures_both_side_by_side(reference_backend):
    from benchmarks.decode import measure

    r = measure("tiny", new_tokens=6, prompt_len=3, repeat=1)
    assert r["tokens_equal"] and r["recompiles_after_first_token"] == 0
    assert r["eager_tokens_per_s"] > 0 and r["compiled_tokens_per_s"] > 0


def test_benchmark_suite_decode_row_matches_float64(reference_backend):
    from benchmarks import harness, suite

    opts = harness.Options(repeat=1, warmup=0)
    rows = harness.run_case(suite.WORKLOADS["decode"], "small,T=5", torch.float32, torch.device("cpu"), opts,
                            backends=("eager", "lazygraph"))
    assert [r.status for r in rows] == ["ok", "ok"], [r.reason for r in rows]
    assert all(r.max_error < 1e-5 for r in rows)
    assert rows[1].extra["compiles"] == 1  # one program for every step of the cold and the warm call
