"""EngineSettings: every engine setting, declared once with its help; both hosts inherit them."""

from __future__ import annotations

from traitlets import Bool, Float, Int, List, TraitType, Unicode
from traitlets.config import Configurable

from mlx_jupyter.engine.field_checks import Limits
from mlx_jupyter.engine.models import DEFAULT_MODEL


class EngineSettings(Configurable):
    """The engine's settings as traits.

    The server extension (``c.MLXExtension.<name>``) and the kernel's magics
    (``c.MLXMagics.<name>``, ``%config MLXMagics.<name> = ...``) inherit these traits, and
    the ``WorkerManager`` they host reads them from that object at each decision, so a
    changed value reaches a running engine.
    """

    idle_timeout = Float(
        300.0,
        min=0.0,
        config=True,
        help="""Seconds a model may stay idle (no request running) before it is unloaded and
        its worker process exits; 0 keeps models loaded until they are evicted or unloaded by
        hand. A request's ``keep_alive`` overrides it for that model. A new value applies to
        models already idle.""",
    )
    max_loaded_models = Int(
        2,
        min=1,
        config=True,
        help="""Resident models at most. Loading one more evicts the least recently used idle
        model; a busy model is never evicted (the request waits ``queue_timeout``).""",
    )
    memory_limit = Int(
        0,
        min=0,
        config=True,
        help="""Bytes of model memory at most (0 = no limit), counted from the size of a model's
        weights before its load starts (a load in progress counts). On Linux it also bounds
        what a load may allocate.""",
    )
    model_dirs = List(
        Unicode(),
        config=True,
        help="""Directories whose subfolders holding a ``config.json`` are loadable models; a
        model's id is its folder name.""",
    )
    default_model = Unicode(DEFAULT_MODEL, config=True, help="""Model used when a request names none.""")
    allow_downloads = Bool(
        False,
        config=True,
        help="""May a Hugging Face repo id that is not in the local Hugging Face cache be
        downloaded when a request asks for it.""",
    )
    queue_timeout = Float(
        60.0,
        min=0.0,
        config=True,
        help="""Seconds a request waits for a model slot while every resident model is busy
        (and, on the server, for a request thread), before it fails with 503 and a
        Retry-After header.""",
    )
    spawn_timeout = Float(
        60.0,
        min=0.0,
        config=True,
        help="""Seconds a worker process may take to start (Python up, mlx imported).""",
    )
    load_timeout = Float(
        300.0,
        min=0.0,
        config=True,
        help="""Seconds a worker may take to load a model (weights read, model built) before it
        is killed and the load fails.""",
    )
    first_token_timeout = Float(
        120.0,
        min=0.0,
        config=True,
        help="""Seconds a worker may take to produce the first token of a request (prompt
        processing included) before it is killed as hung.""",
    )
    token_timeout = Float(
        30.0,
        min=0.0,
        config=True,
        help="""Seconds a worker may take between two tokens before it is killed as hung.""",
    )
    unload_timeout = Float(
        60.0,
        min=0.0,
        config=True,
        help="""Seconds an unload waits for the model's running requests to end; then it fails
        with ``unload_pending`` (409) and the model unloads when they end.""",
    )
    watchdog_threshold = Float(
        10.0,
        min=0.0,
        config=True,
        help="""Seconds an engine lock may be waited on or held before every thread's stack is
        logged and health turns ``degraded`` (until the stall ends).""",
    )
    max_tokens_limit = Int(
        0,
        min=0,
        config=True,
        help="""The largest ``max_tokens`` a request may ask for; 0 = no bound of the host's own
        (the model's context bounds it, as always).""",
    )
    max_prompt_chars = Int(
        1_000_000,
        min=1,
        config=True,
        help="""The longest prompt (all messages together), in characters, a request may send.""",
    )
    batch_size = Int(
        32,
        min=1,
        config=True,
        help="""Sequences one worker decodes together. More concurrent requests to the model
        wait in arrival order, queued, until a sequence ends; their first-token deadline
        starts only when they get a place in the batch.""",
    )
    warm_spare = Bool(
        True,
        config=True,
        help="""Keep one spare worker process started (Python up, mlx and mlx_lm imported) so
        that loading a model skips process start-up; it is replaced in the background after a
        load takes it. Costs one idle process (about 80 MB resident on Linux).""",
    )

    def request_limits(self) -> Limits:
        """The bounds a request is checked against."""
        return Limits(max_tokens=self.max_tokens_limit, max_prompt_chars=self.max_prompt_chars)


def setting_names() -> list[str]:
    """Every engine setting's name, in declaration order."""
    return [name for name, value in vars(EngineSettings).items() if isinstance(value, TraitType)]


def settings_table() -> str:
    """The README's table of engine settings, made from the traits: name, default, first sentence of help."""
    defaults = EngineSettings().trait_defaults(*setting_names())
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for name in setting_names():
        default = defaults[name]
        if isinstance(default, float):
            shown = f"{default:g}"
        else:
            shown = f"`{default}`" if isinstance(default, (str, list)) else str(default)
        help_text = " ".join(getattr(EngineSettings, name).help.split()).replace("``", "`")
        rows.append(f"| `{name}` | {shown} | {help_text.split('. ')[0].rstrip('.')} |")
    return "\n".join(rows) + "\n"
