"""tprocess: a pre-fork supervisor for long-lived Python worker processes."""

from .config import Config, ConfigError, GroupConfig
from .supervisor import StartError, Supervisor
from .worker import Context

__all__ = ["Config", "ConfigError", "Context", "GroupConfig", "StartError", "Supervisor"]
