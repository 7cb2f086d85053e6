"""Backend options carried in a store URL's query string (``?timeout_ms=2000``)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from chainfs.common.config import from_dict
from chainfs.common.errors import ChainfsError, Code

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def options_from_query(cls: type[T], query: str, url: str) -> T:
    """Build the options dataclass ``cls`` from ``query``; bad fields name the URL."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    data: dict[str, Any] = {}
    for name, raw in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if name not in known:
            raise ChainfsError(
                Code.EINVAL, f"{url}: unknown option {name!r} (known: {', '.join(sorted(known))})"
            )
        tp = hints[name]
        try:
            if tp is bool:
                if raw.lower() not in _TRUE | _FALSE:
                    raise ValueError(raw)
                data[name] = raw.lower() in _TRUE
            elif tp is int:
                data[name] = int(raw)
            elif tp is float:
                data[name] = float(raw)
            else:
                data[name] = raw
        except ValueError:
            raise ChainfsError(
                Code.EINVAL, f"{url}: option {name}={raw!r} is not a valid {tp.__name__}"
            ) from None
    return from_dict(cls, data, source=url)  # also runs cls.validate()
