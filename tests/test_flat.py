import numpy as np
import pytest

from engine.flat import ALIGN, FlatLayout


def _layout():
    return FlatLayout([("fc.bias", (10,), False), ("fc.weight", (10, 7), True),
                       ("bn1.weight", (5,), False), ("conv1.weight", (5, 3, 3, 2), True)])


def test_slots_are_aligned_disjoint_and_in_given_order():
    lay = _layout()
    assert [s.name for s in lay.slots] == ["fc.bias", "fc.weight", "bn1.weight", "conv1.weight"]
    prev_stop = 0
    for s in lay.slots:
        assert s.offset % ALIGN == 0 and s.offset >= prev_stop
        prev_stop = s.stop
    assert lay.total % ALIGN == 0 and lay.total >= prev_stop


def test_views_alias_the_flat_buffer():
    lay = _layout()
    buf = lay.alloc(np)
    views = lay.views(buf)
    rng = np.random.default_rng()
    w = rng.standard_normal((5, 3, 3, 2)).astype(np.float32)
    views["conv1.weight"][...] = w
    s = lay.by_name["conv1.weight"]
    np.testing.assert_array_equal(buf[s.offset:s.stop], w.ravel())
    assert np.shares_memory(lay.view(buf, "fc.weight"), buf)


def test_decay_mask_marks_only_decayed_slots():
    lay = _layout()
    mask = lay.decay_mask(np)
    assert mask.sum() == 70 + 90
    for s in lay.slots:
        assert np.all(mask[s.offset:s.stop] == (1 if s.decay else 0))


def test_signature_changes_with_shape_and_duplicate_names_refused():
    a = _layout()
    b = FlatLayout([("fc.bias", (11,), False)])
    assert a.signature() == _layout().signature() != b.signature()
    with pytest.raises(ValueError, match="duplicate"):
        FlatLayout([("x", (1,), True), ("x", (2,), True)])
