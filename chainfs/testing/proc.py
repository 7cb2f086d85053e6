"""Where ServiceProcess lived before it moved to :mod:`chainfs.local.process`."""

from chainfs.local.process import DEFAULT_START_TIMEOUT_S, DEFAULT_STOP_TIMEOUT_S, ServiceProcess

__all__ = ["DEFAULT_START_TIMEOUT_S", "DEFAULT_STOP_TIMEOUT_S", "ServiceProcess"]
