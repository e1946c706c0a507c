import pytest

from structlik import Stencil


def test_offsets_radius1_match_spec_order():
    assert Stencil(1).offsets == ((0, 1), (1, -1), (1, 0), (1, 1))


def test_offsets_radius2_match_spec_order():
    expected = [(0, 1), (0, 2)] + [(dy, dx) for dy in (1, 2) for dx in range(-2, 3)]
    assert Stencil(2).offsets == tuple(expected)


@pytest.mark.parametrize("radius,S", [(1, 4), (2, 12), (3, 24)])
def test_S_is_half_window(radius, S):
    n_f = 2 * radius + 1
    assert Stencil(radius).S == S == (n_f ** 2 - 1) // 2 == len(Stencil(radius))


def test_dilations_listed_in_given_order_without_duplicates():
    st = Stencil(2, (1, 2))
    first = Stencil(2).offsets
    assert st.offsets[:len(first)] == first
    # (0, 2), (2, -2), (2, 0), (2, 2) already appear under dilation 1
    second = [(0, 2), (0, 4)] + [(dy * 2, dx * 2) for dy in (1, 2) for dx in range(-2, 3)]
    assert st.offsets[len(first):] == tuple(o for o in second if o not in first)
    assert len(set(st.offsets)) == st.S


def test_dilation_order_matters():
    assert Stencil(1, (2, 1)).offsets[:4] == ((0, 2), (2, -2), (2, 0), (2, 2))


@pytest.mark.parametrize("stencil", [Stencil(1), Stencil(3), Stencil(1, (1, 2, 4)), Stencil(2, (1, 3))])
def test_offsets_point_forward_and_wavefront_slope_orders_them(stencil):
    a = stencil.wavefront_slope
    for dy, dx in stencil.offsets:
        assert dy > 0 or (dy == 0 and dx > 0)
        assert a * dy + dx >= 1


def test_equality_hash_repr():
    assert Stencil(2) == Stencil(2, (1,))
    assert hash(Stencil(2)) == hash(Stencil(2))
    assert Stencil(1) != Stencil(2)
    assert repr(Stencil(1, (1, 2))) == "Stencil(radius=1, dilations=(1, 2), S=8)"
    assert Stencil(1).flat_offsets == [0, 1, 1, -1, 1, 0, 1, 1]


@pytest.mark.parametrize("radius", [0, -1, 1.5, True, "2"])
def test_bad_radius(radius):
    with pytest.raises(ValueError, match="radius"):
        Stencil(radius)


@pytest.mark.parametrize("dilations", [(), (0,), (-1,), (1, 1), (1.0,), (2, 2, 3)])
def test_bad_dilations(dilations):
    with pytest.raises(ValueError, match="dilations"):
        Stencil(1, dilations)


def test_dilations_not_a_sequence():
    with pytest.raises(TypeError, match="dilations"):
        Stencil(1, 2)
