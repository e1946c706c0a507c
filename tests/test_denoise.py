"""examples/denoise.py at a tiny size: the four models train, the table and the figure come out."""
import pytest

from examples import denoise


@pytest.mark.parametrize("bound", ["0.9", "none"])
def test_denoise_example_runs(tmp_path, bound):
    out = tmp_path / "denoise.png"
    results = denoise.main(["--steps", "4", "--batch", "4", "--size", "16", "--width", "4", "--n-test", "4",
                            "--weight-bound", bound, "--out", str(out)])
    assert out.stat().st_size > 0
    names = list(results)
    assert [n.split(" (")[0] for n in names] == ["diagonal", "diagonal + rank 4", "structured", "structured + rank 4"]
    for r in results.values():
        assert 0 <= r["in_range"] <= 1 and r["mse"] > 0 and r["nll"] == r["nll"]
        assert 0 < r["within1"] <= r["within2"] <= 1
    if bound == "0.9":
        for name in names[2:]:
            assert results[name]["ratio"] < 0.9       # from_head's bound holds on every test crop


def test_denoise_without_modes(tmp_path):
    results = denoise.main(["--steps", "2", "--batch", "2", "--size", "8", "--width", "2", "--n-test", "2",
                            "--rank", "0", "--out", str(tmp_path / "d.png")])
    assert [n.split(" (")[0] for n in results] == ["diagonal", "structured"]
