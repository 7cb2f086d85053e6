"""Config loading, error mapping and generated protocol modules."""

from __future__ import annotations

import dataclasses
import errno
import subprocess
import sys
from pathlib import Path

import pytest

from chainfs.common import config
from chainfs.common.errors import ChainfsError, Code, errno_of, to_user_error


@dataclasses.dataclass
class _Inner:
    size_bytes: int = 4
    names: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Cfg:
    port: int = 0
    ratio: float = 0.5
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    label: str | None = None

    def validate(self) -> None:
        if self.port < 0:
            raise ValueError("port must be >= 0")


def test_config_defaults_and_values(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('port = 7\nratio = 1\n[inner]\nsize_bytes = 9\nnames = ["a"]\n')
    cfg = config.load(_Cfg, f)
    assert cfg == _Cfg(port=7, ratio=1.0, inner=_Inner(9, ["a"]))
    assert config.load(_Cfg, None) == _Cfg()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("prot = 1\n", "'prot'"),
        ('port = "x"\n', "port: expected int"),
        ("[inner]\nsize_bytes = true\n", "inner.size_bytes"),
        ("[inner]\nextra = 1\n", "inner: unknown field 'extra'"),
        ("port = -1\n", "port must be >= 0"),
        ("port = \n", "not valid TOML"),
    ],
)
def test_config_errors_name_field_and_file(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(config.ConfigError) as ei:
        config.load(_Cfg, f)
    assert needle in str(ei.value)
    assert str(f) in str(ei.value)
    assert ei.value.errno == errno.EINVAL


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = _Cfg(port=3, inner=_Inner(5, ["x", "y"]), label="l")
    f = tmp_path / "c.toml"
    f.write_text(config.to_toml(cfg))
    assert config.load(_Cfg, f) == cfg


def test_errors_map_to_errno_and_user_exceptions() -> None:
    assert errno_of(Code.ENOENT) == errno.ENOENT
    assert errno_of(Code.STALE_CHAIN_VERSION) == errno.EAGAIN
    e = ChainfsError(Code.ENOENT, "no such file", "/a")
    assert isinstance(e, OSError) and e.errno == errno.ENOENT
    assert isinstance(to_user_error(e), FileNotFoundError)
    assert isinstance(to_user_error(ChainfsError(Code.EEXIST)), FileExistsError)
    assert isinstance(to_user_error(ChainfsError(Code.ENOTEMPTY)), OSError)
    assert ChainfsError(Code.NOT_COMMITTED).retryable
    assert not ChainfsError(Code.ENOENT).retryable


def test_generated_protocol_modules_are_current() -> None:
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-m", "chainfs.proto.build", "--check"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
