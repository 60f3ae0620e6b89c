"""Module specs: plain data that says which class builds a part of the model, and with what.

A spec tree is cheap to make, print and compare; nothing is imported from a lazy
``"package.module:Name"`` reference, and nothing is allocated, until :func:`build_module`.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

import attrs

__all__ = [
    "ModuleSpec",
    "SpecBuildError",
    "build_module",
    "import_module",
    "resolve_module",
    "spec_name",
]


class SpecBuildError(RuntimeError):
    """Building a spec failed; the message names the spec (and the path of specs above it)."""


def _check_module(instance: ModuleSpec, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, str):
        if value.count(":") != 1 or not all(value.split(":")):
            raise ValueError(
                f"ModuleSpec.module={value!r}: a lazy reference must look like "
                "'package.module:Name'"
            )
    elif isinstance(value, tuple):
        if len(value) != 2 or not all(isinstance(p, str) and p for p in value):
            raise ValueError(
                f"ModuleSpec.module={value!r}: a tuple reference must be (module_path, name)"
            )
    elif not callable(value):
        raise ValueError(
            f"ModuleSpec.module={value!r}: expected a class, a function or a "
            "'package.module:Name' string"
        )


@attrs.frozen
class ModuleSpec:
    """What builds one part of a model.

    ``module`` is a class, a function, or a lazy reference (``"package.module:Name"``, or
    Megatron's ``(module_path, name)`` tuple). ``params`` are keyword arguments given to the
    class; ``submodules`` (any object, usually a ``*Submodules`` record) is passed as the
    ``submodules=`` keyword; ``metainfo`` carries hints for the builders (Megatron's
    ``fuse_input_layernorm``) and, for a backend slot, which slot and backend served it.
    """

    module: Any = attrs.field(validator=_check_module)
    params: dict = attrs.field(factory=dict, converter=dict)
    submodules: Any = None
    metainfo: dict = attrs.field(factory=dict, converter=dict)


def import_module(reference: str | tuple[str, str]) -> Any:
    """Return the object a lazy reference names.

    ``reference`` is ``"package.module:Name"`` or ``(module_path, name)``.
    Raises ``ImportError`` naming the reference when the module or the name is missing.
    """
    if isinstance(reference, tuple):
        module_path, name = reference
    else:
        module_path, _, name = reference.partition(":")
    try:
        module = importlib.import_module(module_path)
    except ImportError as exc:
        raise ImportError(
            f"could not import module {module_path!r} for spec {name!r}: {exc}"
        ) from exc
    try:
        return getattr(module, name)
    except AttributeError:
        raise ImportError(f"could not find {name!r} in module {module_path!r}") from None


def spec_name(spec_or_module: Any) -> str:
    """A short printable name for a spec or module without importing anything."""
    target = spec_or_module.module if isinstance(spec_or_module, ModuleSpec) else spec_or_module
    if isinstance(target, str):
        return target.rpartition(":")[2]
    if isinstance(target, tuple):
        return target[1]
    if target is None:
        return "None"
    return getattr(target, "__qualname__", None) or type(target).__name__


def resolve_module(spec_or_module: Any) -> Any:
    """The class or function a spec (or lazy reference) names, imported but not built.

    Layers use it for kernel slots, whose value may be any callable (a function or a
    ``functools.partial``) that must not be called at build time.
    """
    target = spec_or_module.module if isinstance(spec_or_module, ModuleSpec) else spec_or_module
    if isinstance(target, (str, tuple)):
        return import_module(target)
    return target


def build_module(spec_or_module: Any, *args: Any, **kwargs: Any) -> Any:
    """Build what a spec describes.

    - A plain function (or a spec whose module is one) is returned unchanged: kernels and
      activation functions are specs of this kind.
    - A class is instantiated as ``cls(*args, **spec.params, **kwargs)``, with
      ``submodules=spec.submodules`` added when the spec has submodules.
    - Any other callable (a ``functools.partial`` builder) is called the same way.

    Raises ``SpecBuildError`` naming the spec (and every spec above it) when building fails,
    with the original exception as its cause; a ``ConfigError`` passes through unchanged.
    """
    from attnplug._errors import ConfigError

    target = resolve_module(spec_or_module)
    if isinstance(target, (types.FunctionType, types.BuiltinFunctionType)):
        return target
    if isinstance(spec_or_module, ModuleSpec):
        duplicated = sorted(set(spec_or_module.params) & set(kwargs))
        if duplicated:
            raise SpecBuildError(
                f"building {spec_name(spec_or_module)}: argument(s) {duplicated} are given both "
                "in the spec's params and by the caller"
            )
        kwargs = {**spec_or_module.params, **kwargs}
        if spec_or_module.submodules is not None:
            kwargs["submodules"] = spec_or_module.submodules
    try:
        return target(*args, **kwargs)
    except ConfigError:
        raise
    except SpecBuildError as exc:
        raise SpecBuildError(f"building {spec_name(spec_or_module)} > {exc}") from exc.__cause__
    except Exception as exc:
        raise SpecBuildError(
            f"building {spec_name(spec_or_module)}: {type(exc).__name__}: {exc}"
        ) from exc
