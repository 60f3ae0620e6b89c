"""The backend registry: discovery through entry points, reporting, selection.

Third-party distributions are faked the way an installer leaves them: a ``*.dist-info`` folder
(METADATA + entry_points.txt) in a directory on the path, naming modules from
``tests/plugin_fixtures``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from attnplug.backends import (
    Backend,
    BackendError,
    LocalSpecProvider,
    get_provider,
    list_backends,
    registry,
    reload_backends,
    resolve_backend,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "plugin_fixtures"
FIXTURE_MODULES = ("thirdparty_backend", "thirdparty_heavy_dependency", "broken_plugin",
                   "duplicate_a", "duplicate_b", "extras_plugin", "misbehaving_plugin",
                   "empty_plugin")


def write_distribution(site: Path, name: str, version: str, entry_points: dict[str, str]) -> None:
    """Leave ``site`` as ``pip install`` would for a distribution with these entry points."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[attnplug]\n{lines}")


THIRDPARTY = ("attnplug-thirdparty", "1.2.3", {"thirdparty": "thirdparty_backend.plugin"})
BROKEN = ("attnplug-broken", "0.0.1", {"broken": "broken_plugin"})
EXTRAS = ("attnplug-extras", "2.0", {"extras": "extras_plugin"})


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh site directory on ``sys.path`` (with the fixture modules), and a clean registry."""
    site = tmp_path / "site"
    site.mkdir()
    for name in (registry.STRICT_ENV, registry.DISABLE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.syspath_prepend(str(site))
    reload_backends()
    yield site
    reload_backends()
    for name in list(sys.modules):
        if name.split(".")[0] in FIXTURE_MODULES:
            del sys.modules[name]


def install(site: Path, *distributions: tuple[str, str, dict[str, str]]) -> None:
    for distribution in distributions:
        write_distribution(site, *distribution)
    reload_backends()


def without_entry_points(monkeypatch, *names: str) -> None:
    """Discover as if the distributions with these entry points were not installed."""
    entry_points = registry._entry_points
    monkeypatch.setattr(registry, "_entry_points",
                        lambda: [ep for ep in entry_points() if ep.name not in names])
    reload_backends()


def infos_by_name() -> dict:
    return {info.name: info for info in list_backends()}


def config(backend: str = "auto", variant: str | None = None, use_kitchen: bool = False):
    return SimpleNamespace(backend=backend, experimental_attention_variant=variant,
                           use_kitchen=use_kitchen)


def run_attnplug(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(site), str(FIXTURES), str(ROOT)])
    full_env = {**os.environ, "PYTHONPATH": path, **env}
    for name in (registry.STRICT_ENV, registry.DISABLE_ENV):
        if name not in env:
            full_env.pop(name, None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env,
                          timeout=60, check=False)


# -- the Backend record -----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"name": "TE", "provider": "m:C"}, "name"),
    ({"name": "auto", "provider": "m:C"}, "name"),
    ({"name": "", "provider": "m:C"}, "name"),
    ({"name": "x", "provider": "no_colon"}, "provider"),
    ({"name": "x", "provider": 42}, "provider"),
    ({"name": "x", "provider": "m:C", "priority": True}, "priority"),
    ({"name": "x", "provider": "m:C", "check": ["not callable"]}, "check"),
])
def test_backend_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"Backend.{field}="):
        Backend(**kwargs)


# -- discovery --------------------------------------------------------------------------------
def test_local_backend_comes_from_the_core_distribution(site):
    local = infos_by_name()["local"]
    assert (local.distribution, local.priority, local.available) == ("attnplug", 0, True)
    assert local.error is None and local.reasons == ()


def test_local_backend_is_registered_from_a_source_tree_without_entry_points(site, monkeypatch):
    monkeypatch.setattr(registry, "_entry_points", lambda: [])
    reload_backends()
    assert infos_by_name()["local"].distribution == "attnplug"
    assert isinstance(get_provider("local"), LocalSpecProvider)


def test_third_party_distribution_is_listed_with_its_distribution_and_version(site):
    install(site, THIRDPARTY)
    info = infos_by_name()["thirdparty"]
    assert (info.distribution, info.version, info.priority, info.available) == (
        "attnplug-thirdparty", "1.2.3", 10, True)


def test_third_party_backend_is_selectable_and_replaces_only_its_slot(site):
    install(site, THIRDPARTY)
    provider = get_provider("thirdparty")
    assert isinstance(provider, LocalSpecProvider) and type(provider) is not LocalSpecProvider
    assert provider.name == "thirdparty"  # the registered name, not the inherited "local"
    assert provider.activation_func() is sys.modules["thirdparty_heavy_dependency"].fast_silu
    assert type(provider).linear is LocalSpecProvider.linear
    assert get_provider("thirdparty") is provider


def test_backends_json_shows_a_third_party_distribution(site):
    write_distribution(site, *THIRDPARTY)
    result = run_attnplug(site, "-m", "attnplug", "backends", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["thirdparty"] == {
        "name": "thirdparty", "distribution": "attnplug-thirdparty", "version": "1.2.3",
        "priority": 10, "available": True, "reasons": [], "error": None,
    }
    assert rows["local"]["distribution"] == "attnplug"


def test_listing_backends_imports_no_heavy_dependency(site):
    write_distribution(site, *THIRDPARTY)
    code = (
        "import sys, attnplug\n"
        "from attnplug.backends import list_backends\n"
        "names = [info.name for info in list_backends()]\n"
        "assert 'thirdparty' in names, names\n"
        "heavy = {'triton', 'transformer_engine', 'thirdparty_heavy_dependency'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = run_attnplug(site, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- plugins that misbehave -------------------------------------------------------------------
def test_plugin_that_fails_to_import_is_reported_and_skipped(site, caplog):
    install(site, BROKEN, THIRDPARTY)
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        infos = infos_by_name()
    broken = infos["broken"]
    assert (broken.distribution, broken.version, broken.available) == (
        "attnplug-broken", "0.0.1", False)
    assert "attnplug_missing_dependency" in broken.error
    assert infos["thirdparty"].available
    assert "attnplug-broken" in caplog.text
    with pytest.raises(BackendError, match="attnplug-broken 0.0.1.*failed to load"):
        get_provider("broken")


def test_strict_plugins_makes_a_failed_import_fatal(site, monkeypatch):
    monkeypatch.setenv("ATTNPLUG_STRICT_PLUGINS", "1")
    install(site, BROKEN)
    with pytest.raises(BackendError) as excinfo:
        list_backends()
    message = str(excinfo.value)
    assert "'broken'" in message and "attnplug-broken" in message
    assert "attnplug_missing_dependency" in message


def test_disable_plugins_skips_entry_points_and_backends_by_name(site, monkeypatch):
    monkeypatch.setenv("ATTNPLUG_DISABLE_PLUGINS", "broken, gpuonly")
    monkeypatch.setenv("ATTNPLUG_STRICT_PLUGINS", "1")  # the broken plugin is never imported
    install(site, BROKEN, EXTRAS)
    infos = infos_by_name()
    for name in ("broken", "gpuonly"):
        assert not infos[name].available and infos[name].error is None
        assert infos[name].reasons == ("disabled by ATTNPLUG_DISABLE_PLUGINS",)
    assert infos["gdnonly"].priority == 50
    with pytest.raises(BackendError, match="disabled by ATTNPLUG_DISABLE_PLUGINS"):
        get_provider("gpuonly")


def test_duplicate_backend_names_are_an_error_naming_both_distributions(site):
    install(site, ("attnplug-twin-a", "1.0", {"twin_a": "duplicate_a"}),
            ("attnplug-twin-b", "2.0", {"twin_b": "duplicate_b"}))
    with pytest.raises(BackendError, match="'twin' is registered twice") as excinfo:
        list_backends()
    assert "attnplug-twin-a 1.0" in str(excinfo.value)
    assert "attnplug-twin-b 2.0" in str(excinfo.value)


def test_hook_that_raises_or_returns_garbage_is_reported_not_fatal(site):
    install(site, ("attnplug-misbehaving", "0.1", {
        "raising": "misbehaving_plugin:raising", "garbage": "misbehaving_plugin:garbage"}))
    infos = infos_by_name()
    assert "the plugin's hook exploded" in infos["raising"].error
    assert "expected a list of attnplug.Backend" in infos["garbage"].error
    assert infos["local"].available


# -- selection --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["te", "triton", "kitchen"])
def test_unknown_builtin_backend_says_which_pip_line_installs_it(site, monkeypatch, name):
    without_entry_points(monkeypatch, name)
    with pytest.raises(BackendError, match=f'pip install "attnplug\\[{name}\\]"'):
        get_provider(name)


def test_unknown_backend_lists_the_installed_ones_and_suggests_a_close_name(site):
    expected = r"installed backends: [^)]*'local'.*did you mean 'local'"
    with pytest.raises(BackendError, match=expected):
        get_provider("locla")


def test_backend_whose_check_fails_reports_its_reasons(site):
    install(site, EXTRAS)
    info = infos_by_name()["gpuonly"]
    assert not info.available
    assert info.reasons == ("no CUDA device is visible", "it needs compute capability 9.0")
    with pytest.raises(BackendError, match="cannot run here: no CUDA device is visible; it needs"):
        get_provider("gpuonly")


def test_provider_that_cannot_be_imported_is_a_backend_error(site):
    install(site, EXTRAS)
    with pytest.raises(BackendError, match="'ghost'.*attnplug_no_such_module"):
        get_provider("ghost")


def test_auto_picks_the_highest_priority_backend_that_runs_and_supports_the_config(site):
    install(site, EXTRAS, THIRDPARTY)
    # gpuonly (100) cannot run, gdnonly (50) refuses the config, ghost (30) cannot be imported.
    assert resolve_backend(config()).name == "thirdparty"
    assert resolve_backend(config(variant="gdn")).name == "gdnonly"


def test_auto_without_any_usable_backend_lists_why(site, monkeypatch):
    monkeypatch.setenv("ATTNPLUG_DISABLE_PLUGINS", "local")
    install(site, EXTRAS)
    with pytest.raises(BackendError, match="found no backend") as excinfo:
        resolve_backend(config())
    for reason in ("no CUDA device", "serves only", "attnplug_no_such_module"):
        assert reason in str(excinfo.value)


def test_named_backend_that_does_not_support_the_config_is_an_error(site):
    install(site, EXTRAS)
    with pytest.raises(BackendError, match="'gdnonly' cannot build this model: it serves only"):
        resolve_backend(config(backend="gdnonly"))
    assert resolve_backend(config(backend="local")).name == "local"


def test_installed_plugin_that_registers_no_backend_says_so(site):
    install(site, ("attnplug-quiet", "0.3", {"quiet": "empty_plugin"}))
    assert "quiet" not in infos_by_name()
    with pytest.raises(BackendError, match="plugin 'quiet' of attnplug-quiet 0.3 is installed but"):
        get_provider("quiet")


def test_use_kitchen_selects_the_kitchen_backend(site, monkeypatch):
    without_entry_points(monkeypatch, "kitchen")
    with pytest.raises(BackendError, match='unknown backend \'kitchen\'.*"attnplug\\[kitchen\\]"'):
        resolve_backend(config(use_kitchen=True))


def test_the_choice_is_logged_once(site, caplog):
    install(site, THIRDPARTY)
    with caplog.at_level(logging.INFO, logger="attnplug"):
        for _ in range(3):
            resolve_backend(config())
    chosen = [r.getMessage() for r in caplog.records if "chose" in r.getMessage()]
    assert len(chosen) == 1
    assert chosen[0].startswith("backend='auto' chose 'thirdparty' (priority 10)")


def test_attnplug_check_tests_an_installed_third_party_backend_and_catches_its_bug(site):
    """The kernel author's loop: a distribution registers its backend through the entry point,
    ``attnplug check NAME`` runs every slot and the hybrid model against local. The fixture's
    ``activation_func`` is the identity where the config asks for SiLU: every slot passes, the
    model check fails, and the command exits 1."""
    install(site, THIRDPARTY)
    done = run_attnplug(site, "-m", "attnplug", "check", "thirdparty", "--json")
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    assert result["backend"] == "thirdparty" and result["passed"] is False
    wrong = [c for c in result["checks"] if not c["ok"]]
    assert [c["slot"] for c in wrong] == ["model"], wrong
    assert wrong[0]["status"] == "FAILED" and wrong[0]["errors"]["logits"] > 0.01, wrong
    assert all(c["status"] == "passed" for c in result["checks"] if c["slot"] != "model")
