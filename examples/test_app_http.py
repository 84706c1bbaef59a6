"""An application container from an OCI image: a small web service, pulled from a registry
(started on loopback by conftest.py), run as the image says, checked from inside."""

from __future__ import annotations

import time

from conftest import INDEX

from pytest_incus import Instance, InstanceFactory


def fetch(app: Instance, url: str, timeout: float = 10.0) -> str:
    """GET ``url`` from inside the app, retrying while the server starts."""
    deadline = time.monotonic() + timeout
    while True:
        result = app.exec(["wget", "-qO-", url])
        if result.ok or time.monotonic() > deadline:
            return result.stdout
        time.sleep(0.05)


def test_web_service_answers_and_logs(instance_factory: InstanceFactory, web_image: str) -> None:
    app = instance_factory.launch(kind="app", image=web_image)
    assert fetch(app, "http://127.0.0.1:8080/") == INDEX
    assert "response:200" in app.logs()  # httpd -v logs each request on stderr
    app.stop()
    app.delete()
