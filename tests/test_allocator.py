"""The allocator setting is applied on glibc and can be switched off."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

SNIPPET = "from flawscope.allocator import keep_freed_memory as k; print(k(), k())"


def _run(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("FLAWSCOPE_KEEP_FREED_MEMORY", None)
    if env_value is not None:
        env["FLAWSCOPE_KEEP_FREED_MEMORY"] = env_value
    return subprocess.run([sys.executable, "-c", SNIPPET], env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_applies_once_and_can_be_switched_off():
    assert _run(None) == "True True"
    assert _run("0") == "False False"
