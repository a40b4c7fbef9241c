"""treg/method/templates.py: shipped templates, placeholder validation, rendering."""
import pytest

from treg.errors import TregError
from treg.method.templates import load_template, parse_template, render


def test_shipped_templates_render():
    rev = load_template("revision")
    assert rev.mode == "revision" and "more helpful" in rev.text
    better, worse = render(rev, query="What is {2+2}?", draft="It is 4.")
    assert better[-1]["content"] != worse[-1]["content"]
    for msgs in (better, worse):
        assert "What is {2+2}?" in msgs[-1]["content"] and "It is 4." in msgs[-1]["content"]
    assert "less helpful, incorrect, incoherent and verbose" in worse[-1]["content"]
    ins = load_template("instruction")
    better, worse = render(ins, query="Hi")
    assert better[-1] == {"role": "user", "content": "Hi"} and better[0]["role"] == "system"
    assert better[0]["content"] != worse[0]["content"]


BAD = {
    "unknown placeholder {answer}": "mode: instruction\nbetter: [{role: user, content: '{query} {answer}'}]\n"
                                    "worse: [{role: user, content: '{query}'}]\n",
    "unknown placeholder {draft}": "mode: instruction\nbetter: [{role: user, content: '{query} {draft}'}]\n"
                                   "worse: [{role: user, content: '{query}'}]\n",
    "missing placeholder {draft}": "mode: revision\nbetter: [{role: user, content: '{query} {draft}'}]\n"
                                   "worse: [{role: user, content: '{query}'}]\n",
    "bad braces": "mode: instruction\nbetter: [{role: user, content: '{query'}]\n"
                  "worse: [{role: user, content: '{query}'}]\n",
    "mode must be": "mode: other\nbetter: [{role: user, content: '{query}'}]\n"
                    "worse: [{role: user, content: '{query}'}]\n",
}


@pytest.mark.parametrize("msg", list(BAD))
def test_bad_templates_name_file_and_placeholder(tmp_path, msg):
    path = tmp_path / "mine.yaml"
    path.write_text(BAD[msg])
    with pytest.raises(TregError, match=msg.replace("{", r"\{").replace("}", r"\}")) as info:
        load_template(str(path))
    assert info.value.file == str(path)


def test_literal_braces_and_missing_file():
    t = parse_template("mode: instruction\nbetter: [{role: user, content: '{{x}} {query}'}]\n"
                       "worse: [{role: user, content: '{query}'}]\n")
    assert render(t, query="q")[0][0]["content"] == "{x} q"
    with pytest.raises(TregError, match="no such template"):
        load_template("nope.yaml")
