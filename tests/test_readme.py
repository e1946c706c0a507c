"""The README's recipes run verbatim (issue #40): every ```python block, in order, in one namespace
(a later block may use what an earlier one made, as a reader typing them in would), with the shapes
and values its comments promise."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_fits_200_lines():
    """What does not fit goes to docs/guide.md (issue #40)."""
    assert len(README.read_text().splitlines()) <= 200


def test_readme_blocks_run_verbatim():
    blocks = python_blocks()
    assert len(blocks) >= 4, "the quick start, the recipes, supn_base's port and the volume"
    torch.manual_seed(0)
    namespace = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as err:                         # name the block that failed
            raise AssertionError(f"README.md python block {i} raised {type(err).__name__}: {err}\n{block}") from err
        if i == 0:                                       # the quick start
            B, C, H, W = namespace["x"].shape
            assert namespace["samples"].shape == (4, B, C, H, W)
            assert namespace["sigma"].shape == (B, C, H, W) and bool((namespace["sigma"] > 0).all())
            assert namespace["decoder"].weight.grad is not None
        if "hole_sigma" in namespace and i == 1:         # the recipes
            post, mask, x = namespace["post"], namespace["mask"], namespace["x"]
            assert torch.equal(namespace["filled"][mask], x[mask])
            assert namespace["draws"].shape == (4, *x.shape)
            assert namespace["hole_sigma"].numel() == int((~mask).sum()) and bool((namespace["hole_sigma"] > 0).all())
            assert 0 <= float(namespace["inside"]) <= 1
