"""Hook specifications and the registry of everything plugins register.

Every plugin, bundled or third-party, is found through the `perceptcore` entry-point
group and hands its objects to a `register` callback owned by this module, which
checks them and remembers which plugin provided each one.
"""

from __future__ import annotations

import difflib
import re
from importlib import metadata
from typing import Iterable

import attrs
import pluggy

from .errors import PerceptcoreError

ENTRY_POINT_GROUP = "perceptcore"
hookspec = pluggy.HookspecMarker("perceptcore")
hookimpl = pluggy.HookimplMarker("perceptcore")


class HookSpecs:
    @hookspec
    def perceptcore_register_perturbations(self, register):
        """Register image perturbations: objects following `perturbation.Perturbation`."""

    @hookspec
    def perceptcore_register_models(self, register):
        """Register machine observers: objects following `runner.Model`."""

    @hookspec
    def perceptcore_register_subgroups(self, register):
        """Register subgroup definitions: objects with `name`, `subgroups` and `assign(cases, options)`."""

    @hookspec
    def perceptcore_register_metrics(self, register):
        """Register analyses: objects with `name`, `outputs` and `compute(study)`."""

    @hookspec
    def perceptcore_register_backends(self, register):
        """Register latent-model inference backends: objects following `latent_model.Backend`."""

    @hookspec
    def perceptcore_register_datasets(self, register):
        """Register data generators: objects with `name`, `Options` and `generate(options, folder, seed, progress)`."""

    @hookspec
    def perceptcore_register_commands(self, register):
        """Register CLI commands: objects with `name`, `help`, `add_arguments(parser)` and `run(args) -> int`."""

    @hookspec
    def perceptcore_register_executors(self, register):
        """Register executors: objects with `name`, `Options` and `start(options, workers, threads, where)` (see `executor.Executor`)."""


# What the core needs of each kind, beyond a `name`; checked at registration.
KINDS = {
    "perturbation": ("perceptcore_register_perturbations", ("severity_unit", "Options", "perturb")),
    "model": ("perceptcore_register_models", ("Options", "load", "predict")),
    "subgroups": ("perceptcore_register_subgroups", ("subgroups", "assign")),
    "metric": ("perceptcore_register_metrics", ("outputs", "compute")),
    "backend": ("perceptcore_register_backends", ("methods", "priority", "unavailable_reason", "fit")),
    "dataset": ("perceptcore_register_datasets", ("Options", "generate")),
    "command": ("perceptcore_register_commands", ("help", "add_arguments", "run")),
    "executor": ("perceptcore_register_executors", ("Options", "start")),
}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_COMMAND_NAME = re.compile(r"^[a-z][a-z0-9-]*$")  # typed on a command line: read-status, not read_status


@attrs.frozen
class Registered:
    kind: str
    name: str
    obj: object
    plugin: str
    package: str
    version: str


class Registry:
    """Everything the loaded plugins registered, by kind and name."""

    def __init__(self):
        self._items: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}

    def add(self, item: Registered) -> None:
        existing = self._items[item.kind].get(item.name)
        if existing is not None:
            raise PerceptcoreError(
                f"{item.kind} {item.name!r} is registered by both plugin {existing.plugin!r} "
                f"({existing.package}) and plugin {item.plugin!r} ({item.package}); uninstall one of them",
                "plugins",
            )
        self._items[item.kind][item.name] = item

    def all(self, kind: str | None = None) -> list[Registered]:
        kinds = [kind] if kind else list(KINDS)
        return [item for k in kinds for item in self._items[k].values()]

    def names(self, kind: str) -> list[str]:
        return sorted(self._items[kind])

    def get(self, kind: str, name: str, where: str) -> object:
        """The object registered as `name`, or an error at `where` listing what exists."""
        item = self._items[kind].get(name)
        if item is None:
            available = self.names(kind)
            close = difflib.get_close_matches(str(name), available, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            listing = ", ".join(available) if available else "none (is a plugin missing?)"
            raise PerceptcoreError(f"unknown {kind} {name!r}; {hint}available: {listing}", where)
        return item.obj


def load_registry(extra_plugins: Iterable[tuple[str, object]] = ()) -> Registry:
    """Load every plugin of the entry-point group, plus `extra_plugins` as (name, module-or-object)."""
    pm = pluggy.PluginManager("perceptcore")
    pm.add_hookspecs(HookSpecs)
    origin: dict[str, tuple[str, str]] = {}
    declared: dict[str, str] = {}  # plugin name -> the entry point's target
    for ep, dist in _entry_points():
        if ep.name in origin:  # which of the two loaded would depend on the order of sys.path
            raise PerceptcoreError(
                f"plugin name {ep.name!r} is declared by both package {origin[ep.name][0]} {origin[ep.name][1]} "
                f"({declared[ep.name]}) and package {dist[0]} {dist[1]} ({ep.value}); uninstall one of them",
                "plugins",
            )
        try:
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must not look like our bug
            raise PerceptcoreError(
                f"could not load plugin {ep.name!r} ({ep.value}) from package {dist[0]}: "
                f"{type(exc).__name__}: {exc}",
                "plugins",
            ) from exc
        _register_plugin(pm, ep.name, module)
        origin[ep.name], declared[ep.name] = dist, ep.value
    for name, plugin in extra_plugins:
        _register_plugin(pm, name, plugin)
        origin.setdefault(name, ("(registered directly)", ""))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        # pluggy's error carries the plugin object; the user knows it by its registered name.
        name = pm.get_name(exc.plugin) or getattr(exc.plugin, "__name__", repr(exc.plugin))
        raise PerceptcoreError(str(exc), f"plugin {name!r}") from exc

    registry = Registry()
    for kind, (hook_name, required) in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            package, version = origin[impl.plugin_name]
            callback = _register_callback(registry, kind, required, impl.plugin_name, package, version)
            kwargs = {"register": callback} if "register" in impl.argnames else {}
            try:
                impl.function(**kwargs)
            except PerceptcoreError:
                raise
            except Exception as exc:
                raise PerceptcoreError(
                    f"failed while registering {kind}s: {type(exc).__name__}: {exc}",
                    f"plugin {impl.plugin_name!r}",
                ) from exc
    return registry


def _register_plugin(pm: pluggy.PluginManager, name: str, plugin: object) -> None:
    try:
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise PerceptcoreError(str(exc), f"plugin {name!r}") from exc


def _register_callback(registry, kind, required, plugin_name, package, version):
    def register(obj):
        where = f"plugin {plugin_name!r}"
        name = getattr(obj, "name", None)
        pattern = _COMMAND_NAME if kind == "command" else _NAME
        if not isinstance(name, str) or not pattern.match(name):
            shape = "a lower-case word (letters, digits, -)" if kind == "command" else "a lower-case identifier"
            raise PerceptcoreError(f"registered a {kind} whose name {name!r} is not {shape}", where)
        missing = [attr for attr in required if not hasattr(obj, attr)]
        if missing:
            raise PerceptcoreError(f"{kind} {name!r} lacks {', '.join(missing)}", where)
        registry.add(Registered(kind, name, obj, plugin_name, package, version))

    return register


def _entry_points():
    """(entry point, (distribution name, version)) for the group, each distribution once.

    A distribution visible twice on sys.path (an editable install beside a build, say) counts
    once, its first copy, as for imports; two distributions may not declare one name.
    """
    seen = set()
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()  # PEP 503 normalised
        if name in seen:
            continue
        seen.add(name)
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP:
                yield ep, (dist.metadata["Name"], dist.version)
