"""`treg train` with push_to_hub uploads the final files only: the hub API is mocked at the HTTP
boundary (huggingface_hub's httpx client gets a MockTransport); nothing leaves the machine."""

import base64
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_data import write_pairs  # noqa: E402
from test_train_cli import model_dir, run_yaml  # noqa: E402,F401

from treg.cli import main  # noqa: E402

REPO = "someone/treg-push-test"


@pytest.fixture
def hub(monkeypatch):
    import httpx2
    from huggingface_hub.utils import _http
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False, raising=False)
    sent = []

    def handler(request):
        body = request.content.decode("utf-8", "replace")
        sent.append((request.method, str(request.url), body))
        path = request.url.path
        if path.endswith("/api/repos/create"):
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{REPO}", "name": REPO})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                          "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{REPO}/commit/abc",
                                              "commitOid": "a" * 40, "success": True})
        if path.startswith("/api/whoami"):
            return httpx2.Response(200, json={"name": "someone", "type": "user", "auth": {}})
        return httpx2.Response(200, json={})

    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler)))
    yield sent
    _http.set_client_factory(_http.default_client_factory)


def _committed_files(sent) -> dict[str, bytes]:
    files = {}
    for method, url, body in sent:
        if "/commit/" in url:
            for line in body.splitlines():
                item = json.loads(line)
                if item.get("key") == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
    return files


def test_push_to_hub_uploads_only_the_final_files(tmp_path, model_dir, hub):  # noqa: F811
    data = write_pairs(tmp_path / "ann", model_dir[1], n=8)
    cfg = run_yaml(tmp_path, model_dir, data, push_to_hub="true", hub_model_id=REPO, hub_token="hf_fake")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("a file of the user's, not the model's")
    assert main(["train", "--config", cfg]) == 0
    assert hub, "the mocked hub saw no request"
    for method, url, body in hub:
        assert ".final-tmp" not in url and ".final-tmp" not in body, (method, url)
    files = _committed_files(hub)
    local = {p.name for p in (tmp_path / "out").iterdir() if p.is_file()} - {"notes.txt"}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    assert set(files) <= local  # final files only: no temp copy, no checkpoint, not the user's notes
    for name, content in files.items():
        assert (tmp_path / "out" / name).read_bytes() == content, name
