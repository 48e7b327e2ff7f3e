import numpy as np
import pytest

from stampray import preprocess


def notebook_normalize(image):
    """Direct per-image transcription of the course notebooks' normalize_image."""
    image = np.array(image, dtype=np.float64)
    per25, per50, per75 = np.percentile(image, [25, 50, 75])
    sigma_g = 0.7413 * (per75 - per25)
    image[image < (per50 - 2 * sigma_g)] = per50 - 2 * sigma_g
    image -= np.min(image)
    image /= np.sum(image)
    return image


def test_course_matches_the_notebook_formula_per_image_and_channel():
    rng = np.random.default_rng(3)
    batch = rng.normal(10, 3, size=(5, 3, 21, 21)).astype(np.float32)
    batch[0, 1, 10, 10] += 200  # a bright source
    out = preprocess.get("course")(batch)
    assert out.shape == batch.shape and out.dtype == np.float32
    for i in range(5):
        for c in range(3):
            np.testing.assert_allclose(out[i, c], notebook_normalize(batch[i, c]), rtol=1e-5, atol=1e-9)
            assert out[i, c].sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("value", [0.0, 5.0, -3.0])
def test_course_is_finite_on_degenerate_stamps(value):
    out = preprocess.get("course")(np.full((2, 1, 21, 21), value, np.float32))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, 1.0 / 441)


def test_standardize_and_none():
    x = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    np.testing.assert_array_equal(preprocess.get("none")(x), x)
    s = preprocess.get("standardize")(x)
    np.testing.assert_allclose(s.reshape(2, 4).mean(axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(s.reshape(2, 4).std(axis=1), 1, atol=1e-6)
    assert np.isfinite(preprocess.get("standardize")(np.ones((1, 1, 3, 3), np.float32))).all()


def test_course_scaled_is_course_times_the_pixel_count():
    x = np.random.default_rng(1).normal(size=(3, 2, 21, 21)).astype(np.float32)
    np.testing.assert_allclose(preprocess.get("course_scaled")(x), preprocess.get("course")(x) * 441, rtol=1e-6)
    np.testing.assert_allclose(preprocess.get("course_scaled")(np.zeros((1, 1, 4, 5), np.float32)), 1.0)


def _stamps(kind, n, c, h, w, rng):
    """NaN-free float32 stamps (n, c, h, w) of one kind: noise, a constant per stamp, heavy ties, a wide range."""
    shape = (n, c, h, w)
    if kind == "noise":
        x = rng.normal(10, 3, size=shape)
    elif kind == "constant":
        x = np.broadcast_to(rng.normal(size=(n, c, 1, 1)), shape)
    elif kind == "ties":
        x = rng.integers(-2, 3, size=shape)
    else:  # wide: magnitudes from 1e-30 to 1e30, both signs
        x = np.exp(rng.uniform(-69, 69, size=shape)) * rng.choice([-1.0, 1.0], size=shape)
    return np.ascontiguousarray(x, dtype=np.float32)


@pytest.mark.parametrize("kind", ["noise", "constant", "ties", "wide"])
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("h,w", [(21, 21), (20, 20), (64, 64), (7, 9), (1, 2), (1, 1)])
def test_quartiles_equal_numpy_percentile_bit_for_bit(kind, c, h, w):
    """Odd (441, 63, 1) and even (400, 4096, 2) pixel counts: every interpolation weight np.percentile uses
    (0, 0.25, 0.5, 0.75), each quartile exactly as numpy computes it."""
    rng = np.random.default_rng(h * 1000 + w * 10 + c)
    x = _stamps(kind, 6, c, h, w, rng)
    flat = x.reshape(-1, h * w)
    got = np.stack(preprocess._quartiles(flat))
    want = np.percentile(flat.astype(np.float64), [25, 50, 75], axis=1)
    assert got.dtype == np.float64 and np.array_equal(got, want)


def notebook_normalize_batch(x):
    """course_normalize step by step from np.percentile, vectorised, in the same float32/float64 steps."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w)
    p25, p50, p75 = np.percentile(flat.astype(np.float64), [25, 50, 75], axis=1)
    floor = (p50 - 2.0 * preprocess.SIGMA_G_COEFF * (p75 - p25)).astype(np.float32)
    clipped = np.maximum(flat, floor[:, None])
    clipped = clipped - clipped.min(axis=1, keepdims=True)
    total = clipped.sum(axis=1, dtype=np.float64, keepdims=True)
    scale = (1.0 / np.where(total <= 0, 1.0, total)).astype(np.float32)
    out = np.where(total <= 0, np.float32(1.0 / (h * w)), clipped * scale)
    return out.reshape(n, c, h, w)


@pytest.mark.parametrize("kind", ["noise", "constant", "ties", "wide"])
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("h,w", [(21, 21), (20, 20), (7, 9)])
def test_course_steps_equal_the_percentile_reference_bit_for_bit(kind, c, h, w):
    x = _stamps(kind, 8, c, h, w, np.random.default_rng(c * 100 + h))
    x[0] = 0.0  # an all-zero stamp among the others
    before = x.copy()
    want = notebook_normalize_batch(x)
    course = preprocess.get("course")(x)
    assert course.dtype == np.float32 and np.array_equal(course, want)
    assert np.array_equal(preprocess.get("course_scaled")(x), want * np.float32(h * w))
    assert np.array_equal(x, before)  # the input is left as it was


def test_unknown_step_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown preprocessing 'zscale'; known steps: course, course_scaled, none, standardize"):
        preprocess.get("zscale")


def test_preprocessing_needs_a_batch():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        preprocess.get("course")(np.zeros((21, 21)))


@pytest.mark.parametrize("step", ["course", "course_scaled"])
def test_a_stamp_that_overflows_comes_out_non_finite_without_a_warning(step):
    """Finite pixels near float32's limits overflow the normalisation: that stamp comes out non-finite (the
    callers set it aside with its reason), the others as alone, and numpy prints nothing into a job's log."""
    import warnings

    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 1, 21, 21)).astype(np.float32)
    x[1, 0, :10] = 3e38
    x[1, 0, 10:] = -3e38
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = preprocess.get(step)(x)
    assert [bool(np.isfinite(o).all()) for o in out] == [True, False, True]
    np.testing.assert_array_equal(out[[0, 2]], preprocess.get(step)(x[[0, 2]]))
