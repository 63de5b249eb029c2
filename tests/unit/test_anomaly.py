"""The three detectors against real attacks on a real (small, quickly trained) mnist-5k model:
FGSM/PGD crafted against it, label flips and a corner-trigger backdoor in its training set,
and a Jacobian-augmentation extraction client querying it. Bounds here are loose; the
measured numbers are `dynray bench security`'s."""

import numpy as np
import pytest
import torch

from dynray.errors import ConfigError
from dynray.security.anomaly import AdversarialDetector, ExtractionConfig, ExtractionDetector, exit_probs, train_audit_model, audit_backdoor, audit_labels
from dynray.security.attacks import JacobianExtraction, add_backdoor, fgsm, flip_labels, pgd


@pytest.fixture(scope="module")
def victim(trained_net):
    return trained_net


def test_fgsm_and_pgd_stay_in_the_eps_ball_and_in_range_and_fool_the_model(victim, mnist5k):
    x, y = mnist5k["test"].images[:200], mnist5k["test"].labels[:200]
    for adv in (fgsm(victim, x, y, 0.1), pgd(victim, x, y, 0.1, steps=10)):
        assert float((adv - x).abs().max()) <= 0.1 + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
        clean_acc = float((exit_probs(victim, x)[-1].argmax(1) == y).float().mean())
        adv_acc = float((exit_probs(victim, adv)[-1].argmax(1) == y).float().mean())
        assert adv_acc < clean_acc - 0.3, (clean_acc, adv_acc)  # real attacks, not noise
    with pytest.raises(ConfigError):
        fgsm(victim, x, y, 0.0)


def test_the_adversarial_detector_flags_fgsm_and_pgd_at_a_calibrated_false_positive_rate(victim, mnist5k):
    det = AdversarialDetector(victim)
    det.calibrate(mnist5k["val"].images, fpr=0.05)
    x, y = mnist5k["test"].images[:300], mnist5k["test"].labels[:300]
    fpr = float(det.flag(mnist5k["test"].images[300:]).float().mean())  # clean data it was not calibrated on
    fgsm_rate = float(det.flag(fgsm(victim, x, y, 0.1)).float().mean())
    pgd_rate = float(det.flag(pgd(victim, x, y, 0.1, steps=10)).float().mean())
    assert fpr <= 0.10, fpr
    assert fgsm_rate >= 0.75 and pgd_rate >= 0.75, (fgsm_rate, pgd_rate)
    noise = (x + torch.empty_like(x).uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert float(det.flag(noise).float().mean()) < fgsm_rate / 2  # it flags the attack, not any perturbation
    with pytest.raises(ConfigError, match="calibrate"):
        AdversarialDetector(victim).flag(x)


def test_the_label_audit_finds_flipped_labels(mnist5k):
    tr = mnist5k["train"]
    y, flipped = flip_labels(tr.labels, 0.1, 10, seed=5)  # a seed the margin was not chosen on
    assert int((y != tr.labels).sum()) == len(flipped) == 350
    r = audit_labels(tr.images, y, 10, folds=2, epochs=6, seed=5)
    p, rc = r.precision_recall(flipped.numpy())  # precision: clean samples flagged count against it
    assert p >= 0.8 and rc >= 0.8, (p, rc, len(r.flagged))


def test_activation_clustering_finds_the_backdoor_triggered_samples(mnist5k):
    tr, te = mnist5k["train"], mnist5k["test"]
    x, y, poisoned = add_backdoor(tr.images, tr.labels, 0.05, target=0, seed=1)
    model = train_audit_model(x, y, 10, epochs=5, seed=1)
    stamped = te.images[te.labels != 0].clone()
    stamped[:, :, -4:-1, -4:-1] = 1.0
    assert float((exit_probs(model, stamped)[-1].argmax(1) == 0).float().mean()) > 0.8  # the backdoor works
    r = audit_backdoor(model, x, y, 10, seed=1)
    p, rc = r.precision_recall(poisoned.numpy())
    assert p >= 0.9 and rc >= 0.9, (p, rc, r.detail)


def _normal_clients(det, victim, pool, n_clients, rng):
    flags = []
    for c in range(n_clients):
        n = int(rng.integers(64, 400))
        idx = rng.integers(0, len(pool), n)
        if c % 4 == 0:
            idx[n // 2 :] = idx[: n - n // 2]  # retries: exact repeats never count as probing
        for i in range(0, n, 4):
            xb = pool[idx[i : i + 4]]
            if (f := det.observe(f"normal-{c}", xb, exit_probs(victim, xb)[-1])) is not None:
                flags.append(f)
    return flags


def test_the_extraction_detector_flags_a_jacobian_augmentation_client_and_no_normal_one(victim, mnist5k):
    det = ExtractionDetector(ExtractionConfig())
    pool = torch.cat([mnist5k["val"].images, mnist5k["test"].images])
    assert _normal_clients(det, victim, pool, 30, np.random.default_rng(0)) == []
    attack = JacobianExtraction(lambda q: exit_probs(victim, q)[-1].argmax(1), lam=0.1, epochs=3, min_steps=50)
    flag = None
    for xq, _ in attack.rounds(mnist5k["test"].images[:16], 4):
        for i in range(0, len(xq), 4):
            flag = flag or det.observe("attacker", xq[i : i + 4], exit_probs(victim, xq[i : i + 4])[-1])
    assert flag is not None and flag.detector == "extraction" and flag.subject == "attacker", det.queries_to_flag("attacker")
    assert det.queries_to_flag("attacker") <= 500 and attack.queries <= 256
    assert "perturb earlier ones" in flag.reason and det.flagged("attacker") and not det.flagged("normal-0")


def test_train_audit_data_writes_its_flags_and_drop_leaves_them_out_of_training(tmp_path, monkeypatch):
    import json

    from dynray.data import load_dataset
    from dynray.flags import parse
    from dynray.training import without
    from jobs.train import Config, audit_training_split

    monkeypatch.setenv("DYNRAY_HOME", str(tmp_path))
    cfg = parse(Config, ["--audit-data", "--audit-action", "drop"], prog="dynray train")
    assert cfg.audit_data and cfg.audit_action == "drop"
    a = audit_training_split(cfg)
    body = json.loads(open(a["path"]).read())
    assert a["path"].startswith(str(tmp_path / "audits")) and body["flagged"] == list(a["indices"]) and body["n"] == a["n"] == 3500
    assert 0 < a["flagged"] < 0.05 * a["n"], a  # real MNIST has a few odd labels; clean data is not flagged wholesale
    assert set(body["labels"]["flagged"]) | set(body["backdoor"]["flagged"]) == set(body["flagged"])
    split = load_dataset("mnist-5k", "train")
    kept = without(split, a["indices"])
    assert len(kept.labels) == a["n"] - a["flagged"] and cfg.train_config(exclude=a["indices"]).exclude_train == a["indices"]


def test_the_fitted_detector_learns_from_fgsm_and_still_catches_pgd_at_its_calibrated_rate(victim, mnist5k):
    val, test = mnist5k["val"], mnist5k["test"]
    det = AdversarialDetector(victim)
    fit_x, fit_y = val.images[:150], val.labels[:150]
    det.fit(fit_x, torch.cat([fgsm(victim, fit_x, fit_y, e) for e in (0.05, 0.1, 0.2)]))
    assert det.threshold is None
    det.calibrate(val.images[150:], fpr=0.05)  # clean inputs the fit never saw
    x, y = test.images[:300], test.labels[:300]
    fpr = float(det.flag(test.images[300:]).float().mean())
    fgsm_rate, pgd_rate = float(det.flag(fgsm(victim, x, y, 0.1)).float().mean()), float(det.flag(pgd(victim, x, y, 0.1, steps=10)).float().mean())
    assert fpr <= 0.10 and fgsm_rate >= 0.8 and pgd_rate >= 0.75, (fpr, fgsm_rate, pgd_rate)
