import json

import pytest


@pytest.fixture
def cli_main():
    """`cortexlens` main with the evaluate command (registered here if the app does not yet)."""
    import service.cli as cli
    from service.cli import evaluate as ev

    if not any(c.name == "evaluate" for c in cli.app.registered_commands):
        ev.register(cli.app)
    return cli.main


def _run(main, argv):
    try:
        main(argv)
    except SystemExit as e:
        return e.code or 0
    return 0


def test_missing_checkpoint_is_one_error_line(cli_main, park_dir, tmp_path, capsys):
    code = _run(cli_main, ["evaluate", str(tmp_path / "nope"), str(park_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and "nope" in err[0]


def test_bad_window_is_one_error_line(cli_main, park_dir, tmp_path, capsys):
    code = _run(cli_main, ["evaluate", str(tmp_path), str(park_dir), "--window", "2,1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "--window" in err[0]


def test_missing_data_is_one_error_line(cli_main, tmp_path, capsys):
    from models.decoder.checkpoint import Checkpoint  # noqa: F401  (decoder present)

    code = _run(cli_main, ["evaluate", str(tmp_path / "nope"), str(tmp_path / "nodata")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:")


def test_help_lists_options(cli_main, capsys):
    code = _run(cli_main, ["evaluate", "--help"])
    out = capsys.readouterr().out
    assert code == 0 and "--json" in out and "--window" in out and "--bootstrap" in out


@pytest.mark.slow
def test_cli_evaluate_writes_json(cli_main, park_files, tmp_path, capsys):
    from models.data.park import read_park
    from models.decoder.config import DecoderConfig, TrainConfig
    from models.train import train

    recs = [read_park(park_files[1]), read_park(park_files[3])]
    train(
        recs,
        tmp_path / "ckpt",
        decoder_config=DecoderConfig(dim=16, dim_head=8, depth=1, num_latents=4),
        train_config=TrainConfig(epochs=1, windows_per_trial=1, threads=1),
        progress=False,
    )
    out = tmp_path / "eval.json"
    argv = ["evaluate", str(tmp_path / "ckpt"), str(park_files[1]), str(park_files[3])]
    argv += [str(park_files[4]), "--json", str(out), "--bootstrap", "200", "--adapt-steps", "5"]
    argv += ["--no-reembed", "--quiet", "--threads", "1"]
    try:
        cli_main(argv)
    except SystemExit as e:
        assert e.code in (0, None)
    text = capsys.readouterr().out
    assert "direction" in text and "genetic" in text
    rep = json.loads(out.read_text())
    for task in ("direction", "genetic"):
        t = rep["tasks"][task]
        assert {"decoder", "logistic", "mlp", "chance"} <= set(t["mean"])
        for row in t["per_session"].values():
            for e in row.values():
                assert 0 <= e["accuracy"] <= 1 and len(e["ci95"]) == 2
