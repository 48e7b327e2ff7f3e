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


def test_quartiles_match_numpy_percentile_for_any_pixel_count():
    rng = np.random.default_rng(2)
    for m in (441, 400, 63, 2, 1):
        flat = rng.normal(size=(5, m)).astype(np.float32)
        got = preprocess._quartiles(flat)
        want = np.percentile(flat.astype(np.float64), [25, 50, 75], axis=1)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_unknown_step_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown preprocessing 'zscale'; known steps: course, course_scaled, none, standardize"):
        preprocess.get("zscale")


def test_preprocessing_needs_a_batch():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        preprocess.get("course")(np.zeros((21, 21)))
