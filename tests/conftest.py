"""Shared fixtures."""

from __future__ import annotations

import errno
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import make_colour_folder


def _is_local(address: object) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths and the like
        return True
    host = str(address[0])
    return host in ("localhost", "::1") or host.startswith("127.") or host.startswith("::ffff:127.")


@pytest.fixture(scope="session", autouse=True)
def _offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The suite runs as on an offline machine, even where the network is up.

    In this process every socket connection outside the loopback is refused, whichever library
    makes it (torch.hub's urlopen, huggingface_hub's requests/httpx); processes that tests start
    inherit the hubs' offline switches and a proxy that refuses every connection.
    """
    patch = pytest.MonkeyPatch()
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self: socket.socket, address: object) -> None:
        if not _is_local(address):
            raise ConnectionRefusedError(f"network disabled in tests (connect to {address})")
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        if not _is_local(address):
            return errno.ECONNREFUSED
        return real_connect_ex(self, address)

    patch.setattr(socket.socket, "connect", connect)
    patch.setattr(socket.socket, "connect_ex", connect_ex)
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens, so every proxied request fails
    for name, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HTTP_PROXY": closed,
                        "HTTPS_PROXY": closed, "http_proxy": closed, "https_proxy": closed,
                        "NO_PROXY": "localhost,127.0.0.1,::1", "no_proxy": "localhost,127.0.0.1,::1"}.items():  # fmt: skip
        patch.setenv(name, value)
    # Weights the developer has cached must not make a test pass that an empty machine would fail.
    patch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
    patch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
    yield
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def _isolated_feature_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests (and the CLI processes they start) never touch the user's feature cache."""
    import os

    os.environ["TRANSFERKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("feature-cache"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DATA/train and DATA/val, two colour classes, 10 + 4 images each."""
    root = tmp_path_factory.mktemp("tiny")
    make_colour_folder(root / "train", 10, seed=1)
    make_colour_folder(root / "val", 4, seed=2)
    return root


@pytest.fixture(autouse=True)
def _quiet_warnings() -> None:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
