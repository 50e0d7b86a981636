"""Loading a new generation for a reload: the config read again, the code imported afresh.

"Afresh" means as a new `start` would: the task's module and every module of the
user's own code it imported (anything outside the standard library and the
installed packages) are dropped from sys.modules and imported again, not
`importlib.reload`ed one by one. Installed packages stay loaded: a new version of
one needs a stop and a start. If anything fails (the file, a key, an import),
the modules are put back as they were and the running workers are untouched.
"""

from __future__ import annotations

from dataclasses import fields

from .config import Config, ConfigError, GroupConfig, load_file, validate
from .loader import reload_code
from .pool import Pool

TOP_LEVEL = ("graceful_timeout", "min_uptime", "max_failures", "backoff_max", "log_file",
             "max_workers", "reload_batch", "metrics", "base_dir", "source", "broker")


def load_generation(current: Config, pool: Pool) -> Config:
    """The config and code a reload would switch to; ConfigError if they do not load."""
    config = load_file(current.path) if current.path else _rebuild(current, pool)
    for key, value in current.overrides.items():
        setattr(config, key, value)
    config.overrides = dict(current.overrides)
    if config.name != current.name:
        raise ConfigError(f"{config.source}: name: the file says {config.name!r} but the instance runs as "
                          f"{current.name!r}; a reload cannot rename an instance (stop, then start)")
    validate(config)
    limit = current.worker_limit()
    if config.total_workers() > max(limit, config.worker_limit()):
        raise ConfigError(f"{config.source}: {config.total_workers()} workers in all; max_workers is {limit}")
    reload_code(config)
    return config


def _rebuild(current: Config, pool: Pool) -> Config:
    """An instance started without a file (`start TASK -n N`, or the Python API): the same
    groups from their references as written, with the number of workers they have now."""
    config = Config(name=current.name, **{key: getattr(current, key) for key in TOP_LEVEL})
    for group in current.groups:
        g = pool.groups.get(group.name)
        options = {f.name: getattr(group, f.name) for f in fields(GroupConfig) if f.name != "refs"}
        options.update(group.refs)  # the references as written, imported again
        options["workers"] = g.target if g is not None else group.workers
        config.groups.append(GroupConfig(**options))
    return config
