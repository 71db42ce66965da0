"""Model references: the built-in models, model_dirs folders, the HF cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_jupyter.builtin_models import PACKAGED_MODELS
from mlx_jupyter.builtin_models.builder import write_tiny
from mlx_jupyter.engine.errors import (
    InvalidModelError,
    ModelLoadError,
    ModelNotFoundError,
)

BUILTIN_PREFIX = "builtin:"
# The model a request gets when it names none: trained to answer questions, small, shipped in the package.
DEFAULT_MODEL = "builtin:pydoc-chat"

_ID_RULES = "model ids are 'builtin:NAME', a folder name under model_dirs, or a Hugging Face repo id 'org/name'"
_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Longer ids cannot name anything: checked before the filesystem says ENAMETOOLONG.
_NAME_MAX_BYTES = 255  # one file name, on every common filesystem
_HF_REPO_ID_MAX = 96  # Hugging Face's own bound on a repo id
_COMMIT_RE = re.compile(r"^[0-9a-fA-F]+$")
# mlx-lm's own download patterns: everything it loads and nothing else.
_DOWNLOAD_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]


@dataclass(frozen=True)
class ModelSpec:
    """A loadable model.

    Args:
        id: The model id as the user writes it (``builtin:tiny``, ``my-model``,
            ``org/name``).
        path: Folder with ``config.json``, the weights and the tokenizer.
        source: ``"builtin"``, ``"dir"`` or ``"hf-cache"``.
        size_bytes: Sum of the weight files' sizes; used for memory accounting.
        chat: Whether the model takes chat messages: it has a chat template and its
            ``config.json`` does not mark it ``"completion_model": true``.
    """

    id: str
    path: Path
    source: str
    size_bytes: int
    chat: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The shape of ``GET mlx/api/models/available`` entries."""
        return {
            "id": self.id,
            "source": self.source,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "chat": self.chat,
        }


def cache_dir() -> Path:
    """Where mlx-jupyter keeps files it creates, such as the built-in models."""
    if explicit := os.environ.get("MLX_JUPYTER_CACHE"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "mlx_jupyter"
    return Path.home() / ".cache" / "mlx_jupyter"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, found by huggingface_hub's own rule."""
    # Read the environment on each call rather than huggingface_hub.constants,
    # which freezes it at import time.
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if hub:
        return Path(os.path.expandvars(hub)).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(home)).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.path.expandvars(xdg)).expanduser() / "huggingface" / "hub"


def builtin_model_path(name: str = "tiny") -> Path:
    """Return the folder of built-in model ``name``.

    ``pydoc`` and ``pydoc-chat`` ship trained inside the package and are only read. ``tiny`` is
    built on first use in the cache, atomically: it is written to a temporary
    folder beside its final place and renamed; when another thread or process
    wins that race, its copy is used. Its folder name carries a version, so a
    changed recipe builds a fresh copy instead of reusing a stale one.
    """
    if name in _PACKAGED:
        target = PACKAGED_MODELS / name
        if not (target / "config.json").is_file():
            raise ModelLoadError(
                f"built-in model 'builtin:{name}' is missing from the package ({target} has no config.json); "
                f"reinstall mlx-jupyter or regenerate it with scripts/{_PACKAGED[name]}"
            )
        return target
    if name not in _BUILTINS:
        known = ", ".join(sorted(BUILTIN_NAMES))
        raise ModelNotFoundError(f"unknown built-in model {name!r}; built-in models: {known}")
    folder_name, write = _BUILTINS[name]
    target = cache_dir() / "builtin" / folder_name
    if not (target / "config.json").is_file():
        try:
            create_atomically(target, write)
        except RuntimeError as exc:  # the recipe's own ingredients are missing
            raise ModelLoadError(str(exc)) from exc
    return target


def create_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Have ``write`` fill a temporary folder, then rename it to ``target`` in one step."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        # mkdtemp makes the folder private; the finished model is ordinary cache.
        tmp.chmod(0o755)
        os.rename(tmp, target)
    except OSError:
        # rename fails when the target already exists: someone else finished first.
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ModelResolver:
    """Turns model ids into loadable folders.

    Ids are checked before any file is touched, so a request can never name a
    path outside ``model_dirs`` and the Hugging Face cache. ``resolve`` may
    download (when ``allow_downloads``), so never call it while holding a lock.
    """

    def __init__(
        self,
        model_dirs: Sequence[str | os.PathLike[str]] = (),
        allow_downloads: bool = False,
        hf_cache: Path | None = None,
    ) -> None:
        self._model_dirs = [Path(d).expanduser() for d in model_dirs]
        self._allow_downloads = allow_downloads
        self._hf_cache = hf_cache if hf_cache is not None else hf_hub_cache()

    def resolve(self, model_id: str) -> ModelSpec:
        """Return the model ``model_id`` names.

        Raises:
            InvalidModelError: The id looks like a path.
            ModelNotFoundError: No model has this id.
            ModelLoadError: The folder exists but holds no ``config.json``, or a
                download failed.
        """
        _check_model_id(model_id)
        if model_id.startswith(BUILTIN_PREFIX):
            return self._resolve_builtin(model_id)
        if "/" in model_id:
            return self._resolve_hf(model_id)
        return self._resolve_dir(model_id)

    def available(self) -> list[ModelSpec]:
        """Every model ``resolve`` accepts without downloading.

        Built-in models first, then ``model_dirs`` folders, then the Hugging Face
        cache, each group sorted by id.
        """
        builtins = list(self._builtin_models())
        dirs = sorted(self._dir_models(), key=lambda s: s.id)
        hf = sorted(self._hf_models(), key=lambda s: s.id)
        return builtins + dirs + hf

    def _resolve_builtin(self, model_id: str) -> ModelSpec:
        name = model_id[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_NAMES:
            known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES)
            raise ModelNotFoundError(f"unknown model {model_id!r}: built-in models are {known}", model=model_id)
        return _spec(model_id, builtin_model_path(name), "builtin")

    def _resolve_dir(self, model_id: str) -> ModelSpec:
        folders = [d / model_id for d in self._model_dirs if (d / model_id).is_dir()]
        for folder in folders:
            if (folder / "config.json").is_file():
                return _spec(model_id, folder, "dir")
        if folders:
            raise ModelLoadError(
                f"model {model_id!r} has no config.json at {folders[0]}; "
                "a model folder needs config.json, the weights and the tokenizer"
            )
        raise ModelNotFoundError(
            f"unknown model {model_id!r}: no folder of that name in model_dirs "
            f"({_describe_dirs(self._model_dirs)}) and it is neither a built-in "
            "model nor a Hugging Face repo id",
            model=model_id,
        )

    def _resolve_hf(self, repo_id: str) -> ModelSpec:
        snapshot = _hf_snapshot(self._hf_cache, repo_id)
        if snapshot is not None and (snapshot / "config.json").is_file():
            return _spec(repo_id, snapshot, "hf-cache")
        if self._allow_downloads:
            return _spec(repo_id, self._download(repo_id), "hf-cache")
        if snapshot is not None:
            raise ModelLoadError(
                f"model {repo_id!r} has no config.json at {snapshot}; the cached "
                "snapshot is incomplete and downloads are disabled (allow_downloads)"
            )
        raise ModelNotFoundError(
            f"unknown model {repo_id!r}: it is not in the local Hugging Face cache "
            f"({self._hf_cache}) and downloads are disabled (allow_downloads)",
            model=repo_id,
        )

    def _download(self, repo_id: str) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            path = snapshot_download(repo_id, allow_patterns=_DOWNLOAD_PATTERNS, cache_dir=self._hf_cache)
        except RepositoryNotFoundError as exc:
            raise ModelNotFoundError(
                f"unknown model {repo_id!r}: no such Hugging Face repo, or it is gated or private ({exc})",
                model=repo_id,
            ) from exc
        except Exception as exc:
            # Network, auth and disk failures all surface as the hub's own message.
            raise ModelLoadError(f"downloading {repo_id!r} failed: {exc}") from exc
        if not (Path(path) / "config.json").is_file():
            raise ModelLoadError(f"model {repo_id!r} has no config.json at {path}; it is not a model mlx-lm can load")
        return Path(path)

    def _builtin_models(self) -> Iterator[ModelSpec]:
        for name in BUILTIN_NAMES:
            try:
                path = builtin_model_path(name)
            except ModelLoadError:
                # A damaged install must not break the listing; resolve() says what is wrong.
                continue
            yield _spec(BUILTIN_PREFIX + name, path, "builtin")

    def _dir_models(self) -> Iterator[ModelSpec]:
        seen: set[str] = set()
        for model_dir in self._model_dirs:
            for folder in _subfolders(model_dir):
                # The first model_dirs entry wins, as in resolve().
                if folder.name in seen or not (folder / "config.json").is_file():
                    continue
                seen.add(folder.name)
                yield _spec(folder.name, folder, "dir")

    def _hf_models(self) -> Iterator[ModelSpec]:
        for repo_dir in _subfolders(self._hf_cache):
            if not repo_dir.name.startswith("models--"):
                continue
            repo_id = repo_dir.name.removeprefix("models--").replace("--", "/", 1)
            if not _HF_REPO_RE.match(repo_id):
                continue
            snapshot = _hf_snapshot(self._hf_cache, repo_id)
            if snapshot is not None and (snapshot / "config.json").is_file():
                yield _spec(repo_id, snapshot, "hf-cache")


def _check_model_id(model_id: str) -> None:
    """Refuse ids that look like paths or are too long to name a folder, before anything touches the disk."""
    reason = _path_like_reason(model_id) or _length_reason(model_id)
    if reason:
        raise InvalidModelError(f"invalid model id {model_id!r}: {reason}; {_ID_RULES}")


def _path_like_reason(model_id: str) -> str | None:
    if not isinstance(model_id, str):
        return "it is not a string"
    if not model_id.strip():
        return "it is empty"
    if "\x00" in model_id or "\\" in model_id:
        return "it contains a NUL or a backslash"
    if model_id.startswith(("/", "~")) or os.path.isabs(model_id):
        return "it is a path"
    if model_id.count("/") > 1:
        return "it has more than one '/'"
    if any(part in (".", "..") for part in model_id.split("/")):
        return "it has a '.' or '..' path segment"
    if "/" in model_id and not _HF_REPO_RE.match(model_id):
        return "it is not a valid Hugging Face repo id"
    return None


def _length_reason(model_id: str) -> str | None:
    if "/" in model_id and len(model_id) > _HF_REPO_ID_MAX:
        return f"it is {len(model_id)} characters long; a Hugging Face repo id has at most {_HF_REPO_ID_MAX}"
    size = len(model_id.encode("utf-8", "surrogatepass"))
    if size > _NAME_MAX_BYTES:
        return f"it is {size} bytes long; a folder name under model_dirs has at most {_NAME_MAX_BYTES}"
    return None


def _hf_snapshot(hf_cache: Path, repo_id: str) -> Path | None:
    """The snapshot ``refs/main`` points at, else the newest one, else None."""
    repo_dir = hf_cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    try:
        commit = (repo_dir / "refs" / "main").read_text().strip()
    except OSError:
        commit = ""
    if _COMMIT_RE.match(commit) and (snapshots / commit).is_dir():
        return snapshots / commit
    candidates = list(_subfolders(snapshots))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _subfolders(folder: Path) -> Iterator[Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return
    yield from (entry for entry in entries if entry.is_dir())


def _spec(model_id: str, path: Path, source: str) -> ModelSpec:
    return ModelSpec(model_id, path, source, _weights_size(path), _takes_chat(path))


def _takes_chat(folder: Path) -> bool:
    """A chat template (in ``tokenizer_config.json`` or a file of its own), and no completion mark."""
    if _read_json(folder / "config.json").get("completion_model") is True:
        return False
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    return bool(_read_json(folder / "tokenizer_config.json").get("chat_template"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _weights_size(folder: Path) -> int:
    # stat() follows symlinks, so HF cache snapshots count their blobs' sizes.
    return sum(p.stat().st_size for p in folder.glob("*.safetensors") if p.is_file())


def _describe_dirs(dirs: Sequence[Path]) -> str:
    return ", ".join(str(d) for d in dirs) if dirs else "none configured"


# Built in the cache on first use: name -> (versioned folder name, writer); bump the
# version when a recipe changes.
_BUILTINS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "tiny": ("tiny-v2", write_tiny),
}
# Shipped trained in PACKAGED_MODELS: name -> the script that trains it.
_PACKAGED = {"pydoc": "train_builtin.py", "pydoc-chat": "train_builtin_chat.py"}
BUILTIN_NAMES = ("pydoc", "pydoc-chat", "tiny")
