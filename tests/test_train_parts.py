"""The pieces of the training loop that run without Ray: LR schedule, metrics, run state, settings."""

import io
import json
import math
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch

from stampray.train import RunState, TrainSettings, classification_metrics, make_scheduler


def old_lr_factor(step, steps_per_epoch, epochs, schedule, warmup_epochs):
    """The schedule as stampray computed it before torch's schedulers (the reference)."""
    if schedule == "constant":
        return 1.0
    total = max(1, steps_per_epoch * epochs)
    warm = int(round(warmup_epochs * steps_per_epoch))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def old_classification_metrics(probs, labels, num_classes):
    """The metrics as stampray computed them before (loss and accuracy in numpy: the reference)."""
    from sklearn.metrics import confusion_matrix, roc_auc_score

    p = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    pred = probs.argmax(axis=1)
    try:
        with warnings.catch_warnings():  # newer scikit-learn warns and returns NaN for one class
            warnings.simplefilter("ignore")
            if num_classes == 2:
                auc = float(roc_auc_score(labels, probs[:, 1]))
            else:
                auc = float(roc_auc_score(labels, probs, multi_class="ovr", labels=list(range(num_classes))))
    except ValueError:
        auc = float("nan")
    cm = confusion_matrix(labels, pred, labels=list(range(num_classes)))
    return {"loss": float(-np.log(p).mean()), "acc": float((pred == labels).mean()), "auc": auc,
            "n": int(len(labels)), "confusion": cm.tolist()}


def settings(**kw):
    return TrainSettings(model="cnn", data="d", out="o", **kw)


def lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize(("schedule", "steps_per_epoch", "epochs", "warmup"), [
    ("constant", 10, 3, 1.0), ("cosine", 10, 5, 1.0), ("cosine", 7, 3, 0.5), ("cosine", 3, 4, 0.0),
    ("cosine", 1, 3, 1.0), ("cosine", 5, 2, 2.0), ("cosine", 4, 2, 3.0), ("cosine", 13, 6, 1.3)])
def test_the_lr_schedule_is_the_old_formula_step_by_step(schedule, steps_per_epoch, epochs, warmup):
    s = settings(schedule=schedule, epochs=epochs, warmup_epochs=warmup, lr=0.1)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=s.lr)
    total = steps_per_epoch * epochs
    got = lrs(make_scheduler(optimizer, s, steps_per_epoch), optimizer, total)
    want = [0.1 * old_lr_factor(i, steps_per_epoch, epochs, schedule, warmup) for i in range(total)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    if schedule == "cosine":
        assert len(set(got)) > 1  # not constant by mistake


def test_a_resumed_schedule_continues_where_it_stopped_even_with_more_epochs():
    s = settings(schedule="cosine", epochs=4, warmup_epochs=1.0, lr=0.1)
    param = torch.nn.Parameter(torch.zeros(1))
    first = torch.optim.AdamW([param], lr=s.lr)
    lrs(make_scheduler(first, s, 10), first, 17)
    saved = first.state_dict()
    for epochs in (4, 6):  # the same run, and one resumed with --epochs raised
        again = torch.optim.AdamW([param], lr=s.lr)
        again.load_state_dict(saved)
        longer = settings(schedule="cosine", epochs=epochs, warmup_epochs=1.0, lr=0.1)
        got = lrs(make_scheduler(again, longer, 10, start_step=17), again, 10 * epochs - 17)
        want = [0.1 * old_lr_factor(i, 10, epochs, "cosine", 1.0) for i in range(17, 10 * epochs)]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(("num_classes", "labels"), [
    (2, None), (3, None), (2, [1] * 20), (3, [0, 1] * 10)])
def test_the_metrics_equal_the_old_ones(num_classes, labels):
    rng = np.random.default_rng(num_classes)
    probs = softmax(rng.normal(scale=3.0, size=(20, num_classes)))
    probs[0] = np.eye(num_classes, dtype=np.float32)[1]  # a sure prediction, right or wrong
    y = np.array(labels if labels is not None else rng.integers(0, num_classes, 20), np.int64)
    got, want = classification_metrics(probs, y, num_classes), old_classification_metrics(probs, y, num_classes)
    assert got["n"] == want["n"] == 20 and got["confusion"] == want["confusion"]
    assert got["acc"] == want["acc"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    if labels is None:
        assert got["auc"] == pytest.approx(want["auc"], rel=1e-6) and 0 < got["auc"] < 1
    else:  # one class, or a class absent beyond two: undefined
        assert math.isnan(got["auc"]) and math.isnan(want["auc"])


def test_the_metrics_of_an_empty_split():
    got = classification_metrics(np.zeros((0, 3), np.float32), np.zeros(0, np.int64), 3)
    assert got["n"] == 0 and math.isnan(got["loss"]) and got["confusion"] == [[0] * 3] * 3


def test_the_run_state_round_trips_through_a_weights_only_checkpoint():
    state = RunState(epoch=3, step=42, history=[{"epoch": 1, "val_loss": 0.5}, {"epoch": 2, "val_loss": 0.4}],
                     best_value=0.4, best_epoch=2, best_metrics={"epoch": 2, "val_loss": 0.4}, since_best=1,
                     stopped_early=False, resumes=[1])
    buf = io.BytesIO()
    torch.save({"train_state": state.to_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["train_state"]
    assert RunState.from_dict(loaded) == state
    assert RunState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    # a checkpoint of an older stampray carried the best weights as well: they are not part of the state
    assert RunState.from_dict({**loaded, "best_state_dict": {"w": torch.zeros(1)}}) == state
    assert RunState.from_dict({}) == RunState()


def test_settings_rebuilt_from_a_plain_dict_are_equal():
    s = settings(fractions=[0.6, 0.2, 0.2], epochs=3)
    assert s.fractions == (0.6, 0.2, 0.2)
    again = TrainSettings(**json.loads(json.dumps(asdict(s))))
    assert again == s and isinstance(again.fractions, tuple)


def test_rows_an_equal_split_among_workers_leaves_over_are_counted_as_dropped():
    """2,117 training stamps on 2 workers: streaming_split(equal=True) gives each 1,058 and leaves one over;
    train_n + train_dropped + the rows set aside always make the train split."""
    from types import SimpleNamespace

    from stampray.train import epoch_metrics

    w = SimpleNamespace(cfg={"data_info": {"splits": {"train": 2117, "val": 300, "test": 600}}}, node_ids=["n"],
                        pids=[1, 2])
    val = {"loss": 0.5, "acc": 0.8, "auc": 0.9, "n": 300}
    train = {"train_loss": 0.4, "train_acc": 0.9, "lr": 1e-3, "stamps_per_s": 1.0, "seconds": 1.0}
    cases = [((2116, 0, 0), 1), ((2113, 0, 3), 1), ((2115, 1, 0), 2), ((2116, 1, 0), 1), ((2117, 0, 0), 0)]
    for (n, single, aside), dropped in cases:
        row = epoch_metrics(w, 1, {**train, "train_n": n, "train_dropped": single}, val, {"train": aside, "val": 0})
        assert (row["train_n"], row["train_dropped"], row["train_set_aside"]) == (n, dropped, aside)
        assert row["train_n"] + row["train_dropped"] + row["train_set_aside"] == 2117
