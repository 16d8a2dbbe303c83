"""The kfp 2.17 DockerRunner bug we work around (pipelines/kfp_workarounds.py), checked without a
Docker daemon: a fake docker client whose container has exited with status 3 and, as
``auto_remove=True`` makes happen, is gone before ``wait()``."""

import pytest

docker = pytest.importorskip("docker")


class _Container:
    def __init__(self, removed: bool):
        self.removed = removed

    def logs(self, **_kwargs):
        return iter([b"step output\n"])

    def wait(self):
        if self.removed:
            raise docker.errors.NotFound("container removed")
        return {"StatusCode": 3}

    def remove(self, force=False):
        self.removed = True


class _Client:
    def __init__(self, auto_remove_races: bool):
        self.auto_remove_races = auto_remove_races
        self.images = self
        self.containers = self
        self.run_kwargs = None

    # images
    def list(self):
        return [type("Image", (), {"tags": ["img:1"], "attrs": {"RepoDigests": []}})()]

    def get(self, _name):
        return object()

    # containers
    def run(self, **kwargs):
        self.run_kwargs = kwargs
        return _Container(removed=self.auto_remove_races and kwargs.get("auto_remove", False))


def test_kfp_still_reports_a_failed_auto_removed_container_as_success():
    """When this fails, kfp reads the real exit status (kubeflow/pipelines#13332 fixed): delete
    pipelines/kfp_workarounds.py and its use in pipelines/local_run.py."""
    from kfp.local.docker_task_handler import run_docker_container

    status = run_docker_container(_Client(auto_remove_races=True), "img:1", ["python"], {})
    assert status == 0, "kfp now reports the real exit status: the workaround can go"


def test_the_workaround_reports_the_real_exit_status():
    from pipelines.kfp_workarounds import run_container

    client = _Client(auto_remove_races=True)
    assert run_container(client, "img:1", ["python"], {}) == 3
    assert not client.run_kwargs.get("auto_remove")


def test_the_workaround_is_in_force_only_inside_its_block():
    from kfp.local import docker_task_handler

    from pipelines.kfp_workarounds import docker_exit_status, run_container

    original = docker_task_handler.run_docker_container
    with docker_exit_status():
        assert docker_task_handler.run_docker_container is run_container
    assert docker_task_handler.run_docker_container is original
