"""The adversarial study's supervised comparison: image classifiers from a torchvision ResNet-50 state dict
(synthetic weights, the published file's layout) or a factor probe, both attack objectives, and the CSV
columns on the tiny study assets of test_studies (16 px shapes, a `small` encoder, a random RCDM)."""

from __future__ import annotations

import argparse

import pytest
import torch
from test_studies import _common, _read_csv, assets  # noqa: F401 (assets: the session fixture)

from rcdm.classifiers import load_classifier
from rcdm.cli import main
from rcdm.stages.study import adversarial

NUM_CLASSES = 1000  # the ImageNet head of resnet50-0676ba61.pth: the class names come from torchvision


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    """A torchvision ResNet-50 state dict with its fc (random weights, seeded), saved as torch.hub saves
    resnet50-0676ba61.pth: a bare state dict, BatchNorm running statistics included."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    net = resnet50(weights=None, num_classes=NUM_CLASSES)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the file's buffers matter
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("classifier") / "resnet50-0676ba61.pth"
    torch.save(net.state_dict(), path)
    return path


def test_resnet50_classifier_is_torchvisions_on_imagenet_normalised_pixels(resnet_file):
    from torchvision.models import resnet50
    from torchvision.transforms.functional import normalize

    clf = load_classifier(resnet_file)
    ref = resnet50(weights=None, num_classes=NUM_CLASSES)
    ref.load_state_dict(torch.load(resnet_file, weights_only=True))
    ref.eval()
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
        got = clf(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(clf.predict(x), want.argmax(1))
    assert clf.class_names[0] == "tench" and clf.class_name(1) == "goldfish"
    assert not any(p.requires_grad for p in clf.parameters())
    # samples in [-1, 1] reach it at the size asked for, through encoder_view (a square sample: a resize)
    s = x[:2] * 2 - 1
    assert torch.equal(clf.predict_samples(s, 64), clf.predict(x[:2].mul(255).floor().div(255)))


def test_classifier_file_errors(tmp_path, assets):  # noqa: F811
    fc_only = tmp_path / "fc.pt"
    torch.save({"fc.weight": torch.zeros(5, 2048), "fc.bias": torch.zeros(5)}, fc_only)
    with pytest.raises(ValueError, match="not an image classifier"):
        load_classifier(fc_only)
    with pytest.raises(FileNotFoundError, match="classifier file not found"):
        load_classifier(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="no 'shape' head"):
        load_classifier(assets["probe"], factor="shape")
    probe = load_classifier(assets["probe"])  # the demo's classifier: the shapes probe's kind head
    assert probe.own_resize and "kind" in probe.name and len(probe.class_names) >= 2


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    adversarial.add_arguments(parser)
    return parser.parse_args(["--checkpoint", "x", "--encoder", "small", "--out", "o", *argv])


def test_attacks_default_and_errors():
    assert adversarial.attacks_of(_args()) == ["representation"]
    assert adversarial.attacks_of(_args("--classifier", "c.pth")) == ["representation", "classifier"]
    assert adversarial.attacks_of(_args("--classifier", "c.pth", "--attacks", "classifier")) == ["classifier"]
    with pytest.raises(ValueError, match="needs the network to attack"):
        adversarial.attacks_of(_args("--attacks", "classifier"))
    with pytest.raises(ValueError, match="--attacks takes"):
        adversarial.attacks_of(_args("--attacks", "fgsm"))


CLASSIFIER_COLUMNS = {
    "classifier", "class_clean", "class_adv", "class_clean_name", "class_adv_name", "class_flipped",
    "class_flipped_random", "samples_clean_in_class_clean", "samples_adv_in_class_clean",
    "samples_adv_in_class_adv", "sample_class_agree",
}  # fmt: skip


def _run(assets, out, *extra) -> list[dict[str, str]]:  # noqa: F811
    args = _common(assets, out, "--num-images", "2", "--samples", "2", "--pgd-steps", "4", *extra)
    assert main(["study", "adversarial", *args]) == 0
    return _read_csv(out / "adversarial.csv")


def test_adversarial_with_the_supervised_classifier(assets, resnet_file, tmp_path):  # noqa: F811
    eps = 8 / 255
    rows = _run(assets, tmp_path / "adv", "--classifier", str(resnet_file), "--eps", str(eps))
    assert [r["attack"] for r in rows] == ["representation", "classifier"] * 2  # per image, both objectives
    assert set(rows[0]) >= CLASSIFIER_COLUMNS
    for r in rows:
        assert float(r["linf"]) <= eps + 1e-6
        assert float(r["pgd_step"]) == pytest.approx(2.5 * eps / 4, rel=1e-5)
        # the attack raised its objective (from the clean image's value to the attacked one's)
        assert float(r["objective_adv"]) > float(r["objective_clean"]) + 1e-6
        assert int(r["class_flipped"]) == int(r["class_clean"] != r["class_adv"])
        assert 0 <= int(r["class_clean"]) < NUM_CLASSES and r["class_clean_name"] and r["class_adv_name"]
        assert r["classifier"].startswith("ResNet-50 classifier (resnet50-0676ba61.pth)")
        for key in ("samples_clean_in_class_clean", "samples_adv_in_class_clean", "sample_class_agree"):
            assert float(r[key]) in (0.0, 0.5, 1.0)  # two samples each
    rep = [r for r in rows if r["attack"] == "representation"]
    clf = [r for r in rows if r["attack"] == "classifier"]
    for r in rep:  # the representation objective is the cosine distance the CSV reports, from 0
        assert float(r["objective_clean"]) == pytest.approx(0, abs=1e-6)
        assert float(r["objective_adv"]) == pytest.approx(float(r["rep_cos_dist_adv"]), rel=1e-3, abs=1e-6)
        assert r["objective"] == "cosine distance of small trunk"
    for r in clf:
        assert r["objective"].startswith("cross-entropy of ResNet-50 classifier")
    # both objectives start from the same clean image: one clean prediction, one set of clean samples
    for a, b in zip(rep, clf, strict=True):
        for key in ("class_clean", "samples_clean_in_class_clean", "rep_cos_dist_random"):
            assert a[key] == b[key]
        assert a["class_flipped_random"] == b["class_flipped_random"]


def test_adversarial_eps_zero_moves_nothing(assets, resnet_file, tmp_path):  # noqa: F811
    rows = _run(assets, tmp_path / "adv0", "--classifier", str(resnet_file), "--eps", "0")
    assert len(rows) == 4
    for r in rows:
        assert float(r["linf"]) == 0 and float(r["rep_cos_dist_adv"]) < 1e-6
        assert r["class_flipped"] == "0" and r["class_clean"] == r["class_adv"]
        assert float(r["objective_adv"]) == pytest.approx(float(r["objective_clean"]), abs=1e-5)
        assert float(r["sample_pixel_l1"]) < 1e-3


def test_adversarial_with_the_probe_classifier(assets, tmp_path):  # noqa: F811
    """The demo's supervised comparison: the shapes probe's kind head, attacked and asked."""
    from rcdm.probe import load_probe

    kinds = {s.name: s.names for s in load_probe(assets["probe"]).specs}["kind"]
    probe_file = str(assets["probe"])
    rows = _run(assets, tmp_path / "advp", "--classifier", probe_file, "--probe", probe_file)
    assert {r["attack"] for r in rows} == {"representation", "classifier"}
    for r in rows:
        assert r["class_clean_name"] == kinds[int(r["class_clean"])]
        assert r["class_adv_name"] == kinds[int(r["class_adv"])]
        assert float(r["objective_adv"]) > float(r["objective_clean"])
        assert 0 <= float(r["probe_agree_kind"]) <= 1
