import pytest
import torch

from stampray.models import _REGISTRY, count_parameters, create_model, list_models, register_model

SHAPES = {"jet_cnn": ((1, 20, 20), 5), "radio_cnn": ((1, 64, 64), 4)}
EXPECTED = {"dense": 27_452, "cnn": 9_666, "vgg6": 25_394, "resnet50": 23_532_418, "jet_cnn": 3_505,
            "radio_cnn": 867_889, "dense_bn": 27_572}


def shape_of(name):
    return SHAPES.get(name, ((1, 21, 21), 2))


def test_every_model_has_an_expected_count():
    assert sorted(EXPECTED) == list_models()


@pytest.mark.parametrize("name", list_models())
def test_parameter_counts(name):
    (c, h, w), k = shape_of(name)
    assert count_parameters(create_model(name, c, (h, w), k)) == EXPECTED[name]


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("batch", [1, 7])
def test_forward_backward_finite(name, batch):
    (c, h, w), k = shape_of(name)
    torch.manual_seed(0)
    model = create_model(name, c, (h, w), k)
    x = torch.randn(batch, c, h, w)
    if batch == 1:
        model.eval()  # batch norm cannot take training statistics from a single stamp
    out = model(x)
    assert out.shape == (batch, k) and torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    feats = model.forward_features(x)
    assert torch.allclose(model.forward_head(feats), model(x)) if batch == 1 else feats.shape[0] == batch


@pytest.mark.parametrize("name", list_models())
def test_eval_is_deterministic(name):
    (c, h, w), k = shape_of(name)
    model = create_model(name, c, (h, w), k).eval()
    x = torch.randn(3, c, h, w)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", list_models())
def test_multichannel_input(name):
    (_, h, w), k = shape_of(name)
    model = create_model(name, 3, (h, w), k).eval()
    assert model(torch.randn(2, 3, h, w)).shape == (2, k)


@pytest.mark.parametrize("name", [n for n in list_models() if _REGISTRY[n].min_size > 1])
def test_too_small_input_names_the_minimum(name):
    m = _REGISTRY[name].min_size
    with pytest.raises(ValueError, match=f"model '{name}' needs stamps of at least {m}x{m} pixels, got {m - 1}x{m - 1}"):
        create_model(name, 1, m - 1, 2)
    create_model(name, 1, m, 2).eval()(torch.zeros(1, 1, m, m))  # the minimum itself works


def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="a model named 'cnn' is already registered"):
        register_model("cnn")(type("X", (), {}))
    with pytest.raises(ValueError, match="unknown model 'alexnet'; known models: cnn, dense, dense_bn, jet_cnn"):
        create_model("alexnet")
