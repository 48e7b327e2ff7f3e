import numpy as np
import pytest

from stampray.drawing import (NOT_MEASURED, draw_occlusion, measured_mask, probability_change, stretch,
                              symmetric_scale)


@pytest.mark.parametrize("how", ["zscale", "asinh"])
def test_stretch_lies_in_unit_interval(how):
    rng = np.random.default_rng(0)
    img = rng.normal(100.0, 5.0, (21, 21))
    img[10, 10] = 1e5  # a saturated star
    img[0, 0] = np.nan
    out = stretch(img, how)
    assert out.shape == (21, 21) and out.min() >= 0.0 and out.max() <= 1.0
    assert out[10, 10] == 1.0 and out[0, 0] == 0.0  # clipped bright pixel; non-finite shown as 0
    assert 0.2 < np.median(out) < 0.8  # the background is neither black nor white
    assert (stretch(np.full((5, 5), 3.0), how) == 0).all()  # constant image: no division by zero


def test_stretch_zscale_is_linear_between_astropys_limits():
    from astropy.visualization import ZScaleInterval

    img = np.arange(100.0).reshape(10, 10)
    lo, hi = ZScaleInterval().get_limits(img)
    assert np.allclose(stretch(img, "zscale"), np.clip((img - lo) / (hi - lo), 0, 1))
    with pytest.raises(ValueError, match="stretch must be one of zscale, asinh"):
        stretch(img, "log")


@pytest.mark.parametrize("kernel,before,after", [(5, 2, 2), (4, 1, 2), (1, 0, 0)])
def test_unmeasured_border_follows_occlusion_padding(kernel, before, after):
    m = measured_mask((9, 11), kernel)
    rows, cols = np.nonzero(m)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (before, 8 - after, before, 10 - after)
    assert m.sum() == (9 - kernel + 1) * (11 - kernel + 1)  # one value per window position


def test_change_is_masked_on_the_border_and_its_scale_symmetric():
    heat = np.full((7, 7), 0.2)  # occlude pads with the map minimum: a value that must not be shown
    heat[1:6, 1:6] = np.linspace(0.5, 0.95, 25).reshape(5, 5)  # kernel 3: rows/cols 1..5 measured
    change = probability_change(heat, 0.9, 3)
    assert change.mask.sum() == 49 - 25
    assert change.mask[0].all() and change.mask[:, 6].all() and not change.mask[1:6, 1:6].any()
    assert change.min() == pytest.approx(-0.4) and change.max() == pytest.approx(0.05)
    assert symmetric_scale(change) == pytest.approx(0.4)  # the larger side, not the padded 0.2 - 0.9


def render(tmp_path, channels):
    rng = np.random.default_rng(1)
    stamp = rng.normal(0, 1, (channels, 9, 9)).astype(np.float32)
    heat = np.full((9, 9), 0.1)
    heat[2:7, 2:7] = 0.8 - 0.5 * np.eye(5)  # kernel 5 on 9x9: a 5x5 measured core
    path = tmp_path / f"occ{channels}.png"
    d = draw_occlusion(stamp, heat, 5, "id7", path, base_prob=0.75, target="source")
    return d, path


@pytest.mark.parametrize("channels", [1, 3])
def test_rendered_border_is_the_not_measured_grey(tmp_path, channels):
    import matplotlib.image as mpimg

    d, path = render(tmp_path, channels)
    lo, hi = d.image.get_clim()
    assert lo == -hi and hi == pytest.approx(0.45)  # change ranges over -0.45 .. +0.05
    png = mpimg.imread(path)
    height = png.shape[0]
    fig = d.image.figure
    assert fig.get_figwidth() * 100 == pytest.approx(png.shape[1], abs=1)  # saved without cropping

    def pixel(row, col):  # the PNG pixel at the centre of map pixel (row, col); origin lower left
        x, y = d.image.axes.transData.transform((col, row))
        return png[int(height - y), int(x)]

    grey = np.array(NOT_MEASURED)
    for row, col in [(0, 0), (8, 8), (1, 4), (4, 8)]:
        assert np.allclose(pixel(row, col), grey, atol=0.01), (row, col)
    inside = pixel(2, 2)  # change 0.3 - 0.75 = -0.45: the bluest colour
    assert inside[2] > inside[0] + 0.3 and not np.allclose(inside, grey, atol=0.05)
    assert np.allclose(pixel(2, 3), d.image.cmap(d.image.norm(0.05)), atol=0.02)  # 0.8 - 0.75: near white


def test_axes_and_wrong_shapes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3)
    d = draw_occlusion(np.zeros((2, 9, 9)), np.full((9, 9), 0.5), 3, "t", axes, base_prob=0.5)
    assert d.vmax == 1e-3 and d.change.count() == 49  # no change: the scale stays at its floor, centred
    plt.close(fig)
    with pytest.raises(ValueError, match="does not match a heatmap"):
        draw_occlusion(np.zeros((1, 8, 8)), np.zeros((9, 9)), 3, "t", tmp_path / "x.png", base_prob=0.5)
