"""`rmi-fast reproduce` end to end on a tiny configuration."""
from __future__ import annotations

import json

import pytest

from rmi_fast.cli import main


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
        assert r["bound_violated"] == (max(r["adversarial_acc"], *r["attacks"].values()) > r["bound"])
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
    assert '"natural"' in capsys.readouterr().out


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
    cases = [
        (["train-encoder", "--dataset", "nosuch", "--out", str(tmp_path / "e.pt")], "dataset must be one of"),
        (["train-encoder", "--dataset", "mnist", "--out", str(tmp_path / "e.pt")], "data_dir is required"),
        (["reproduce", "--out", str(blocker / "run")], f"--out {blocker / 'run'}: cannot write under {blocker}"),
        (["train-head", "--encoder", str(tmp_path / "missing.pt"), "--out", str(blocker / "c.pt")], "cannot write"),
        (["estimate-mi", "--encoder", str(torn)], f"{torn} is not a readable 'rmi_fast.robust.encoder' checkpoint"),
        (["train-encoder", "--out", str(tmp_path)], f"--out {tmp_path}: is a folder, not a file"),
        (["estimate-mi", "--encoder", str(enc), "--dataset", "mnist", "--data-dir", str(tmp_path)],
         f"--dataset mnist has 1×28×28 images, but the encoder of {enc} takes 1×8×8 (trained on digits)"),
    ]
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"rmi-fast {argv[0]}: error: ") and words in err and "\n" not in err, err
    assert not (tmp_path / "e.pt").exists()


@pytest.mark.parametrize("flag, value, words", [("--eps", "nan", "expected a positive finite float, got 'nan'"),
                                                ("--alpha", "inf", "expected a positive finite float"),
                                                ("--seed", str(2**70), "expected an integer in [0, 2**63)"),
                                                ("--seed", "-1", "expected an integer in [0, 2**63)")])
def test_bad_flag_values_are_refused_by_the_parser(tmp_path, capsys, flag, value, words):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--out", str(tmp_path / "run"), flag, value])
    assert exc.value.code == 2 and words in capsys.readouterr().err
