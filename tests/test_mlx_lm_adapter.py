"""The worker's adapter to mlx and mlx-lm: what it uses is pinned, and a release lacking any of it is named."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import sys
from pathlib import Path

import pytest

from mlx_jupyter.engine import mlx_lm_adapter as lm
from mlx_jupyter.engine.errors import ModelLoadError
from mlx_jupyter.engine.worker import WorkerProcess
from tests.models import TINY

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "mlx_jupyter"


def _check_refusal() -> str:
    with pytest.raises(lm.IncompatibleMLXLM) as info:
        lm.check()
    message = str(info.value)
    import mlx_lm

    assert f"mlx-lm {mlx_lm.__version__}" in message, message
    assert f"pip install 'mlx{lm.MLX_VERSIONS}' 'mlx-lm{lm.MLX_LM_VERSIONS}'" in message, message
    return message


def test_the_installed_mlx_and_mlx_lm_have_everything_the_worker_uses():
    lm.check()


@pytest.mark.parametrize(
    "name", ["mlx_lm.sample_utils.make_sampler", "mlx_lm.generate.BatchGenerator", "mlx.core.get_peak_memory"]
)
def test_a_release_without_a_name_the_worker_uses_is_refused_naming_it(monkeypatch, name):
    module, _, attribute = name.rpartition(".")
    monkeypatch.delattr(importlib.import_module(module), attribute)
    assert f"{name} is missing" in _check_refusal()


def test_a_release_whose_function_lost_a_keyword_is_refused_naming_both(monkeypatch):
    def make_sampler(temp: float = 0.0, min_p: float = 0.0, top_k: int = 0) -> None:  # a stand-in without top_p
        return None

    monkeypatch.setattr("mlx_lm.sample_utils.make_sampler", make_sampler)
    assert "mlx_lm.sample_utils.make_sampler takes no 'top_p' argument" in _check_refusal()


def test_a_release_whose_batch_answers_lack_a_field_is_refused_naming_it(monkeypatch):
    @dataclasses.dataclass
    class Response:  # a stand-in without finish_reason
        uid: int
        token: int
        logprobs: object

    # By object: the package's attribute "generate" is the function, not the module.
    monkeypatch.setattr(importlib.import_module("mlx_lm.generate").GenerationBatch, "Response", Response)
    assert "mlx_lm.generate.GenerationBatch.Response has no 'finish_reason'" in _check_refusal()


def test_a_module_that_cannot_be_imported_is_named_once(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_lm.models.cache", None)
    message = _check_refusal()
    assert message.count("mlx_lm.models.cache cannot be imported") == 1, message


def test_a_worker_whose_mlx_lm_lacks_a_name_fails_to_start_with_a_load_error_naming_it(monkeypatch):
    monkeypatch.setattr(WorkerProcess, "module", "tests.worker_without")
    monkeypatch.setenv("MLX_TEST_WITHOUT", "mlx_lm.generate.BatchGenerator")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    process = WorkerProcess(TINY)
    try:
        with pytest.raises(ModelLoadError, match=r"mlx_lm\.generate\.BatchGenerator is missing.*mlx-lm>="):
            process.spawn(60)
        assert process.proc is not None and process.proc.wait(30) == 1
    finally:
        process.stop()


def _uses_in_source() -> set[tuple[str, str]]:
    """(module, name) for each mlx or mlx-lm name the adapter's code imports or reads off ``mx``."""
    tree = ast.parse(Path(lm.__file__).read_text())
    found = set()
    chains = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("mlx", "mlx_lm"):
            found |= {(node.module, alias.name) for alias in node.names}
        elif isinstance(node, ast.Attribute):
            chain, inner = [], node
            while isinstance(inner, ast.Attribute):
                chain.insert(0, inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "mx":
                chains.append(".".join(chain))
    # mx.random.seed also walks through mx.random: keep the whole chain only.
    found |= {("mlx.core", c) for c in chains if not any(o.startswith(c + ".") for o in chains)}
    return found


def test_every_name_the_adapter_takes_from_mlx_or_mlx_lm_is_in_its_checked_table():
    pinned = {(use.module, use.name) for use in lm.USES}
    used = _uses_in_source()
    assert used, "the source scan found nothing: it is broken"
    assert used <= pinned, f"used but not checked by check(): {sorted(used - pinned)}"


def _imports_mlx(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        if any(n.split(".")[0] in ("mlx", "mlx_lm") for n in names):
            return True
    return False


def test_only_the_adapter_imports_mlx_or_mlx_lm_in_the_package():
    importers = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if _imports_mlx(path))
    assert importers == ["engine/mlx_lm_adapter.py"]


def test_pyproject_requires_the_releases_the_adapter_is_tested_with():
    text = (REPO / "pyproject.toml").read_text()
    specs = re.findall(r'"(mlx(?:\[\w+\])?|mlx-lm)([<>=!~][^";]*)', text)
    assert {name for name, _ in specs} >= {"mlx", "mlx[cpu]", "mlx[cuda13]", "mlx-lm"}, specs
    for name, spec in specs:
        assert spec == (lm.MLX_LM_VERSIONS if name == "mlx-lm" else lm.MLX_VERSIONS), (name, spec)
