"""`rmi-fast reproduce` end to end on a tiny configuration."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rmi_fast.cli import main
from rmi_fast.robust.checkpoint import load_checkpoint, save_checkpoint
from rmi_fast.robust.downstream import attack_suite
from rmi_fast.robust.estimation import adversarial_accuracy_bound
from rmi_fast.robust.reproduce import _checks, _row
from rmi_fast.robust.training import CHECKPOINT_KIND


def test_reproduce_tiny_writes_report(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["reproduce", "--dataset", "digits", "--out", str(out), "--limit", "48", "--epochs", "1",
               "--estimation-epochs", "1", "--head-epochs", "1", "--steps", "2", "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    for mode in ("infomax", "worst-case"):
        e = report["encoders"][mode]
        assert e["rv"] == e["mi_natural"] - e["mi_worst"]
        assert "bound" in e
    rows = report["downstream"]
    assert len(rows) == 8
    assert {(r["encoder"], r["head"], r["head_training"]) for r in rows} == {
        (e, h, t) for e in ("infomax", "worst-case") for h in ("linear", "mlp") for t in ("standard", "robust")}
    for r in rows:
        assert 0 <= r["adversarial_acc"] <= 1 and 0 <= r["natural_acc"] <= 1
        assert r["bound_violated"] == (r["adversarial_acc_strongest"] > r["bound"])
    assert {"settings", "timing_seconds", "versions", "checks"} <= set(report)
    assert report["settings"]["steps"] == 2
    md = (out / "report.md").read_text()
    assert "| infomax | standard |" in md and "RV" in md
    for png in ("mi.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoints" / "worst-case.pt").is_file()
    assert "report:" in capsys.readouterr().out


def test_paper_commands(tmp_path, capsys):
    enc = tmp_path / "enc.pt"
    clf = tmp_path / "clf.pt"
    common = ["--limit", "32", "--steps", "1", "--quiet"]
    assert main(["train-encoder", "--mode", "infomax", "--out", str(enc), "--epochs", "1", *common]) == 0
    assert main(["estimate-mi", "--encoder", str(enc), "--estimation-epochs", "1", *common]) == 0
    assert '"rv"' in capsys.readouterr().out
    assert main(["train-head", "--encoder", str(enc), "--head", "linear", "--epochs", "1", "--out", str(clf),
                 *common]) == 0
    assert main(["evaluate", "--model", str(clf), *common]) == 0
    printed = capsys.readouterr().out
    assert '"natural"' in printed and '"bound"' not in printed
    assert main(["evaluate", "--model", str(clf), "--mi-worst", "0.5", *common]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["bound"] == adversarial_accuracy_bound(0.5, 10)
    assert metrics["bound_violated"] == (metrics["worst"] > metrics["bound"])


def test_user_errors_end_in_one_line(tmp_path, capsys):
    """A bad argument found by the library, or an output path that cannot be written, ends the command with exit
    status 2 and one error line, before any work (no traceback, nothing trained)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    torn = tmp_path / "torn.pt"
    torn.write_bytes(b"not a checkpoint")
    enc = tmp_path / "enc.pt"
    assert main(["train-encoder", "--mode", "infomax", "--out", str(enc), "--epochs", "1", "--limit", "8",
                 "--quiet"]) == 0
    unfinished = tmp_path / "unfinished.pt"  # the same run as if stopped before its one step
    payload = load_checkpoint(enc, CHECKPOINT_KIND)
    save_checkpoint(unfinished, {**payload, "step": 0, "history": payload["history"][:0]}, CHECKPOINT_KIND)
    cases = [
        (["train-encoder", "--dataset", "nosuch", "--out", str(tmp_path / "e.pt")], "dataset must be one of"),
        (["train-encoder", "--dataset", "mnist", "--out", str(tmp_path / "e.pt")], "data_dir is required"),
        (["reproduce", "--out", str(blocker / "run")], f"--out {blocker / 'run'}: cannot write under {blocker}"),
        (["train-head", "--encoder", str(tmp_path / "missing.pt"), "--out", str(blocker / "c.pt")], "cannot write"),
        (["estimate-mi", "--encoder", str(torn)], f"{torn} is not a readable 'rmi_fast.robust.encoder' checkpoint"),
        (["train-encoder", "--out", str(tmp_path)], f"--out {tmp_path}: is a folder, not a file"),
        (["estimate-mi", "--encoder", str(enc), "--dataset", "mnist", "--data-dir", str(tmp_path)],
         f"--dataset mnist has 1×28×28 images, but the encoder of {enc} takes 1×8×8 (trained on digits)"),
        (["reproduce", "--out", str(blocker)], f"--out {blocker}: is a file, not a folder"),
        (["train-encoder", "--data-dir", str(tmp_path), "--out", str(tmp_path / "e.pt")],
         f"--data-dir {tmp_path}: the digits are built in"),
        (["estimate-mi", "--encoder", str(unfinished)], f"{unfinished} holds an unfinished run (step 0 of 1)"),
        (["train-encoder", "--mode", "infomax", "--out", str(enc), "--epochs", "2", "--limit", "8"],
         "start over with resume=False (on the command line: --restart)"),
        (["train-encoder", "--out", ""], "--out: an empty path"),
        (["train-head", "--encoder", str(enc), "--out", str(enc)],
         f"--out {enc} is the --encoder file: writing it would replace what the command reads"),
    ]
    if Path("/proc/self").is_dir():  # a folder that takes no files, whatever its permission bits say
        cases.append((["train-encoder", "--out", "/proc/rmi_fast.pt"], "--out /proc/rmi_fast.pt: cannot write there"))
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"rmi-fast {argv[0]}: error: ") and words in err and "\n" not in err, err
    assert not (tmp_path / "e.pt").exists()


@pytest.mark.parametrize("flag, value, words", [("--eps", "nan", "expected a positive finite float, got 'nan'"),
                                                ("--eps", "5", "expected a radius in (0, 1] (images are in [0, 1])"),
                                                ("--alpha", "inf", "expected a positive finite float"),
                                                ("--seed", str(2**70), "expected an integer in [0, 2**63)"),
                                                ("--seed", "-1", "expected an integer in [0, 2**63)"),
                                                ("--threads", str(10**11), "threads must be at most this machine's"),
                                                ("--threads", "0", "expected a positive int")])
def test_bad_flag_values_are_refused_by_the_parser(tmp_path, capsys, flag, value, words):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--out", str(tmp_path / "run"), flag, value])
    assert exc.value.code == 2 and words in capsys.readouterr().err


class _Stop(Exception):
    pass


def test_attack_flags_reach_training_and_estimation(tmp_path, monkeypatch):
    """reproduce --attack-input-branch --restart trains anew with the stronger attack; estimate-mi attacks as the
    encoder was trained (its ε, step and gradient path) unless told otherwise, and train-head's robust training
    takes the same attack."""
    from rmi_fast.robust import downstream, estimation, reproduce

    calls = []

    def stop(*args, **kwargs):
        calls.append((args, kwargs))
        raise _Stop

    monkeypatch.setattr(reproduce, "train_encoder", stop)
    with pytest.raises(_Stop):
        main(["reproduce", "--out", str(tmp_path / "run"), "--attack-input-branch", "--restart", "--quiet"])
    (config, *_), kwargs = calls.pop()
    assert config.attack.through_input_branch and kwargs["resume"] is False
    monkeypatch.undo()

    enc = tmp_path / "enc.pt"
    assert main(["train-encoder", "--mode", "infomax", "--out", str(enc), "--epochs", "1", "--limit", "8",
                 "--eps", "0.2", "--alpha", "0.03", "--steps", "3", "--attack-input-branch", "--quiet"]) == 0
    monkeypatch.setattr(estimation, "estimate_mi", stop)
    for extra, through, eps in (([], True, 0.2), (["--no-attack-input-branch", "--eps", "0.1"], False, 0.1)):
        with pytest.raises(_Stop):
            main(["estimate-mi", "--encoder", str(enc), "--limit", "8", "--quiet", *extra])
        (_, _, _, config), _ = calls.pop()
        assert (config.attack.eps, config.attack.alpha, config.attack.steps) == (eps, 0.03, 3)
        assert config.attack.through_input_branch == through
    monkeypatch.setattr(downstream, "train_head", stop)
    with pytest.raises(_Stop):
        main(["train-head", "--encoder", str(enc), "--training", "robust", "--out", str(tmp_path / "clf.pt"),
              "--limit", "8", "--quiet"])
    (_, _, _, head), _ = calls.pop()
    assert (head.attack.eps, head.attack.alpha, head.attack.steps) == (0.2, 0.03, 3)


def _metrics(natural, attacks, worst):
    return {"natural": natural, "attacks": attacks, "worst": worst, "masking_warnings": []}


def test_bound_is_checked_against_the_strongest_attack():
    """The bound is on the true adversarial accuracy, which every attack overestimates: a weak attack above it
    proves nothing; the strongest measurement above it is reported."""
    attacks = attack_suite(0.1, 0.025, 2)
    weak_above = _metrics(0.9, {"pgd": 0.5, "pgd-8x5": 0.3, "apgd-8": 0.2}, worst=0.18)
    assert not _row("worst-case", "mlp", "standard", weak_above, attacks, bound=0.30)["bound_violated"]
    strongest_above = _metrics(0.9, {"pgd": 0.5, "pgd-8x5": 0.45, "apgd-8": 0.4}, worst=0.35)
    assert _row("worst-case", "mlp", "standard", strongest_above, attacks, bound=0.30)["bound_violated"]
    assert not _row("worst-case", "mlp", "standard", strongest_above, attacks, bound=None)["bound_violated"]


@pytest.mark.parametrize("tables, holds", [
    # the paper's Table 1 (CIFAR-10) and Table 3 (MNIST), MLP head: (natural, adversarial) of infomax, worst-case
    (((0.5877, 0.0022), (0.6254, 0.1406)), True),
    (((0.9696, 0.0000), (0.9667, 0.0997)), True),
    (((0.90, 0.10), (0.80, 0.30)), False),  # a gain bought with 10 points of natural accuracy
    (((0.90, 0.10), (0.91, 0.09)), False),  # no gain
])
def test_claim_check_passes_the_papers_own_tables(tables, holds):
    (inf_nat, inf_adv), (wc_nat, wc_adv) = tables
    encoders = {"infomax": {"rv": 1.0}, "worst-case": {"rv": 0.5}}
    rows = [{"encoder": e, "head": "mlp", "head_training": "standard", "natural_acc": nat, "adversarial_acc": adv,
             "bound_violated": False, "masking_warnings": []}
            for e, (nat, adv) in (("infomax", (inf_nat, inf_adv)), ("worst-case", (wc_nat, wc_adv)))]
    assert _checks(encoders, rows)["standard_head_adversarial_gain"]["mlp"]["holds"] is holds


def test_jsd_estimates_come_without_a_bound(tmp_path, capsys):
    """JSD's values are not MI in nats: no Theorem 3.4 bound is computed, checked or drawn from them."""
    out = tmp_path / "run"
    assert main(["reproduce", "--dataset", "digits", "--out", str(out), "--limit", "32", "--epochs", "1",
                 "--estimation-epochs", "1", "--head-epochs", "1", "--steps", "1", "--estimator", "jsd",
                 "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert all(e["bound"] is None for e in report["encoders"].values())
    assert not any(r["bound_violated"] for r in report["downstream"]) and not report["checks"]["bound_violations"]
    md = (out / "report.md").read_text()
    assert "| n/a |" in md and "no Theorem 3.4 bound: the `jsd` estimator's values are not MI in nats" in md
    printed = capsys.readouterr().out
    assert "RV =" in printed and "Theorem 3.4 bound" not in printed


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(estimation_epochs=0), ValueError, "estimation_epochs must be an integer >= 1"),
    (dict(head_epochs=-1), ValueError, "head_epochs must be an integer >= 1"),
    (dict(threads=0), ValueError, "threads must be an integer >= 1"),
    (dict(threads=10**6), ValueError, "threads must be at most this machine's"),
    (dict(eps=1.5), ValueError, "eps must lie in (0, 1]"),
    (dict(estimator="nwj"), ValueError, "estimator must be one of"),
    (dict(restart="no"), TypeError, "restart must be True or False"),
    (dict(out=""), ValueError, "out must name a folder"),
    (dict(dataset="imagenet"), ValueError, "dataset must be one of"),
])
def test_reproduce_options_are_checked_before_any_work(kwargs, error, words):
    from rmi_fast.robust.reproduce import ReproduceOptions

    with pytest.raises(error) as info:
        ReproduceOptions(**kwargs)
    assert words in str(info.value)


def test_derived_seeds_stay_in_range(tmp_path, capsys):
    """The stages' seeds are derived from --seed (seed + k) and wrap like every seed: the largest --seed the parser
    takes trains a head (it failed with a seed the user never gave)."""
    enc, clf = tmp_path / "enc.pt", tmp_path / "clf.pt"
    common = ["--limit", "16", "--steps", "1", "--quiet", "--epochs", "1"]
    assert main(["train-encoder", "--mode", "infomax", "--out", str(enc), *common]) == 0
    assert main(["train-head", "--encoder", str(enc), "--head", "linear", "--out", str(clf),
                 "--seed", str(2**63 - 1), *common]) == 0
