"""The in-domain digits classifier: accuracy, caching, fd_digits behaviour, bad input."""
import numpy as np
import pytest

from fdistill.evaluation import classifier, fid


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("clf"))


@pytest.fixture(scope="module")
def clf(workdir):
    return classifier.get_classifier("digits", workdir, steps=150, verbose=False)


@pytest.fixture(scope="module")
def digits():
    x_train, y_train = classifier.load_labelled_images("digits", "train")
    x_test, y_test = classifier.load_labelled_images("digits", "test")
    return x_train, y_train, x_test, y_test


def test_classifier_learns_digits_and_is_cached(clf, workdir, digits):
    _, _, x_test, y_test = digits
    assert clf.test_accuracy > 0.85  # chance is 0.1
    assert clf.test_accuracy == float((clf.predict(x_test) == y_test).mean())
    again = classifier.get_classifier("digits", workdir, steps=1)  # cached: no retraining
    assert again.test_accuracy == clf.test_accuracy
    np.testing.assert_array_equal(again.features_and_logits(x_test[:7])[0],
                                  clf.features_and_logits(x_test[:7])[0])


def test_fd_and_accuracy_of_samples(clf, digits):
    x_train, _, x_test, y_test = digits
    held_out = classifier.in_domain_metrics(clf, x_test, x_train, labels=y_test)
    assert set(held_out) == {"fd_digits", "accuracy_digits", "protocol"}
    assert "not FID" in held_out["protocol"]["features"]
    assert held_out["accuracy_digits"] == pytest.approx(clf.test_accuracy)
    one_hot = np.eye(10)[y_test]
    assert classifier.in_domain_metrics(clf, x_test, x_train, labels=one_hot)[
        "accuracy_digits"] == held_out["accuracy_digits"]
    # the real train set against itself: 0; against noise and against one class: far larger
    assert classifier.in_domain_metrics(clf, x_train, x_train)["fd_digits"] == pytest.approx(
        0, abs=1e-6)
    noise = np.random.default_rng(0).uniform(-1, 1, x_test.shape).astype(np.float32)
    fd_noise = classifier.in_domain_metrics(clf, noise, x_train)["fd_digits"]
    fd_one_class = classifier.in_domain_metrics(clf, x_test[y_test == 3], x_train)["fd_digits"]
    assert held_out["fd_digits"] * 3 < min(fd_noise, fd_one_class)
    # wrong labels: accuracy collapses
    wrong = classifier.in_domain_metrics(clf, x_test, x_train, labels=(y_test + 1) % 10)
    assert wrong["accuracy_digits"] < 0.1


def test_classifier_plugs_into_the_fid_machinery(clf, digits, tmp_path):
    """The uint8 callable interface: fid.write_reference_stats / evaluate_samples run on it."""
    class Data:
        name, num_examples = "digits", 200

        def examples(self, idx):
            return {"x": np.round((digits[0][idx] + 1) * 127.5) / 127.5 - 1}

    ref = str(tmp_path / "ref.npz")
    fid.write_reference_stats(ref, Data(), clf, 200, 64, keep_features=200, progress=False)
    out = fid.evaluate_samples(lambda i: Data().examples(np.arange(i * 50, i * 50 + 50))["x"],
                               clf, ref, 200, monitoring=True, progress=False)
    assert out["fid_200"] == pytest.approx(0, abs=1e-6)
    assert out["precision_200"] == out["recall_200"] == 1.0


def test_bad_input(clf, digits, workdir):
    x_test = digits[2]
    with pytest.raises(ValueError, match=r"\[8, 8, 1\]"):
        clf.features_and_logits(np.zeros((2, 28, 28, 1), np.float32))
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        clf.features_and_logits(x_test * 127.5 + 127.5)
    with pytest.raises(ValueError, match="labels"):
        classifier.in_domain_metrics(clf, x_test, x_test, labels=np.zeros(3, int))
    with pytest.raises(ValueError, match="valid: \\['digits', 'fashion_mnist'\\]"):
        classifier.get_classifier("cifar10", workdir)
    with pytest.raises(FileNotFoundError, match="get_classifier"):
        classifier.load(workdir + "/nothing.npz")
