"""Paths and subprocess settings shared by the tests."""
import os
import socket
from typing import Dict, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(extra_path: Optional[str] = None, **overrides: str) -> Dict[str, str]:
    """Environment for running the repository's scripts in a child process (one thread, this checkout first)."""
    path = REPO if extra_path is None else os.pathsep.join([extra_path, REPO])
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=path)
    env.update(overrides)
    return env


def free_port() -> int:
    """A TCP port nothing listens on now (for torchrun's rendezvous; tests may run side by side)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def shared_dir() -> Optional[str]:
    """The read-only shared material (papers, fixtures): ``$DR_SHARED``, else ``<repo>/../shared``, else
    ``<repo>/shared``; None when none exists."""
    candidates = [os.environ.get('DR_SHARED', ''), os.path.join(os.path.dirname(REPO), 'shared'),
                  os.path.join(REPO, 'shared')]
    for path in candidates:
        if path and os.path.isdir(path):
            return os.path.abspath(path)
    return None
