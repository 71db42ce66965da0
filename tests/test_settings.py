"""Every engine setting is declared once: the hosts inherit it, the README's table is made from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from traitlets import TraitError

from mlx_jupyter.engine.settings import EngineSettings, setting_names, settings_table
from mlx_jupyter.server.app import MLXExtension

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_table_of_settings_is_the_one_made_from_the_traits():
    assert settings_table() in README.read_text(encoding="utf-8"), (
        "README.md's Configuration table differs from the traits; it should read:\n" + settings_table()
    )


def test_the_server_extension_inherits_every_engine_setting_and_declares_none_again():
    for name in setting_names():
        assert getattr(MLXExtension, name) is getattr(EngineSettings, name), f"MLXExtension declares {name} again"


@pytest.mark.parametrize(("name", "value"), [("max_loaded_models", 0), ("idle_timeout", -1), ("batch_size", 0)])
def test_a_setting_out_of_its_range_is_refused_when_it_is_set(name, value):
    with pytest.raises(TraitError):
        EngineSettings(**{name: value})


@pytest.fixture
def mlx_config(mlx_config):
    return mlx_config | {"max_loaded_models": 3, "unload_timeout": 7.5, "watchdog_threshold": 4.0}


def test_c_mlxextension_settings_reach_the_servers_engine(jp_serverapp):
    manager = jp_serverapp.web_app.settings["mlx_manager"]
    assert manager.settings.max_loaded_models == 3
    assert manager.settings.unload_timeout == 7.5
    assert manager.settings.watchdog_threshold == 4.0


def test_the_magics_inherit_every_engine_setting_but_their_own_default_model():
    from mlx_jupyter.kernel.magics import MLXMagics

    for name in setting_names():
        if name != "default_model":  # theirs: empty means the host's default
            assert getattr(MLXMagics, name) is getattr(EngineSettings, name), f"MLXMagics declares {name} again"


def test_config_reaches_a_running_kernel_engine(shell):
    from mlx_jupyter.kernel.client import get_client

    manager = get_client().manager
    shell.run_line_magic("config", "MLXMagics.queue_timeout = 12.5")
    shell.run_line_magic("config", "MLXMagics.model_dirs = ['/nowhere']")
    assert manager.settings.queue_timeout == 12.5
    assert [str(d) for d in manager.resolver._model_dirs] == ["/nowhere"], "the engine's model sources follow"
    shell.run_line_magic("config", "MLXMagics.default_model = ''")
    assert manager.default_model == EngineSettings.default_model.default_value
