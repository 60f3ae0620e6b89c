"""ModuleSpec, build_module and import_module."""

from __future__ import annotations

import functools

import pytest

from attnplug import ConfigError
from attnplug.spec import (
    ModuleSpec,
    SpecBuildError,
    build_module,
    import_module,
    resolve_module,
    spec_name,
)


class Widget:
    def __init__(self, size, *, scale=1, submodules=None):
        self.size, self.scale, self.submodules = size, scale, submodules


class Broken:
    def __init__(self):
        raise RuntimeError("boom")


class Outer:
    def __init__(self, submodules):
        self.inner = build_module(submodules)


def kernel(x):
    return x + 1


def test_class_is_instantiated_with_params_and_submodules():
    spec = ModuleSpec(Widget, params={"scale": 3}, submodules="subs")
    built = build_module(spec, 5)
    assert (built.size, built.scale, built.submodules) == (5, 3, "subs")


def test_lazy_reference_is_imported_only_when_built():
    spec = ModuleSpec("tests.test_spec:Widget", params={"scale": 2})
    assert build_module(spec, 1).scale == 2
    assert build_module(ModuleSpec(("tests.test_spec", "Widget")), 4).size == 4


def test_functions_are_returned_unchanged():
    assert build_module(kernel) is kernel
    assert build_module(ModuleSpec(kernel)) is kernel
    assert build_module(ModuleSpec("attnplug.spec:spec_name")) is spec_name


def test_resolve_module_does_not_call_partials():
    part = functools.partial(kernel)
    assert resolve_module(ModuleSpec(part)) is part
    assert resolve_module("attnplug.spec:ModuleSpec") is ModuleSpec


def test_duplicate_argument_is_an_error_naming_it():
    with pytest.raises(SpecBuildError, match="scale"):
        build_module(ModuleSpec(Widget, params={"scale": 3}), 1, scale=4)


def test_failure_names_the_spec_path():
    with pytest.raises(SpecBuildError, match="Outer > building Broken: RuntimeError: boom"):
        build_module(ModuleSpec(Outer, submodules=ModuleSpec(Broken)))


def test_config_error_passes_through():
    def bad():
        raise ConfigError("hidden_size=0 is not accepted")

    class Holder:
        def __init__(self):
            bad()

    with pytest.raises(ConfigError, match="hidden_size"):
        build_module(ModuleSpec(Holder))


@pytest.mark.parametrize("reference", ["tests.nope:Widget", "tests.test_spec:Nope"])
def test_import_errors_name_the_reference(reference):
    with pytest.raises(ImportError, match="Nope|nope"):
        import_module(reference)


@pytest.mark.parametrize("module", ["no_colon", "a:b:c", ":x", ("a",), 3])
def test_bad_module_values_are_rejected_where_made(module):
    with pytest.raises(ValueError, match="ModuleSpec.module"):
        ModuleSpec(module)
