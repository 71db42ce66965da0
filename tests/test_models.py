"""Tests for model references: built-in model, model_dirs and the Hugging Face cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mlx_jupyter.builtin_models import PACKAGED_MODELS, builder
from mlx_jupyter.engine.errors import (
    InvalidModelError,
    ModelLoadError,
    ModelNotFoundError,
)
from mlx_jupyter.engine.models import (
    ModelResolver,
    ModelSpec,
    builtin_model_path,
    cache_dir,
    hf_hub_cache,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every cache at tmp_path so tests never see or touch the user's."""
    monkeypatch.setenv("MLX_JUPYTER_CACHE", str(tmp_path / "mlx-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    return tmp_path


def make_model_folder(folder: Path, weights: bytes = b"w" * 10) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def make_hf_repo(hub: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Lay out a repo as huggingface_hub does: blobs, symlinked snapshot, refs."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def set_ref_main(hub: Path, repo_id: str, commit: str) -> None:
    refs = hub / ("models--" + repo_id.replace("/", "--")) / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(commit)


def read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_cache_dir_prefers_mlx_jupyter_cache_then_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_dir() == tmp_path / "mlx-cache"
    monkeypatch.delenv("MLX_JUPYTER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mlx_jupyter"


def test_hf_hub_cache_follows_huggingface_hub_env_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hf_hub_cache() == tmp_path / "hf-hub"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert hf_hub_cache() == tmp_path / "hf-home" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"


def test_builtin_model_is_created_once_in_versioned_cache_folder(
    tmp_path: Path,
) -> None:
    path = builtin_model_path()
    assert path == tmp_path / "mlx-cache" / "builtin" / "tiny-v2"
    first = (path / "model.safetensors").stat()

    assert builtin_model_path() == path
    again = (path / "model.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert [p.name for p in path.parent.iterdir()] == ["tiny-v2"]


def test_builtin_model_is_byte_identical_in_two_fresh_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_JUPYTER_CACHE", str(tmp_path / "one"))
    one = read_folder(builtin_model_path())
    monkeypatch.setenv("MLX_JUPYTER_CACHE", str(tmp_path / "two"))
    two = read_folder(builtin_model_path())

    assert one == two
    assert set(one) >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert sum(len(b) for b in one.values()) < 1_000_000


def test_a_builtin_model_whose_recipe_cannot_run_is_a_load_error_and_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_text() -> str:
        raise RuntimeError("cannot build builtin:tiny: the stdlib module 'this' is missing")

    monkeypatch.setattr(builder, "_zen_of_python", no_text)

    with pytest.raises(ModelLoadError, match="cannot build builtin:tiny: the stdlib module 'this' is missing"):
        builtin_model_path("tiny")
    assert list((cache_dir() / "builtin").iterdir()) == []


def test_concurrent_builtin_creation_yields_one_complete_copy() -> None:
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(builtin_model_path) for _ in range(6)]
        # result() re-raises, so a thread that mishandled losing the race fails here.
        paths = [future.result(timeout=60) for future in futures]

    assert len(set(paths)) == 1
    assert [p.name for p in paths[0].parent.iterdir()] == ["tiny-v2"]
    assert (paths[0] / "config.json").is_file()


@pytest.mark.parametrize("name", ["tiny", "pydoc", "pydoc-chat"])
def test_builtin_config_matches_its_tokenizer_and_context_length(name: str) -> None:
    path = builtin_model_path(name)
    config = json.loads((path / "config.json").read_text())
    tokenizer = json.loads((path / "tokenizer.json").read_text())

    assert config["model_type"] == "llama"
    assert config["max_position_embeddings"] == {"tiny": 32768, "pydoc": 512, "pydoc-chat": 512}[name]
    assert config["vocab_size"] == len(tokenizer["model"]["vocab"])
    assert tokenizer["decoder"]["type"] == "ByteLevel"


@pytest.mark.parametrize("name", ["tiny", "pydoc", "pydoc-chat"])
def test_builtin_model_loads_and_generates_text_with_mlx_lm(name: str) -> None:
    import mlx_lm
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

    model, tokenizer = mlx_lm.load(str(builtin_model_path(name)))
    assert isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)
    assert tokenizer.eos_token == "<|endoftext|>"

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is beautiful better than ugly?"}],
        add_generation_prompt=True,
    )
    assert tokenizer.decode(prompt).endswith("<|assistant|>\n")

    responses = list(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=8))
    if name == "pydoc-chat":  # trained to end its answers: it may stop first
        assert responses[-1].finish_reason in ("length", "stop")
    else:
        assert responses[-1].finish_reason == "length"
        assert responses[-1].generation_tokens == 8
    text = "".join(r.text for r in responses)
    assert text and text == tokenizer.decode([r.token for r in responses])


def test_resolve_builtin_id_gives_builtin_spec() -> None:
    spec = ModelResolver().resolve("builtin:tiny")

    assert spec == ModelSpec(
        "builtin:tiny",
        builtin_model_path(),
        "builtin",
        (builtin_model_path() / "model.safetensors").stat().st_size,
    )


def test_builtin_pydoc_resolves_to_the_packaged_folder_without_writing_anything(isolated_caches: Path) -> None:
    spec = ModelResolver().resolve("builtin:pydoc")

    assert spec.path == PACKAGED_MODELS / "pydoc"
    assert spec.source == "builtin"
    assert spec.size_bytes == (spec.path / "model.safetensors").stat().st_size > 0
    assert not (isolated_caches / "mlx-cache").exists(), "resolving the packaged model built something"


def test_a_missing_packaged_model_is_a_clear_load_error_and_left_out_of_the_list(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("mlx_jupyter.engine.models.PACKAGED_MODELS", tmp_path / "nothing")

    with pytest.raises(ModelLoadError, match=r"builtin:pydoc.*missing from the package.*train_builtin\.py"):
        ModelResolver().resolve("builtin:pydoc")
    assert [s.id for s in ModelResolver().available()] == ["builtin:tiny"]


def test_a_model_takes_chat_messages_when_it_has_a_chat_template_and_no_completion_mark(tmp_path: Path) -> None:
    make_model_folder(tmp_path / "no-template")
    (make_model_folder(tmp_path / "template") / "tokenizer_config.json").write_text('{"chat_template": "{{ x }}"}')
    (make_model_folder(tmp_path / "jinja") / "chat_template.jinja").write_text("{{ x }}")
    marked = make_model_folder(tmp_path / "marked")
    (marked / "tokenizer_config.json").write_text('{"chat_template": "{{ x }}"}')
    (marked / "config.json").write_text('{"model_type": "llama", "completion_model": true}')
    resolver = ModelResolver([tmp_path])

    chat = {name: resolver.resolve(name).chat for name in ("no-template", "template", "jinja", "marked")}

    assert chat == {"no-template": False, "template": True, "jinja": True, "marked": False}
    assert resolver.resolve("template").to_dict()["chat"] is True


def test_unknown_builtin_name_raises_model_not_found() -> None:
    with pytest.raises(ModelNotFoundError, match="tiny"):
        builtin_model_path("huge")
    with pytest.raises(ModelNotFoundError, match="built-in models are builtin:") as info:
        ModelResolver().resolve("builtin:huge")
    assert info.value.model == "builtin:huge"


def test_plain_name_resolves_to_first_model_dir_holding_it(tmp_path: Path) -> None:
    first = make_model_folder(tmp_path / "a" / "m", weights=b"x" * 7)
    make_model_folder(tmp_path / "b" / "m", weights=b"y" * 99)
    (first / "extra.safetensors").write_bytes(b"z" * 5)
    resolver = ModelResolver([tmp_path / "a", str(tmp_path / "b")])

    assert resolver.resolve("m") == ModelSpec("m", first, "dir", 12, chat=False)  # no chat template


def test_folder_without_config_raises_model_load_error_naming_model(
    tmp_path: Path,
) -> None:
    (tmp_path / "models" / "broken").mkdir(parents=True)
    resolver = ModelResolver([tmp_path / "models"])

    with pytest.raises(ModelLoadError, match=r"'broken'.*no config\.json") as info:
        resolver.resolve("broken")
    assert str(tmp_path / "models" / "broken") in str(info.value)


def test_unknown_id_raises_model_not_found_with_the_model_and_no_rest_route(
    tmp_path: Path,
) -> None:
    resolver = ModelResolver([tmp_path])

    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'") as info:
        resolver.resolve("no-such-model")
    # Each front end adds its own hint (a REST route, or the ids themselves) from the data.
    assert info.value.model == "no-such-model" and info.value.loaded is None
    assert "mlx/api" not in str(info.value)


@pytest.mark.parametrize(
    "model_id",
    ["", "  ", "../x", "/etc", "a/../b", "~x", "a/b/c", "a\\b", "x\0y", ".", ".."],
)
def test_path_like_ids_are_refused_before_touching_disk(tmp_path: Path, model_id: str) -> None:
    # Real models wait at every place these ids could reach if they were followed.
    model_dirs = tmp_path / "dirs" / "inner"
    for target in ("x", "b", "etc", "dirs/inner/~x", "dirs/inner/a/b/c"):
        make_model_folder(tmp_path / target)
    resolver = ModelResolver([model_dirs], hf_cache=tmp_path)

    with pytest.raises(InvalidModelError, match="org/name"):
        resolver.resolve(model_id)


def test_hf_cache_repo_resolves_through_refs_main_with_symlinked_size(
    tmp_path: Path,
) -> None:
    hub = tmp_path / "hf-hub"
    weights = b"\1" * 1234
    make_hf_repo(hub, "org/name", {"config.json": b"{}"}, commit=OLD_COMMIT)
    snapshot = make_hf_repo(hub, "org/name", {"config.json": b"{}", "model.safetensors": weights})
    set_ref_main(hub, "org/name", COMMIT)

    spec = ModelResolver().resolve("org/name")

    assert spec == ModelSpec("org/name", snapshot, "hf-cache", len(weights), chat=False)
    assert (snapshot / "model.safetensors").is_symlink()


def test_hf_cache_repo_without_refs_main_uses_newest_snapshot(
    tmp_path: Path,
) -> None:
    hub = tmp_path / "hf-hub"
    old = make_hf_repo(hub, "org/name", {"config.json": b"{}"}, commit=OLD_COMMIT)
    new = make_hf_repo(hub, "org/name", {"config.json": b"{}"})
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(new, (2_000_000, 2_000_000))

    assert ModelResolver().resolve("org/name").path == new


def test_uncached_repo_without_downloads_raises_model_not_found(
    tmp_path: Path,
) -> None:
    with pytest.raises(ModelNotFoundError, match="allow_downloads") as info:
        ModelResolver(allow_downloads=False).resolve("org/absent")
    assert str(tmp_path / "hf-hub") in str(info.value)
    assert info.value.model == "org/absent"


def test_incomplete_hf_snapshot_raises_model_load_error(tmp_path: Path) -> None:
    make_hf_repo(tmp_path / "hf-hub", "org/name", {"tokenizer.json": b"{}"})

    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        ModelResolver().resolve("org/name")


def test_models_module_never_imports_mlx(tmp_path: Path) -> None:
    # The server process imports this module; MLX belongs in workers only.
    code = (
        "import sys\n"
        "from mlx_jupyter.engine.models import ModelResolver\n"
        "ModelResolver().available()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'mlx', 'mlx_lm'}))"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.strip() == "[]"


def test_available_lists_builtin_then_model_dirs_then_hf_cache(
    tmp_path: Path,
) -> None:
    make_model_folder(tmp_path / "a" / "zeta")
    make_model_folder(tmp_path / "a" / "alpha")
    (tmp_path / "a" / "no-config").mkdir()
    make_model_folder(tmp_path / "b" / "alpha", weights=b"shadowed")
    hub = tmp_path / "hf-hub"
    make_hf_repo(hub, "org/name", {"config.json": b"{}"})
    make_hf_repo(hub, "org/tokenizer-only", {"tokenizer.json": b"{}"})
    resolver = ModelResolver([tmp_path / "a", tmp_path / "b"])

    found = resolver.available()

    assert [(s.id, s.source) for s in found] == [
        ("builtin:pydoc", "builtin"),
        ("builtin:pydoc-chat", "builtin"),
        ("builtin:tiny", "builtin"),
        ("alpha", "dir"),
        ("zeta", "dir"),
        ("org/name", "hf-cache"),
    ]
    assert found[3].path == tmp_path / "a" / "alpha"
    assert all(resolver.resolve(s.id) == s for s in found)
