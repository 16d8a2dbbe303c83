"""The one workaround for a kfp 2.17 bug that this project needs, kept here and nowhere else.

kfp.local's DockerRunner starts each step's container with ``auto_remove=True``: the container is
often gone before ``wait()``, and kfp takes the resulting 404 for exit status 0, so a failing step
passes (always under podman; kubeflow/pipelines#13332). While the bug exists, ``run_local(...,
runner="docker")`` swaps in :func:`run_container`, which keeps the container until its exit status
has been read. ``tests/test_kfp_workarounds.py`` fails as soon as kfp no longer has the bug, so
this module can then be deleted.
"""

from __future__ import annotations

import contextlib


def run_container(client, image: str, command: list, volumes: dict, **run_args) -> int:
    """kfp.local's ``run_docker_container`` without ``auto_remove``, and without pulling a
    ``localhost/`` image that is missing (no registry could have it)."""
    from kfp.local.docker_task_handler import add_latest_tag_if_not_present

    import docker

    image = add_latest_tag_if_not_present(image)
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        if image.startswith("localhost/"):
            raise RuntimeError(
                f"image {image} is not in the local image store of {client.api.base_url}"
                " (build it: bash docker/build.sh)"
            ) from None
        client.images.pull(image)
    container = client.containers.run(
        image=image, command=command, detach=True, volumes=volumes, **run_args
    )
    try:
        rest = b""
        for chunk in container.logs(stream=True, follow=True):  # pieces of lines: print whole ones
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                print(line.decode(errors="replace"))
        if rest:
            print(rest.decode(errors="replace"))
        return container.wait()["StatusCode"]
    finally:
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)


@contextlib.contextmanager
def docker_exit_status():
    """Within this block kfp.local's DockerRunner reports a step's real exit status."""
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = run_container
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original
