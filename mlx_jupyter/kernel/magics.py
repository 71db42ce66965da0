"""The ``%%mlx`` cell magic (a prompt, streamed into the output) and the ``%mlx`` line magic."""

from __future__ import annotations

import argparse
import contextlib
import keyword
import re
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, line_cell_magic, magics_class
from traitlets import Bool, CaselessStrEnum, Float, Int, List, Unicode, observe

from mlx_jupyter import __version__
from mlx_jupyter.kernel import client as mlx_client
from mlx_jupyter.kernel.client import ClientError, LocalClient, UnknownModelError, get_client
from mlx_jupyter.kernel.render import (
    FORMATS,
    LiveAnswer,
    MLXResult,
    available_table,
    extract_code,
    health_line,
    loaded_table,
    megabytes,
    parse_json,
)
from mlx_jupyter.kernel.widgets import render_status

# Traits that configure a kernel-hosted engine, named as on MLXExtension.
ENGINE_TRAITS = (
    "idle_timeout",
    "max_loaded_models",
    "memory_limit",
    "model_dirs",
    "allow_downloads",
    "queue_timeout",
    "first_token_timeout",
    "token_timeout",
    "batch_size",
)
DISCOVERY_TRAITS = ("server", "token", "request_timeout")
_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
# {{name}} is an escaped {name}; any other brace (JSON, code, Jinja) is sent as written.
_VARIABLE = re.compile(rf"\{{\{{({_NAME})\}}\}}|\{{({_NAME})\}}")

LINE_HELP = """\
%mlx list                        loaded models (state, memory, idle countdown) and loadable ones
%mlx load [MODEL] [--keep-alive D] load a model now (default: the default model);
                                 D like 10m, 30s, 0, -1 (never unload)
%mlx unload [MODEL]              unload a model once its running requests end
%mlx status                      which host serves this kernel, and the live model dashboard
%mlx reset                       forget the --chat conversation
%mlx version                     the mlx_jupyter version
%mlx help                        this help; %%mlx --help lists the cell options"""


class _ParserExit(Exception):
    """argparse wanted to exit: after --help (message empty) or on an error."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports through exceptions instead of ending the kernel."""

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise _ParserExit(message or "")

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def cell_parser() -> _Parser:
    parser = _Parser(
        prog="%%mlx",
        description="Send the cell to a model as a prompt and stream the answer into the output. "
        "{name} in the cell is replaced by the variable's value ({{name}} sends {name} as written).",
        add_help=True,
    )
    parser.add_argument("-m", "--model", help="model id (default: MLXMagics.default_model, else the host's default)")
    parser.add_argument("--max-tokens", type=int, help="most tokens to generate (default: MLXMagics.max_tokens)")
    parser.add_argument("--temperature", type=float, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-p", type=float, help="nucleus sampling probability mass")
    parser.add_argument("--seed", type=int, help="random seed, for repeatable sampling")
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--system", help="system message")
    parser.add_argument("--chat", action="store_true", help="continue this notebook's conversation (%%mlx reset)")
    parser.add_argument("--raw", action="store_true", help="send the text as a completion prompt, no chat template")
    parser.add_argument("-f", "--format", choices=FORMATS, help="how to render the answer (default: markdown)")
    parser.add_argument("-o", "--output", metavar="VAR", help="also store the result in this variable")
    parser.add_argument("--keep-alive", metavar="DUR", help="keep the model loaded this long after (10m, 30s, -1)")
    parser.add_argument("--no-stream", action="store_true", help="show only the final answer")
    parser.add_argument("--no-interpolate", action="store_true", help="send {name} as written")
    return parser


def line_parser() -> _Parser:
    parser = _Parser(prog="%mlx", description=LINE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    commands.add_parser("list", help="loaded and loadable models")
    load = commands.add_parser("load", help="load a model")
    load.add_argument("model", nargs="?", help="model id (default: the default model)")
    load.add_argument("--keep-alive", metavar="DUR")
    unload = commands.add_parser("unload", help="unload a model")
    unload.add_argument("model", nargs="?", help="model id (default: the default model)")
    for name in ("status", "reset", "version", "help"):
        commands.add_parser(name)
    return parser


def interpolate(text: str, namespace: dict[str, Any]) -> str:
    """Replace ``{name}`` / ``{name.attr}`` by values from ``namespace``; unknown names stay as written."""

    def value(match: re.Match[str]) -> str:
        if match.group(1) is not None:
            return "{" + match.group(1) + "}"
        head, *attrs = match.group(2).split(".")
        if head not in namespace:
            return match.group(0)
        obj = namespace[head]
        for attr in attrs:
            if not hasattr(obj, attr):
                return match.group(0)
            obj = getattr(obj, attr)
        return str(obj)

    return _VARIABLE.sub(value, text)


@magics_class
class MLXMagics(Magics):
    """``%%mlx`` and ``%mlx``; their settings are traits (``%config MLXMagics.default_model = ...``).

    One instance per shell, so the ``--chat`` conversation is per notebook. Every call
    runs on the cell's thread: the stream is read and displayed there, so the kernel's
    interrupt (KeyboardInterrupt) lands in the read and closes the stream.
    """

    default_model = Unicode("", config=True, help="Model for %%mlx when -m is not given; empty = the host's default.")
    max_tokens = Int(512, min=1, config=True, help="Most tokens %%mlx generates when --max-tokens is not given.")
    temperature = Float(None, allow_none=True, config=True, help="Sampling temperature; None = the host's (greedy).")
    top_p = Float(None, allow_none=True, config=True, help="Nucleus sampling mass; None = the host's default.")
    format = CaselessStrEnum(FORMATS, "markdown", config=True, help="How %%mlx renders answers when -f is not given.")
    chat_template = Bool(
        True,
        config=True,
        help="Send the cell as a chat message (the model's chat template applies); False sends raw text, like --raw.",
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
    idle_timeout = Float(
        300.0, min=0.0, config=True, help="Local engine: seconds an idle model stays loaded; 0 = never unload."
    )
    max_loaded_models = Int(
        2, min=1, config=True, help="Local engine: resident models at most (LRU idle one is evicted)."
    )
    memory_limit = Int(0, min=0, config=True, help="Local engine: bytes of model memory at most; 0 = no limit.")
    model_dirs = List(Unicode(), config=True, help="Local engine: folders whose subfolders are loadable models.")
    allow_downloads = Bool(False, config=True, help="Local engine: may a Hugging Face repo id be downloaded.")
    queue_timeout = Float(60.0, config=True, help="Local engine: seconds a request waits for a model slot.")
    first_token_timeout = Float(120.0, config=True, help="Local engine: seconds to the first token before 'hung'.")
    token_timeout = Float(30.0, config=True, help="Local engine: seconds between tokens before 'hung'.")
    batch_size = Int(
        32, min=1, config=True, help="Local engine: sequences a worker decodes together; more wait queued."
    )

    def __init__(self, shell: InteractiveShell, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        self.history: list[dict[str, str]] = []
        self.chat_system: str | None = None
        self._cell_parser = cell_parser()
        self._line_parser = line_parser()
        self._configure_discovery()

    # -- configuration ------------------------------------------------------------

    def local_settings(self) -> dict[str, Any]:
        # Always set, so that clearing default_model takes a running engine back to its own default.
        return {name: getattr(self, name) for name in ENGINE_TRAITS} | {
            "default_model": self.default_model or mlx_client.ENGINE_DEFAULT_MODEL
        }

    def _configure_discovery(self) -> None:
        mlx_client.discovery.server = self.server
        mlx_client.discovery.token = self.token
        mlx_client.discovery.timeout = self.request_timeout
        mlx_client.discovery.local = self.local_settings()

    @observe(*DISCOVERY_TRAITS)
    def _discovery_changed(self, change: dict[str, Any]) -> None:
        self._configure_discovery()
        mlx_client.reset_client()  # the next call looks for its host again

    @observe(*ENGINE_TRAITS, "default_model")
    def _engine_changed(self, change: dict[str, Any]) -> None:
        self._configure_discovery()
        current = mlx_client.current_client()
        if isinstance(current, LocalClient):
            current.reconfigure(**self.local_settings())

    # -- %%mlx and %mlx -----------------------------------------------------------

    @line_cell_magic
    def mlx(self, line: str, cell: str | None = None) -> Any:
        """Ask a local MLX model (``%%mlx --help``), or manage models (``%mlx help``)."""
        try:
            if cell is None:
                return self._line(line)
            return self._cell(line, cell)
        except _ParserExit as done:
            if str(done):
                raise UsageError(str(done).strip()) from None
            return None

    def _line(self, line: str) -> Any:
        args = self._line_parser.parse_args(_split(line))
        command = args.command or "help"
        if command == "help":
            print(LINE_HELP)
        elif command == "version":
            print(f"mlx_jupyter {__version__}")
        elif command == "reset":
            self.history.clear()
            self.chat_system = None
            print("conversation cleared")
        elif command == "status":
            client = get_client()
            print(health_line(client))
            render_status(client)  # the live dashboard; a text snapshot where no widget frontend runs
        elif command == "list":
            client = get_client()
            print(f"loaded ({client.host}):\n{loaded_table(client.models())}\n")
            print(f"available:\n{available_table(client.available())}")
        elif command == "load":
            status = self._with_models_hint(get_client().load, self._model(args.model), args.keep_alive)
            print(f"{status['id']} loaded (pid {status['pid']}, {megabytes(status['memory_bytes'])})")
        elif command == "unload":
            model = self._model(args.model)
            try:
                status = get_client().unload(model)
            except UnknownModelError as exc:  # the host's text points at its REST route; name the loaded ones
                loaded = ", ".join(m["id"] for m in get_client().models()["models"]) or "none"
                raise UnknownModelError(f"model {model!r} is not loaded; loaded: {loaded}", exc.code) from None
            print(f"{status['id']} unloaded")
        return None

    def _model(self, model: str | None) -> str:
        """``model``, else MLXMagics.default_model, else the host's default model."""
        return model or self.default_model or get_client().health()["default_model"]

    def _cell(self, line: str, cell: str) -> None:
        args = self._cell_parser.parse_args(_split(line))
        if args.output is not None and not (args.output.isidentifier() and not keyword.iskeyword(args.output)):
            raise UsageError(f"%%mlx: -o {args.output!r} is not a variable name")
        text = cell.strip()
        if not text:
            raise UsageError("%%mlx: the cell is empty; write the prompt below the %%mlx line")
        if not args.no_interpolate:
            text = interpolate(text, self.shell.user_ns)
        request = self._request(args, text)
        fmt = args.format or self.format
        client = get_client()
        live = LiveAnswer(fmt, not args.no_stream, self.updates_per_second)
        pieces: list[str] = []
        final: dict[str, Any] = {}
        stream = client.generate(request)  # an unknown model is reported by the first next()
        try:
            with contextlib.closing(stream):
                for chunk in stream:
                    pieces.append(chunk.get("text") or "")
                    if chunk.get("finish_reason"):
                        final = chunk
                    else:
                        live.update("".join(pieces))
        except KeyboardInterrupt:
            # The stream is closed already: the host cancels the generation in the worker.
            self._finish(live, args, request, "".join(pieces), {}, fmt, note="interrupted")
            raise
        except UnknownModelError as exc:
            raise self._models_hint(exc) from None
        except ClientError:
            if pieces:  # what arrived before the failure stays visible
                live.update("".join(pieces), force=True)
            raise
        result = self._finish(live, args, request, "".join(pieces), final, fmt)
        if args.chat and result.finish_reason != "cancelled":
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": result.text}]

    def _request(self, args: argparse.Namespace, text: str) -> dict[str, Any]:
        # `is None`, not `or`: --max-tokens 0 is the host's to reject, not a cue for the default.
        max_tokens = self.max_tokens if args.max_tokens is None else args.max_tokens
        request: dict[str, Any] = {"max_tokens": max_tokens}
        model = args.model or self.default_model
        if model:
            request["model"] = model
        for name in ("temperature", "top_p"):
            value = getattr(args, name)
            value = getattr(self, name) if value is None else value
            if value is not None:
                request[name] = value
        for name in ("seed", "stop", "keep_alive"):
            if getattr(args, name) is not None:
                request[name] = getattr(args, name)
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
        elif args.raw or not self.chat_template:
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
        )
        if fmt == "json":
            try:
                result.value = parse_json(text)
            except ValueError as exc:
                note = note or f"not valid JSON ({exc}); shown as text"
        elif fmt == "code":
            result.value = extract_code(text)[0]
        live.finish(result, note)
        if fmt == "code" and result.value and not note:
            self.shell.set_next_input(result.value, replace=False)
        self.shell.user_ns["_mlx"] = result
        if args.output:
            self.shell.user_ns[args.output] = result
        return result

    def _with_models_hint(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except UnknownModelError as exc:
            raise self._models_hint(exc) from None

    def _models_hint(self, exc: UnknownModelError) -> UnknownModelError:
        """The error, with the loadable model ids in place of a pointer to the REST route."""
        try:
            ids = [m["id"] for m in get_client().available()]
        except ClientError:
            return exc
        message = str(exc).split("; list the loadable", 1)[0].split(": see GET", 1)[0]
        return UnknownModelError(f"{message}; available: {', '.join(ids) or 'none'}", exc.code, exc.status)


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot parse the options {line!r}: {exc}") from None


def load_ipython_extension(shell: InteractiveShell) -> None:
    """``%load_ext mlx_jupyter``: register the magics (the client is found on first use)."""
    shell.register_magics(MLXMagics)


def unload_ipython_extension(shell: InteractiveShell) -> None:
    mlx_client.reset_client()
