"""The ``%%mlx`` cell magic (a prompt, streamed into the output) and the ``%mlx`` line magic."""

from __future__ import annotations

import argparse
import contextlib
import keyword
import re
from typing import Any

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, kwds, magic_arguments
from traitlets import Bool, CaselessStrEnum, Float, Int, Unicode, dlink, observe

from mlx_jupyter import __version__
from mlx_jupyter.engine.request import field_default, field_specs
from mlx_jupyter.engine.settings import EngineSettings, setting_names
from mlx_jupyter.kernel import client as mlx_client
from mlx_jupyter.kernel.arguments import HELP, interpolate, parse_options, split
from mlx_jupyter.kernel.client import (
    ClientCache,
    ClientError,
    Discovery,
    MLXClient,
    UnknownModelError,
    discover,
)
from mlx_jupyter.kernel.render import (
    FORMATS,
    LiveAnswer,
    MLXResult,
    available_table,
    code_to_insert,
    extract_code,
    health_line,
    loaded_table,
    megabytes,
    parse_json,
)
from mlx_jupyter.kernel.widgets import render_status

DISCOVERY_TRAITS = ("server", "token", "request_timeout")
LINE_HELP = """\
%mlx list                        loaded models (state, memory, idle countdown) and loadable ones
%mlx load [MODEL] [--keep-alive D] load a model now (default: the default model);
                                 D like 10m, 30s, 0, -1 (never unload)
%mlx unload [MODEL]              unload a model once its running requests end
%mlx status                      which host serves this kernel, and the live model dashboard
%mlx reset                       forget the --chat conversation
%mlx version                     the mlx_jupyter version
%mlx help                        this help; %%mlx --help lists the cell options"""
# Request fields whose %%mlx default is an MLXMagics trait (when it is set), else the host's.
CELL_DEFAULTS = {"model": "default_model", "max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p"}
# The first line of a %%mlx cell.
CELL_MAGIC = re.compile(r"%%mlx(\s|$)")
# Each has its method, mlx_<name>.
COMMANDS = ("list", "load", "unload", "status", "reset", "version", "help")


def request_arguments(magic: Any) -> Any:
    """The ``%%mlx`` options that set request fields, made from ``GenerationRequest``'s field specs."""
    kinds = {"integer": {"type": int}, "number": {"type": float}}
    for name, spec in reversed(field_specs().items()):  # decorators stack: the first declared is applied last
        if not spec.option:
            continue
        kind = {"action": "append"} if name == "stop" else kinds.get(spec.schema.get("type"), {})
        default = f" (default: MLXMagics.{CELL_DEFAULTS[name]})" if name in CELL_DEFAULTS else ""
        default += " Repeat the option for more." if kind.get("action") == "append" else ""
        magic = argument(*spec.option, dest=name, metavar=spec.metavar, help=spec.help + default, **kind)(magic)
    return magic


@magics_class
class MLXMagics(EngineSettings, Magics):
    """``%%mlx`` and ``%mlx``; their settings are traits (``%config MLXMagics.default_model = ...``).

    One instance per shell, so the ``--chat`` conversation is per notebook, and it owns its
    client, found on first use as the traits say (``server``, ``token``, ...). Every call
    runs on the cell's thread: the stream is read and displayed there, so the kernel's
    interrupt (KeyboardInterrupt) lands in the read and closes the stream.

    The engine's settings are inherited from ``EngineSettings``: they configure an engine
    hosted in this kernel (a server uses its own), which follows them while it runs.
    """

    default_model = Unicode("", config=True, help="Model for %%mlx when -m is not given; empty = the host's default.")
    max_tokens = Int(
        field_default("max_tokens"),
        min=1,
        config=True,
        help="Most tokens %%mlx generates when --max-tokens is not given.",
    )
    temperature = Float(None, allow_none=True, config=True, help="Sampling temperature; None = the host's (greedy).")
    top_p = Float(None, allow_none=True, config=True, help="Nucleus sampling mass; None = the host's default.")
    format = CaselessStrEnum(FORMATS, "markdown", config=True, help="How %%mlx renders answers when -f is not given.")
    chat_template = Bool(
        True,
        config=True,
        help="Send the cell as a chat message (the model's chat template applies); False sends raw text, like "
        "--raw. A model without a chat template, or marked a completion model, always gets raw text.",
    )
    max_history = Int(
        20, min=0, config=True, help="Messages of the --chat conversation sent with each turn (oldest dropped)."
    )
    updates_per_second = Float(
        10.0, min=0.0, config=True, help="Most display updates per second while an answer streams."
    )
    server = Unicode(
        "auto",
        config=True,
        help="""Who serves the models: 'auto' (the Jupyter server that started this kernel,
        from MLX_JUPYTER_SERVER_URL or its runtime file, else an engine in this kernel),
        'local' (always an engine in this kernel) or a server URL. Changing it (or token,
        request_timeout) makes the next call look again; a local engine stops then.""",
    )
    token = Unicode("", config=True, help="Jupyter token for an explicit server URL (default: MLX_JUPYTER_TOKEN).")
    request_timeout = Float(600.0, config=True, help="Seconds a server call, or a pause in a stream, may take.")

    def __init__(self, shell: InteractiveShell, **kwargs: Any) -> None:
        # Before the traits take their configured values: their observers reach the caches.
        self._clients = ClientCache(self._discover)
        self._chat_models: dict[str, bool] = {}  # model id -> takes chat messages, as the host listed it
        super().__init__(shell, **kwargs)
        # A kernel-hosted engine's settings: these traits, followed as they change; only an
        # empty default_model means the engine's own default there.
        self.engine_settings = EngineSettings()
        for name in setting_names():
            transform = (lambda model: model or mlx_client.ENGINE_DEFAULT_MODEL) if name == "default_model" else None
            dlink((self, name), (self.engine_settings, name), transform)
        self.history: list[dict[str, str]] = []
        self.chat_system: str | None = None

    # -- the client ---------------------------------------------------------------

    @property
    def client(self) -> MLXClient:
        """This shell's model host, found on first use (``get_client()`` gives the same)."""
        return self._clients.get()

    def close(self) -> None:
        """Close the client (a local engine stops its workers); the next call looks again."""
        self._clients.reset()
        self._chat_models.clear()

    def _discover(self) -> MLXClient:
        return discover(Discovery(self.server, self.token, self.request_timeout, self.engine_settings))

    @observe(*DISCOVERY_TRAITS)
    def _discovery_changed(self, change: dict[str, Any]) -> None:
        self._clients.reset()  # the next call looks for its host again
        self._chat_models.clear()

    # -- %mlx -------------------------------------------------------------------------

    @magic_arguments(name="mlx")
    @kwds(description=LINE_HELP)
    @HELP
    @argument("command", nargs="?", default="help", choices=COMMANDS, help="what to do (default: help)")
    @argument("args", nargs=argparse.REMAINDER, help="the subcommand's arguments (%%mlx COMMAND --help)")
    @line_magic("mlx")
    def mlx_line(self, line: str) -> None:
        """Manage models (``%mlx help``); each subcommand is the method ``mlx_<subcommand>``."""
        args = parse_options(self.mlx_line, split(line))
        if args is None:
            return
        command = getattr(self, f"mlx_{args.command}")
        options = parse_options(command, args.args)
        if options is not None:
            command(options)

    @magic_arguments(name="mlx help")
    @HELP
    def mlx_help(self, args: argparse.Namespace) -> None:
        """The subcommands of %mlx."""
        print(LINE_HELP)

    @magic_arguments(name="mlx version")
    @HELP
    def mlx_version(self, args: argparse.Namespace) -> None:
        """The mlx_jupyter version."""
        print(f"mlx_jupyter {__version__}")

    @magic_arguments(name="mlx reset")
    @HELP
    def mlx_reset(self, args: argparse.Namespace) -> None:
        """Forget the --chat conversation (and its system message)."""
        self.history.clear()
        self.chat_system = None
        print("conversation cleared")

    @magic_arguments(name="mlx status")
    @HELP
    def mlx_status(self, args: argparse.Namespace) -> None:
        """Which host serves this kernel, its health, and the live model dashboard."""
        client = self.client
        print(health_line(client))
        render_status(client)  # the live dashboard; a text snapshot where no widget frontend runs

    @magic_arguments(name="mlx list")
    @HELP
    def mlx_list(self, args: argparse.Namespace) -> None:
        """Loaded models (state, pid, memory, idle countdown), then the loadable ones."""
        client = self.client
        print(f"loaded ({client.host}):\n{loaded_table(client.models())}\n")
        print(f"available:\n{available_table(client.available())}")

    @magic_arguments(name="mlx load")
    @HELP
    @argument("model", nargs="?", help="model id (default: the default model)")
    @argument("--keep-alive", metavar="DUR", help="keep it loaded this long when idle (10m, 30s, 0, -1 = forever)")
    def mlx_load(self, args: argparse.Namespace) -> None:
        """Load a model now."""
        try:
            status = self.client.load(self._model(args.model), args.keep_alive)
        except UnknownModelError as exc:
            raise self._with_model_ids(exc) from None
        print(f"{status['id']} loaded (pid {status['pid']}, {megabytes(status['memory_bytes'])})")

    @magic_arguments(name="mlx unload")
    @HELP
    @argument("model", nargs="?", help="model id (default: the default model)")
    def mlx_unload(self, args: argparse.Namespace) -> None:
        """Unload a model once its running requests end."""
        try:
            status = self.client.unload(self._model(args.model))
        except UnknownModelError as exc:
            raise self._with_model_ids(exc) from None
        print(f"{status['id']} unloaded")

    def _model(self, model: str | None) -> str:
        """``model``, else MLXMagics.default_model, else the host's default model."""
        return model or self.default_model or self.client.health()["default_model"]

    def _with_model_ids(self, exc: UnknownModelError) -> ClientError:
        """The error with the ids to choose from: the loaded ones, or the loadable ones."""
        try:
            if exc.loaded is not None:
                return exc.with_hint(f"loaded: {', '.join(exc.loaded) or 'none'}")
            ids = [m["id"] for m in self.client.available()]
        except ClientError:
            return exc
        return exc.with_hint(f"available: {', '.join(ids) or 'none'}")

    # -- %%mlx ------------------------------------------------------------------------

    @magic_arguments(name="%mlx")
    @HELP
    @request_arguments
    @argument("--system", metavar="TEXT", help="system message")
    @argument("--chat", action="store_true", help="continue this notebook's conversation (%%mlx reset)")
    @argument("--raw", action="store_true", help="send the text as a completion prompt, no chat template")
    @argument("-f", "--format", choices=FORMATS, metavar="FORMAT", help=f"how to show the answer: {', '.join(FORMATS)}")
    @argument("-o", "--output", metavar="VAR", help="also store the result in this variable")
    @argument("--no-stream", action="store_true", help="show only the final answer")
    @argument("--no-interpolate", action="store_true", help="send {name} as written")
    @cell_magic("mlx")
    def mlx_cell(self, line: str, cell: str) -> None:
        """Send the cell to a model as a prompt and stream the answer into the output.

        {name} in the cell is replaced by the variable's value ({{name}} sends {name} as written).
        The result is kept in _mlx (an MLXResult), and with -o VAR in VAR too. With --logprobs N
        the answer is shown token by token, shaded by probability, with the N most likely
        alternatives on hover, and the result keeps them (_mlx.logprobs).
        """
        args = parse_options(self.mlx_cell, split(line))
        if args is None:
            return
        if args.output is not None and not (args.output.isidentifier() and not keyword.iskeyword(args.output)):
            raise UsageError(f"%%mlx: -o {args.output!r} is not a variable name")
        text = cell.strip()
        if not text:
            raise UsageError("%%mlx: the cell is empty; write the prompt below the %%mlx line")
        if not args.no_interpolate:
            text = interpolate(text, self.shell.user_ns)
        request = self._request(args, text)
        fmt = args.format or self.format
        client = self.client
        live = LiveAnswer(fmt, not args.no_stream, self.updates_per_second)
        pieces: list[str] = []
        # Text may be held back (stop strings, partial UTF-8) while its tokens' entries are
        # not: the entries, joined over the stream, are the answer's tokens in order.
        entries: list[dict[str, Any]] | None = [] if request.get("logprobs") else None
        final: dict[str, Any] = {}
        # Asked now, while the host answers: an interrupt may come because it stopped answering.
        model = self._model_of(request)
        stream = client.generate(request)  # an unknown model is reported by the first next()
        try:
            with contextlib.closing(stream):
                for chunk in stream:
                    pieces.append(chunk.get("text") or "")
                    if entries is not None:
                        entries += chunk.get("logprobs") or []
                    if chunk.get("finish_reason"):
                        final = chunk
                    else:
                        live.update("".join(pieces))
        except KeyboardInterrupt:
            # The stream is closed already: the host cancels the generation in the worker. The
            # footer says what was shown (a chunk is a token) and "interrupted"; the cell still
            # fails, so Run All stops, but with one line instead of a traceback into the client.
            shown = {"model": model, "usage": {"completion_tokens": len(pieces)}}
            self._finish(live, args, request, "".join(pieces), shown, fmt, entries)
            raise _quiet_interrupt() from None
        except UnknownModelError as exc:
            raise self._with_model_ids(exc) from None
        except ClientError:
            if pieces:  # what arrived before the failure stays visible
                live.update("".join(pieces), force=True)
            raise
        result = self._finish(live, args, request, "".join(pieces), final, fmt, entries)
        if args.chat and result.finish_reason != "cancelled":
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": result.text}]

    def _takes_chat(self, model: str | None) -> bool:
        """Whether ``model`` (None: the host's default) takes chat messages, as the host's list of
        models says; a model it does not list gets them (the host then says what is wrong)."""
        model = model or self.client.health()["default_model"]
        if model not in self._chat_models:
            self._chat_models.update({m["id"]: bool(m.get("chat", True)) for m in self.client.available()})
        return self._chat_models.get(model, True)

    def _model_of(self, request: dict[str, Any]) -> str:
        """The model a request went to: its own, else the host's default (empty if the host cannot say)."""
        try:
            return request.get("model") or self.client.health()["default_model"]
        except (ClientError, KeyError):
            return ""

    def _request(self, args: argparse.Namespace, text: str) -> dict[str, Any]:
        # Each request option, else this instance's trait of that name (MLXMagics.max_tokens,
        # .temperature, .top_p; .default_model for the model), else the host's default.
        # `is None`, not `or`: --max-tokens 0 is the host's to reject, not a cue for the default.
        request: dict[str, Any] = {}
        for name, spec in field_specs().items():
            if not spec.option:
                continue
            value = getattr(args, name)
            if value is None and name in CELL_DEFAULTS:
                value = getattr(self, CELL_DEFAULTS[name]) or None
            if value is not None:
                request[name] = value
        if "top_logprobs" in request:  # --logprobs 0: each token's probability, no alternatives
            request["logprobs"] = True
        if args.chat and args.raw:
            raise UsageError("%%mlx: --chat and --raw do not go together (a conversation needs the chat template)")
        if args.chat:
            if args.system is not None:
                self.chat_system = args.system
            system = [{"role": "system", "content": self.chat_system}] if self.chat_system else []
            history = self.history[-self.max_history :] if self.max_history > 0 else []
            if history and history[0]["role"] == "assistant":
                history = history[1:]  # an odd max_history cut a turn; strict chat templates need user first
            request["messages"] = [*system, *history, {"role": "user", "content": text}]
        elif args.raw or not self.chat_template or not self._takes_chat(request.get("model")):
            request["prompt"] = f"{args.system}\n\n{text}" if args.system else text
        else:
            system = [{"role": "system", "content": args.system}] if args.system else []
            request["messages"] = [*system, {"role": "user", "content": text}]
        return request

    def _finish(
        self,
        live: LiveAnswer,
        args: argparse.Namespace,
        request: dict[str, Any],
        text: str,
        final: dict[str, Any],
        fmt: str,
        logprobs: list[dict[str, Any]] | None,
        note: str = "",
    ) -> MLXResult:
        prompt = request.get("prompt") or request["messages"][-1]["content"]
        result = MLXResult(
            text=text,
            model=final.get("model") or request.get("model") or "",
            finish_reason=final.get("finish_reason") or "cancelled",
            usage=final.get("usage") or {},
            timings=final.get("timings") or {},
            format=fmt,
            value=text,
            prompt=prompt,
            logprobs=logprobs,
        )
        if fmt == "json":
            try:
                result.value = parse_json(text)
            except ValueError as exc:
                note = note or f"not valid JSON ({exc}); shown as text"
        code = None
        if fmt == "code":
            result.value = extract_code(text)[0]
            code = code_to_insert(text)
            if code is None and not note:
                note = "no code in the answer: no cell inserted"
        live.finish(result, note)
        if code and not note:
            self.shell.set_next_input(code, replace=False)
        self.shell.user_ns["_mlx"] = result
        if args.output:
            self.shell.user_ns[args.output] = result
        return result


def _quiet_interrupt() -> KeyboardInterrupt:
    """A KeyboardInterrupt that IPython shows as its name alone (``_render_traceback_``), no traceback."""
    exc = KeyboardInterrupt()
    exc._render_traceback_ = lambda: ["KeyboardInterrupt"]  # type: ignore[attr-defined]
    return exc


def help_without_body(lines: list[str]) -> list[str]:
    """An input transformer: ``%%mlx --help`` with an empty body gets a blank body line.

    IPython refuses a cell magic whose body is empty before the magic runs ("the cell body
    is empty"), so without this the help option could not be reached that way.
    """
    if not lines or not CELL_MAGIC.match(lines[0]) or "".join(lines[1:]).strip():
        return lines
    if not {"-h", "--help"}.intersection(lines[0].split()[1:]):
        return lines
    return [lines[0].rstrip("\n") + "\n", "\n"]


def load_ipython_extension(shell: InteractiveShell) -> None:
    """``%load_ext mlx_jupyter``: register the magics (the client is found on first use)."""
    shell.register_magics(MLXMagics)
    if help_without_body not in shell.input_transformers_cleanup:
        shell.input_transformers_cleanup.append(help_without_body)


def unload_ipython_extension(shell: InteractiveShell) -> None:
    if help_without_body in shell.input_transformers_cleanup:
        shell.input_transformers_cleanup.remove(help_without_body)
    magics = shell.magics_manager.registry.get("MLXMagics")
    if magics is not None:
        magics.close()
