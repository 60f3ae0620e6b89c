"""The backend registry: discovery through entry points and pluggy, then selection.

Discovery runs once per process (:func:`reload_backends` forgets it): every entry point of the
group ``attnplug`` is loaded on its own, so one broken plugin is reported and skipped instead of
breaking the rest. Nothing heavy is imported here: a backend's provider is imported only when
:func:`get_provider` or :func:`resolve_backend` asks for it.

Environment:

- ``ATTNPLUG_STRICT_PLUGINS=1``: a plugin that fails to load is an error, not a warning.
- ``ATTNPLUG_DISABLE_PLUGINS=a,b``: skip the entry points and the backends with these names.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from attnplug import hookspecs
from attnplug._errors import BackendError, ConfigError
from attnplug.backends.base import BackendSpecProvider

if TYPE_CHECKING:
    from attnplug.config import TransformerConfig

__all__ = [
    "Backend",
    "BackendInfo",
    "list_backends",
    "get_provider",
    "resolve_backend",
    "reload_backends",
]

logger = logging.getLogger("attnplug")

ENTRY_POINT_GROUP = "attnplug"
STRICT_ENV = "ATTNPLUG_STRICT_PLUGINS"
DISABLE_ENV = "ATTNPLUG_DISABLE_PLUGINS"
# Backends that ship as separate distributions, installed through the core's extras.
EXTRAS = ("te", "triton", "kitchen")

_NAME = re.compile(r"[a-z][a-z0-9_-]*")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


# -- the record a plugin returns --------------------------------------------------------------
def _check_name(instance: Backend, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"Backend.name={value!r}: expected a lowercase name such as 'te' or 'my_backend' "
            "(letters, digits, '_' and '-', starting with a letter)"
        )
    if value == "auto":
        raise ValueError("Backend.name='auto' is reserved: backend='auto' means 'choose for me'")


def _check_provider(instance: Backend, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, str):
        module, colon, name = value.partition(":")
        if not colon or not _DOTTED.fullmatch(module) or not _DOTTED.fullmatch(name):
            raise ValueError(
                f"Backend.provider={value!r}: a lazy reference must look like "
                "'package.module:Class'"
            )
    elif not callable(value):
        raise ValueError(
            f"Backend.provider={value!r}: expected a 'package.module:Class' string or a "
            "zero-argument callable that returns a BackendSpecProvider"
        )


def _check_priority(instance: Backend, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Backend.priority={value!r}: expected an integer (higher wins 'auto')")


def _check_check(instance: Backend, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not callable(value):
        raise ValueError(
            f"Backend.check={value!r}: expected None or a zero-argument callable returning the "
            "reasons the backend cannot run (an empty list when it can)"
        )


@attrs.frozen
class Backend:
    """One backend a plugin offers.

    ``name`` is what users select (``backend="te"``); ``provider`` is a lazy
    ``"package.module:Class"`` reference or a zero-argument factory returning a
    :class:`BackendSpecProvider`; ``priority`` orders ``backend="auto"`` (higher first);
    ``check()`` returns the reasons the backend cannot run here (an empty list: it can; ``None``:
    it always can). ``check`` must be cheap and must not import the heavy dependency itself
    (``importlib.util.find_spec`` is enough).

    Raises ``ValueError`` naming the field when a value is not accepted.
    """

    name: str = attrs.field(validator=_check_name)
    provider: str | Callable[[], BackendSpecProvider] = attrs.field(validator=_check_provider)
    priority: int = attrs.field(default=0, validator=_check_priority)
    description: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    check: Callable[[], list[str]] | None = attrs.field(default=None, validator=_check_check)


@attrs.frozen
class BackendInfo:
    """What :func:`list_backends` reports about one backend, or one plugin that failed to load.

    ``available`` is true when the backend's ``check()`` passed; ``reasons`` says why not.
    ``error`` is set (and ``available`` false) for a plugin that failed to load; ``priority`` is
    ``None`` when the plugin never said.
    """

    name: str
    distribution: str | None
    version: str | None
    priority: int | None
    available: bool
    reasons: tuple[str, ...] = ()
    error: str | None = None
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        """The ``attnplug backends --json`` object (its keys are public API)."""
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "priority": self.priority,
            "available": self.available,
            "reasons": list(self.reasons),
            "error": self.error,
        }


# -- discovery --------------------------------------------------------------------------------
@attrs.frozen
class _Origin:
    plugin: str
    distribution: str | None
    version: str | None

    def __str__(self) -> str:
        dist = " ".join(p for p in (self.distribution, self.version) if p) or "unknown distribution"
        return f"plugin {self.plugin!r} of {dist}"


@attrs.frozen
class _Registered:
    backend: Backend
    origin: _Origin


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _disabled() -> frozenset[str]:
    names = os.environ.get(DISABLE_ENV, "").split(",")
    return frozenset(n.strip().lower() for n in names if n.strip())


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _origin_of(entry_point: importlib.metadata.EntryPoint) -> _Origin:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return _Origin(entry_point.name, None, None)
    return _Origin(entry_point.name, dist.metadata["Name"], dist.version)


def _core_origin() -> _Origin:
    try:
        version = importlib.metadata.version("attnplug")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return _Origin("local", "attnplug", version)


def _local_plugin() -> Any:
    return importlib.import_module("attnplug.backends.local_plugin")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Discovery:
    """Collects plugins and their backends; each problem becomes a reported ``BackendInfo``."""

    def __init__(self) -> None:
        self.strict = _strict()
        self.disabled = _disabled()
        self.manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.manager.add_hookspecs(hookspecs)
        self.origins: dict[str, _Origin] = {}
        self.unusable: dict[str, BackendInfo] = {}

    def fail(self, origin: _Origin, error: str) -> None:
        if self.strict:
            raise BackendError(
                f"{origin} failed to load: {error} ({STRICT_ENV}=1 makes this fatal; unset it to "
                f"skip the plugin, or set {DISABLE_ENV}={origin.plugin})"
            )
        logger.warning("%s failed to load and is skipped: %s (set %s=%s to silence this)",
                       origin, error, DISABLE_ENV, origin.plugin)
        self.unusable[origin.plugin] = BackendInfo(
            origin.plugin, origin.distribution, origin.version, None, False, error=error
        )

    def mark_disabled(self, name: str, origin: _Origin, priority: int | None) -> None:
        logger.debug("%s: %r is disabled by %s", origin, name, DISABLE_ENV)
        self.unusable[name] = BackendInfo(
            name, origin.distribution, origin.version, priority, False,
            reasons=(f"disabled by {DISABLE_ENV}",),
        )

    def register(self, module: Any, origin: _Origin) -> None:
        key = origin.plugin
        if key in self.origins:  # two distributions with one entry-point name: keep both
            key = f"{origin.plugin}@{origin.distribution}"
        try:
            self.manager.register(module, name=key)
        except Exception as exc:
            self.fail(origin, f"cannot be registered: {_describe(exc)}")
            return
        hooks = {caller.name for caller in self.manager.get_hookcallers(module) or ()}
        unknown = sorted(hooks - {"attnplug_backends"})
        if unknown or not hooks:
            self.manager.unregister(module)
            what = f"unknown hook(s) {', '.join(unknown)}" if unknown else "no hook"
            self.fail(origin, f"implements {what}; a plugin implements attnplug_backends() "
                              "marked with @attnplug.hookimpl")
            return
        self.origins[key] = origin

    def load(self, name: str, loader: Callable[[], Any], origin: _Origin) -> None:
        if name.lower() in self.disabled:
            self.mark_disabled(name, origin, None)
            return
        try:
            plugin = loader()
        except Exception as exc:
            self.fail(origin, _describe(exc))
            return
        self.register(plugin, origin)

    def load_entry_points(self) -> None:
        entry_points = sorted(_entry_points(), key=lambda ep: ep.name)
        for entry_point in entry_points:
            self.load(entry_point.name, entry_point.load, _origin_of(entry_point))
        if not any(entry_point.name == "local" for entry_point in entry_points):
            # A source tree on PYTHONPATH, never installed: no entry points, still a local backend.
            self.load("local", _local_plugin, _core_origin())

    def collect(self) -> dict[str, _Registered]:
        found: dict[str, _Registered] = {}
        for impl in self.manager.hook.attnplug_backends.get_hookimpls():
            origin = self.origins[impl.plugin_name]
            try:
                result = impl.function()
            except Exception as exc:
                self.fail(origin, f"attnplug_backends() raised {_describe(exc)}")
                continue
            if not isinstance(result, (list, tuple)) or not all(
                isinstance(b, Backend) for b in result
            ):
                self.fail(origin, f"attnplug_backends() returned {result!r}; expected a list of "
                                  "attnplug.Backend")
                continue
            for backend in result:
                self.add(found, backend, origin)
        return found

    def add(self, found: dict[str, _Registered], backend: Backend, origin: _Origin) -> None:
        if backend.name in self.disabled:
            self.mark_disabled(backend.name, origin, backend.priority)
            return
        if backend.name in found:
            first = found[backend.name].origin
            raise BackendError(
                f"backend {backend.name!r} is registered twice: by {first} and by {origin}; "
                f"uninstall one of the two distributions, or set {DISABLE_ENV} to the plugin "
                "you do not want"
            )
        found[backend.name] = _Registered(backend, origin)


# -- the registry -----------------------------------------------------------------------------
def _check_reasons(backend: Backend) -> tuple[str, ...]:
    if backend.check is None:
        return ()
    try:
        result = backend.check()
    except Exception as exc:
        return (f"its check() raised {_describe(exc)}",)
    if not isinstance(result, (list, tuple)) or not all(isinstance(r, str) for r in result):
        return (f"its check() returned {result!r}; expected a list of strings",)
    return tuple(result)


def _supports_reasons(provider: BackendSpecProvider, config: Any) -> tuple[str, ...]:
    try:
        result = provider.supports(config)
    except Exception as exc:
        return (f"its supports(config) raised {_describe(exc)}",)
    if not isinstance(result, (list, tuple)) or not all(isinstance(r, str) for r in result):
        return (f"its supports(config) returned {result!r}; expected a list of strings",)
    return tuple(result)


def _make_provider(registered: _Registered) -> BackendSpecProvider:
    backend, origin = registered.backend, registered.origin
    reference = backend.provider
    try:
        if isinstance(reference, str):
            module_name, _, attribute = reference.partition(":")
            factory = getattr(importlib.import_module(module_name), attribute)
        else:
            factory = reference
        provider = factory()
    except Exception as exc:
        shown = reference if isinstance(reference, str) else repr(reference)
        raise BackendError(
            f"backend {backend.name!r} ({origin}) cannot be used: creating its provider "
            f"{shown} failed with {_describe(exc)}"
        ) from exc
    if not isinstance(provider, BackendSpecProvider):
        raise BackendError(
            f"backend {backend.name!r} ({origin}): its provider is {provider!r}, not a "
            "BackendSpecProvider"
        )
    provider.name = backend.name
    return provider


class _Registry:
    def __init__(self, backends: dict[str, _Registered], unusable: dict[str, BackendInfo],
                 plugins: dict[str, _Origin]) -> None:
        self.backends = backends
        self.unusable = unusable
        self.plugins = plugins
        self._reasons: dict[str, tuple[str, ...]] = {}
        self._providers: dict[str, BackendSpecProvider] = {}
        self._logged: set[str] = set()

    def reasons(self, name: str) -> tuple[str, ...]:
        if name not in self._reasons:
            self._reasons[name] = _check_reasons(self.backends[name].backend)
        return self._reasons[name]

    def infos(self) -> list[BackendInfo]:
        infos = []
        for name, registered in self.backends.items():
            backend, origin, reasons = registered.backend, registered.origin, self.reasons(name)
            infos.append(BackendInfo(
                name, origin.distribution, origin.version, backend.priority, not reasons,
                reasons=reasons, description=backend.description,
            ))
        infos.sort(key=lambda info: (-(info.priority or 0), info.name))
        return infos + sorted(self.unusable.values(), key=lambda info: info.name)

    def provider(self, name: str) -> BackendSpecProvider:
        if name not in self.backends:
            raise BackendError(self._unknown(name))
        reasons = self.reasons(name)
        if reasons:
            raise BackendError(
                f"backend {name!r} ({self.backends[name].origin}) cannot run here: "
                + "; ".join(reasons)
            )
        if name not in self._providers:
            self._providers[name] = _make_provider(self.backends[name])
        return self._providers[name]

    def _unknown(self, name: str) -> str:
        if name in self.unusable:
            info = self.unusable[name]
            dist = " ".join(p for p in (info.distribution, info.version) if p)
            why = f"it failed to load: {info.error}" if info.error else "; ".join(info.reasons)
            return f"backend {name!r} ({dist or 'unknown distribution'}) is not available: {why}"
        known = ", ".join(repr(n) for n in sorted(self.backends)) or "none"
        message = f"unknown backend {name!r} (installed backends: {known})"
        plugin = next((o for o in self.plugins.values() if o.plugin == name), None)
        if plugin is not None:
            return f"{message}; {plugin} is installed but registers no backend {name!r} yet"
        if name in EXTRAS:
            return f'{message}; it ships separately: pip install "attnplug[{name}]"'
        close = difflib.get_close_matches(name, list(self.backends), n=1)
        return message + (f"; did you mean {close[0]!r}?" if close else "")

    def resolve(self, config: TransformerConfig) -> BackendSpecProvider:
        name = "kitchen" if config.use_kitchen else config.backend
        if name != "auto":
            provider = self.provider(name).configure(config)
            reasons = _supports_reasons(provider, config)
            if reasons:
                raise BackendError(
                    f"backend {name!r} cannot build this model: " + "; ".join(reasons)
                )
            why = "use_kitchen=true" if config.use_kitchen else f"backend={name!r}"
            self._log_once(f"using backend {name!r} ({why})")
            return provider
        passed_over = []
        for registered in sorted(self.backends.values(),
                                 key=lambda r: (-r.backend.priority, r.backend.name)):
            candidate = registered.backend.name
            try:
                provider = self.provider(candidate).configure(config)
            except (BackendError, ConfigError) as exc:
                passed_over.append(str(exc))
                continue
            except Exception as exc:  # a broken plugin must not take the host down
                passed_over.append(f"backend {candidate!r} failed to configure: "
                                   f"{type(exc).__name__}: {exc}")
                continue
            reasons = _supports_reasons(provider, config)
            if reasons:
                passed_over.append(f"backend {candidate!r} cannot build this model: "
                                   + "; ".join(reasons))
                continue
            skipped = f"; passed over: {' | '.join(passed_over)}" if passed_over else ""
            self._log_once(f"backend='auto' chose {candidate!r} "
                           f"(priority {registered.backend.priority}){skipped}")
            return provider
        raise BackendError("backend='auto' found no backend that can build this model: "
                           + (" | ".join(passed_over) or "no backend is registered"))

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            logger.info(message)


@functools.cache
def _registry() -> _Registry:
    discovery = _Discovery()
    discovery.load_entry_points()
    backends = discovery.collect()
    return _Registry(backends, discovery.unusable, discovery.origins)


# -- the public functions ---------------------------------------------------------------------
def list_backends() -> list[BackendInfo]:
    """Every backend found, then every plugin that failed to load or was disabled.

    Backends come highest priority first. Only ``check()`` is run: no provider is imported.
    Returns a list of :class:`BackendInfo`. Raises ``BackendError`` when two backends share a
    name, or when a plugin fails to load under ``ATTNPLUG_STRICT_PLUGINS=1``.
    """
    return _registry().infos()


def get_provider(name: str) -> BackendSpecProvider:
    """The ready provider of the backend ``name`` (one instance per process).

    Its provider is imported on this first use and its ``name`` set to ``name``. Raises
    ``BackendError`` when ``name`` is unknown (listing the installed backends, and saying which
    ``pip install`` line brings ``te``, ``triton`` or ``kitchen``), when the backend's
    ``check()`` gives reasons, or when its provider cannot be imported or created.
    """
    return _registry().provider(name)


def resolve_backend(config: TransformerConfig) -> BackendSpecProvider:
    """The provider that builds ``config``.

    ``use_kitchen=true`` selects ``kitchen``; ``backend="auto"`` the highest-priority backend
    whose ``check()`` passes and whose provider ``supports(config)``; any other name that
    backend. The choice is logged once (logger ``"attnplug"``, level INFO). Raises
    ``BackendError`` with the reasons when the named backend cannot run or cannot build
    ``config``, or when ``"auto"`` finds no backend that can.
    """
    return _registry().resolve(config)


def reload_backends() -> None:
    """Forget what discovery found; the next call discovers the plugins again (for tests).

    Re-reads ``ATTNPLUG_STRICT_PLUGINS`` and ``ATTNPLUG_DISABLE_PLUGINS``. Returns nothing.
    """
    _registry.cache_clear()
