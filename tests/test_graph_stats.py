"""benchmarks.graph_stats: what a GPT-2 forward+backward becomes, without running it."""

from benchmarks.graph_stats import main


def test_tiny_gpt2_counts(tmp_path, capsys):
    s = main(["--config", "tiny", "--block-size", "16", "--json", str(tmp_path / "s.json")])
    assert s["attention_kernels"] == 4  # 2 layers: one flash forward and one backward each
    assert 0 < s["kernels"] < s["eager_ops"] and s["fused_bytes"] < s["eager_bytes"]
    assert "Triton kernels" in capsys.readouterr().out and (tmp_path / "s.json").exists()
