"""Progress bars: count, rate and ETA on a terminal; quiet under --no-progress and off a terminal."""

import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from test_score import _reward_model, _samples  # noqa: E402

from treg.cli import main as cli  # noqa: E402


class Tty(io.StringIO):
    def isatty(self):
        return True


def _files(tmp_path, n=4):
    a = [{"instruction": f"i{k}", "output": "y" * (k + 3), "generator": "a", "dataset": "d"} for k in range(n)]
    b = [{"instruction": f"i{k}", "output": "x" * 4, "generator": "b", "dataset": "d"} for k in range(n)]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    return ["--outputs", str(tmp_path / "a.json"), "--baseline", str(tmp_path / "b.json")]


def test_eval_and_score_with_a_reward_model_show_progress_on_a_terminal(tmp_path, monkeypatch, capsys):
    rm = _reward_model(tmp_path / "rm")
    files = _files(tmp_path)
    assert cli(["eval", *files, "--judge", rm, "--bootstrap", "20"]) == 0  # stderr captured: not a terminal
    assert "eval" not in capsys.readouterr().err
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert cli(["eval", *files, "--judge", rm, "--bootstrap", "20", "--batch-size", "3"]) == 0
    bar = tty.getvalue()
    assert "eval" in bar and "8/8" in bar and "output/s" in bar and "<" in bar  # count, rate, elapsed<ETA
    tty.seek(0), tty.truncate()
    assert cli(["eval", *files, "--judge", rm, "--bootstrap", "20", "--no-progress"]) == 0
    assert "output/s" not in tty.getvalue()  # (transformers' own weight-loading bar may remain)
    samples = _samples(tmp_path, [{"prompt": p, "prompt_id": str(i), "responses": ["a", "bb", "ccc"]}
                                  for i, p in enumerate(["Hello there", "Say hi"])])
    assert cli(["score", "--samples", samples, "--reward-model", rm, "--output", str(tmp_path / "pairs")]) == 0
    bar = tty.getvalue()
    assert "score" in bar and "6/6" in bar and "resp/s" in bar
    tty.seek(0), tty.truncate()
    assert cli(["score", "--samples", samples, "--reward-model", rm, "--output", str(tmp_path / "pairs2"),
                "--no-progress"]) == 0
    assert "resp/s" not in tty.getvalue()


def test_progress_bar_quiet_off_a_terminal(monkeypatch):
    from treg.progress import progress_bar
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(5, "x", "it") as bar:
        bar.update(5)
    assert sys.stderr.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", Tty())
    with progress_bar(5, "x", "it", enabled=False) as bar:
        bar.update(5)
    assert sys.stderr.getvalue() == ""
    with progress_bar(5, "x", "it") as bar:
        bar.update(5)
    assert "5/5" in sys.stderr.getvalue()
