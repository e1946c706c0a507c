"""examples/denoise.py at a tiny size: both models train, the table and the figure come out."""
import pytest

from examples import denoise


@pytest.mark.parametrize("bound", ["0.9", "none"])
def test_denoise_example_runs(tmp_path, bound):
    out = tmp_path / "denoise.png"
    results = denoise.main(["--steps", "4", "--batch", "4", "--size", "16", "--width", "4", "--n-test", "4",
                            "--weight-bound", bound, "--out", str(out)])
    assert out.stat().st_size > 0
    (diag, diag_r), (struct, struct_r) = results.items()
    assert diag.startswith("diagonal") and struct.startswith("structured")
    for r in (diag_r, struct_r):
        assert 0 <= r["in_range"] <= 1 and r["mse"] > 0 and r["nll"] == r["nll"]
    if bound == "0.9":
        assert struct_r["ratio"] < 0.9       # from_head's bound holds on every test crop
