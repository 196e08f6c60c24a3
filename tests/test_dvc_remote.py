"""Sharing artifacts: `dvc push`, a fresh `git clone`, `dvc pull` restores every artifact
byte for byte and `dvc status` is clean; over the default remote (a folder beside the
repository, no set-up) and, in a slow test, over SSH to an OpenSSH server on 127.0.0.1."""

from __future__ import annotations

import getpass
import importlib.util
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from dvc.repo import Repo

from tests.dvc_repo import ROOT, Pipeline, copy_repo, dvc_env, file_hashes, git_commit, run


def artifacts(repo: Path) -> dict[str, str]:
    """sha256 of every file of every stage output."""
    return file_hashes(repo, [o for s in Pipeline(repo).stages.values() for o in s.outs])


def push_clone_pull(repo: Path, env: dict, clone: Path, *, remote=(), setup_clone=None) -> str:
    """`dvc push` from `repo`, `git clone` it to `clone`, `dvc pull` there (after
    `setup_clone(clone, env)`), and check the clone; returns push's output."""
    pushed = run(["dvc", "push", *remote], repo, env)
    run(["git", "clone", "-q", str(repo), str(clone)], clone.parent, env)
    clone_env = {**env, "PYTHONPATH": str(clone)}
    assert set(artifacts(clone)) < set(artifacts(repo))  # git holds only the metrics
    if setup_clone is not None:
        setup_clone(clone, clone_env)
    run(["dvc", "pull", *remote], clone, clone_env)
    expected = artifacts(repo)
    assert expected and artifacts(clone) == expected
    assert "up to date" in run(["dvc", "status"], clone, clone_env).lower()
    assert run(["git", "status", "--porcelain"], clone, clone_env) == ""
    return pushed


def default_remote_url(root: Path) -> Path:
    """The url of the default remote of the repository at `root`, as DVC resolves it (a
    relative url in .dvc/config is relative to .dvc/), read through DVC's Python API: the
    table `dvc remote list` prints wraps long paths."""
    with Repo(str(root)) as repo:
        config = repo.config
        return Path(config["remote"][config["core"]["remote"]]["url"])


def check_default_remote(root: Path) -> None:
    """The default remote of `root` is a local folder outside it, in its parent folder."""
    url = default_remote_url(root)
    assert url.is_absolute() and root.resolve() not in url.resolve().parents, url
    assert url.parent == root.parent.resolve(), url


def test_default_remote_is_beside_the_repository():
    """The shipped default remote is a local folder outside the repository (so it is never
    committed, and every clone on the machine shares it)."""
    check_default_remote(ROOT)


def test_default_remote_check_works_from_a_long_path(tmp_path):
    """The same check in a checkout whose path is long enough that DVC's tables wrap."""
    checkout = tmp_path / ("a-checkout-in-a-folder-whose-name-is-long-" * 3) / "clt-pipeline"
    (checkout / ".dvc").mkdir(parents=True)
    shutil.copy(ROOT / ".dvc" / "config", checkout / ".dvc" / "config")
    run(["git", "init", "-q"], checkout, dvc_env(checkout))
    assert len(str(checkout)) > 150
    check_default_remote(checkout)
    assert default_remote_url(checkout) == checkout.parent.resolve() / "clt-pipeline-dvc-remote"


def test_push_clone_pull_restores_every_artifact(built_tiny_repo, tmp_path):
    repo, env = copy_repo(built_tiny_repo, tmp_path / "repo")
    out = push_clone_pull(repo, env, tmp_path / "clone")
    assert "pushed" in out
    remote = tmp_path / "clt-pipeline-dvc-remote"  # the default url, beside the repository
    assert remote.is_dir() and any(remote.rglob("*"))
    assert "Everything is up to date" in run(["dvc", "push"], repo, env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ssh_server(tmp_path):
    """An OpenSSH server on 127.0.0.1 (a free port) that accepts one fresh key for the
    current user; yields (port, client key, HOME holding its known_hosts)."""
    sshd = shutil.which("sshd") or next((p for p in ["/usr/sbin/sshd"] if os.path.exists(p)), None)
    if sshd is None:
        pytest.skip("no sshd: `apt-get install openssh-server` (Debian package) to run this test")
    if importlib.util.find_spec("dvc_ssh") is None:
        pytest.skip("no dvc-ssh: `pip install dvc-ssh` (in the `dev` extra) to run this test")
    d = tmp_path / "ssh"
    d.mkdir(mode=0o700)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / name], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\nStrictModes no\n"
        "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    log = (d / "sshd.log").open("w")
    server = subprocess.Popen([sshd, "-D", "-e", "-f", d / "sshd_config"], stderr=log)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    host_key = (d / "host_key.pub").read_text().split()[:2]
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, (d / "sshd.log").read_text()
                assert time.monotonic() < deadline, "sshd did not listen within 10 s"
                time.sleep(0.1)
        yield port, d / "client_key", home
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


@pytest.mark.slow
def test_push_clone_pull_over_ssh(built_tiny_repo, tmp_path, ssh_server):
    port, key, home = ssh_server
    repo, env = copy_repo(built_tiny_repo, tmp_path / "repo")
    env["HOME"] = str(home)
    storage = tmp_path / "ssh-storage"
    url = f"ssh://{getpass.getuser()}@127.0.0.1:{port}{storage}"
    run(["dvc", "remote", "add", "sshremote", url], repo, env)
    git_commit(repo, env, "ssh remote")

    def use_key(path, env):
        run(["dvc", "remote", "modify", "--local", "sshremote", "keyfile", str(key)], path, env)

    use_key(repo, env)  # a personal setting: .dvc/config.local, which git ignores
    out = push_clone_pull(repo, env, tmp_path / "clone", remote=["-r", "sshremote"], setup_clone=use_key)
    assert "pushed" in out
    assert any(storage.rglob("*")) and not (tmp_path / "clt-pipeline-dvc-remote").exists()
