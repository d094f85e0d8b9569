"""A real Hugging Face Hub-compatible server on loopback: olah serving local git mirrors offline.

olah (a self-hosted Hub mirror) runs in its own virtualenv (``hack/setup-olah.sh``, cached under
``~/.cache/temper/olah-venv``), never in the trainer's. Repositories are plain git repositories
at ``<root>/mirrors/<models|datasets>/<org>/<name>`` on branch ``main`` (olah answers 401 for a
repository whose only branch is ``master``); ``offline = true`` keeps olah from ever contacting
an upstream Hub. Clients point ``HF_ENDPOINT`` at :attr:`OlahHub.endpoint`.

    hub = OlahHub(tmp).start()
    sha = hub.add_repo("acme/tiny", model_folder)
    os.environ["HF_ENDPOINT"] = hub.endpoint   # huggingface_hub now talks to olah
    hub.stop()

    python -m temper_dev.hub ROOT [--port N]   # serve ROOT's mirrors until interrupted
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from temper_dev.s3server import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO_ROOT / "hack" / "setup-olah.sh"
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "temper",
    "GIT_AUTHOR_EMAIL": "temper@localhost",
    "GIT_COMMITTER_NAME": "temper",
    "GIT_COMMITTER_EMAIL": "temper@localhost",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    # Fixed dates: the same files on the same parent give the same commit sha every run.
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
}


def olah_venv() -> Path:
    """The olah virtualenv, created on first use (a few seconds once cached)."""
    out = subprocess.run(["bash", str(SETUP_SCRIPT)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def olah_config(root: Path, port: int) -> str:
    netloc = f"127.0.0.1:{port}"
    return "\n".join(
        [
            "[basic]",
            'host = "127.0.0.1"',
            f"port = {port}",
            f'repos-path = "{root / "cache"}"',
            f'mirrors-path = ["{root / "mirrors"}"]',
            'mirror-scheme = "http"',
            f'mirror-netloc = "{netloc}"',
            f'mirror-lfs-netloc = "{netloc}"',
            "metadata-cache-ttl = 0",  # a test that pushes a commit sees it at once
            "",
            "[accessibility]",
            "offline = true",
            "",
            "[[accessibility.proxy]]",
            'repo = "*"',
            "allow = true",
            "",
            "[[accessibility.proxy]]",
            'repo = "*/*"',
            "allow = true",
            "",
        ]
    )


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, **GIT_IDENTITY}
    out = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env)
    return out.stdout.strip()


class OlahHub:
    """olah on 127.0.0.1 serving the git mirrors under ``root``; see the module docstring."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"HF_ENDPOINT": self.endpoint}

    @property
    def log_file(self) -> Path:
        return self.root / "olah.log"

    def repo_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        return self.root / "mirrors" / f"{repo_type}s" / repo_id

    def add_repo(
        self,
        repo_id: str,
        folder: Path,
        *,
        repo_type: str = "model",
        message: str = "",
        tags: tuple[str, ...] = (),
    ) -> str:
        """Commit ``folder``'s files to the repository's ``main`` (created if new), tagged ``tags``
        (moved if they exist); the commit sha."""
        repo = self.repo_dir(repo_id, repo_type)
        if not (repo / ".git").exists():
            repo.mkdir(parents=True, exist_ok=True)
            _git(repo, "init", "-q", "-b", "main")
        for item in repo.iterdir():  # the commit holds exactly ``folder``'s files
            if item.name != ".git":
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        shutil.copytree(folder, repo, dirs_exist_ok=True)
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "--allow-empty", "-m", message or f"upload {repo_id}")
        for tag in tags:
            _git(repo, "tag", "-f", tag)
        return _git(repo, "rev-parse", "HEAD")

    def start(self, timeout: float = 60.0) -> OlahHub:
        venv = olah_venv()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "mirrors" / "models").mkdir(parents=True, exist_ok=True)
        (self.root / "mirrors" / "datasets").mkdir(parents=True, exist_ok=True)
        config = self.root / "olah.toml"
        config.write_text(olah_config(self.root, self.port))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(venv / "bin" / "olah-cli"),
                    "--config",
                    str(config),
                    "--log-path",
                    str(self.root / "logs"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"olah exited with {self.proc.returncode}: {self.log_file.read_text()[-2000:]}"
                )
            if self._answers():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"olah did not answer within {timeout}s: {self.log_file.read_text()[-2000:]}")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/api/models/none/none", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means the server is up
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="temper_dev.hub", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="folder holding mirrors/<models|datasets>/<org>/<name>")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    hub = OlahHub(args.root, args.port).start()
    print(hub.endpoint, flush=True)
    try:
        assert hub.proc is not None
        hub.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
