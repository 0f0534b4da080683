"""benchmarks.graph_stats: what a GPT-2 forward+backward becomes, without running it."""

from benchmarks.graph_stats import main


def test_tiny_gpt2_counts(tmp_path, capsys):
    s = main(["--config", "tiny", "--block-size", "16", "--json", str(tmp_path / "s.json")])
    for way in ("lazy", "compile"):
        w = s[way]
        assert w["flash_launches"] == 4  # 2 layers: one flash forward and one backward each
        assert 0 < w["launches"] < s["eager_ops"] and w["fused_bytes"] < s["eager_bytes"]
    assert "Triton kernels" in capsys.readouterr().out and (tmp_path / "s.json").exists()
