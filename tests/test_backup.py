"""Off-site backup and restore, through the CLI, against file: URLs and a libSQL server over HTTP,
WebSocket and TLS (https://, wss://, libsql://)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner

from cli.main import main
from events import replication
from events.remote import RemoteError, open_remote
from statemachine import backup as backup_service
from statemachine.workspace import open_log
from tests.libsql_server import LibsqlServer
from tests.marketplace_builder import bottom, deep_tree, remove_deep
from tests.privileges import needs_permissions, unprivileged

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "example-marketplace"
TOKEN = "tok-Secret-4f9a1c"
ENV = {"TURSO_AUTH_TOKEN": TOKEN, "OVERNIGHT_BACKUP_URL": None, "TURSO_DATABASE_URL": None}


def run(*args: object, env: dict | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env={**ENV, **(env or {})},
                              catch_exceptions=False)


def tree_hashes(root: Path) -> dict[str, str]:
    """relative path -> sha256 (files) or 'link:<target>' (symlinks), without .overnight/."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] == ".overnight":
            continue
        if path.is_symlink():
            found[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture
def market(tmp_path) -> Path:
    root = tmp_path / "market"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns(".overnight"))
    big = root / "plugins" / "devops" / "deploy-checker" / "assets.bin"
    big.write_bytes(random.Random(1).randbytes(1_300_000))  # three chunks
    tool = root / "plugins" / "devops" / "deploy-checker" / "run.sh"
    tool.write_text("#!/bin/sh\necho hi\n")
    os.chmod(tool, 0o4755)
    os.symlink("../deploy-checker/run.sh", root / "plugins" / "devops" / "run-link")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert run("scan", root).exit_code == 0
    with open_log(root) as store:
        store.put_blob(b"a log blob " * 100_000)  # a log blob larger than one chunk
    return root


@pytest.fixture
def server(tmp_path):
    with LibsqlServer(tmp_path / "remote.db", token=TOKEN) as srv:
        yield srv


@pytest.fixture
def night(tmp_path):
    """A copy of the example marketplace, a Gemini emulator, and the environment a run needs."""
    from tests.emulator import Emulator

    root = tmp_path / "night"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns(".overnight"))
    key = "fake-key-NIGHT-1b2c"
    with Emulator(api_key=key) as emu:
        yield root, emu, {"GOOGLE_API_KEY": key, "GEMINI_API_KEY": None, "GOOGLE_GENAI_USE_VERTEXAI": None}


def signalled(args: list[str], env: dict, ready, sig: int, wait: float = 30) -> subprocess.CompletedProcess:
    """Run `overnight ARGS`, send it `sig` once `ready()`, and return how it ended. SIGHUP is at
    its default in the child, as from a terminal, even when the tests run under nohup."""
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + wait
        while not ready():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def backup_json(root: Path, url: str, **env) -> dict:
    result = run("backup", root, "--to", url, "--json", env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_round_trip_over_http_restores_every_byte_and_a_log_that_verifies(market, server, tmp_path):
    before = tree_hashes(market)
    report = backup_json(market, server.url)
    assert report["snapshot"]["plugins"] == 4 and report["snapshot"]["files"] == len(before) - 2  # not .git/HEAD nor the symlink
    listing = json.loads(run("backup", "list", "--from", server.url, "--json").stdout)
    assert [s["id"] for s in listing["snapshots"]] == [report["snapshot"]["id"]]
    shutil.rmtree(market)

    dest = tmp_path / "restored"
    result = run("restore", "--from", server.url, "--to", dest, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["seconds"] > 0
    assert tree_hashes(dest) == {k: v for k, v in before.items() if not k.startswith(".git/")}
    assert not (dest / ".git").exists()
    mode = os.stat(dest / "plugins" / "devops" / "deploy-checker" / "run.sh").st_mode
    assert stat.S_IMODE(mode) == 0o755  # setuid stripped, the rest kept
    verified = run("audit", "verify", dest, "--json")
    assert verified.exit_code == 0 and json.loads(verified.stdout)["ok"], verified.output
    with open_log(dest, writer=False) as store:
        assert store.has_blob(hashlib.sha256(b"a log blob " * 100_000).hexdigest())
        assert [r.event.snapshot_id for r in store.read(stream="backup")] == []  # taken before its event

    assert server.headers_seen and set(server.headers_seen) == {f"Bearer {TOKEN}"}
    for path in (server.db_path, dest / ".overnight" / "overnight.db"):
        assert TOKEN.encode() not in path.read_bytes()


def test_second_backup_sends_only_what_changed_and_is_an_event(market, server):
    first = backup_json(market, server.url)
    readme = market / "plugins" / "devops" / "deploy-checker" / "README.md"
    readme.write_text(readme.read_text() + "\nchanged\n")
    rows_before = server.rows_written
    second = backup_json(market, server.url)
    # the file, and the directory nodes on its path: README's dir, devops, plugins, root
    assert second["blobs_sent"] == 5
    assert second["events_sent"] == 1  # the first backup's BackupCompleted
    assert second["bytes_sent"] < first["bytes_sent"] / 50
    assert server.rows_written - rows_before == second["rows_written"]
    with open_log(market, writer=False) as store:
        done = [r.event for r in store.read(stream="backup")]
    assert [e.snapshot_id for e in done] == [first["snapshot"]["id"], second["snapshot"]["id"]]
    # one figure of the bytes sent, wherever it is given
    listing = json.loads(run("backup", "list", "--from", server.url, "--json").stdout)["snapshots"]
    for report, event in ((first, done[0]), (second, done[1])):
        assert report["bytes_sent"] == report["snapshot"]["bytes_sent"] == event.bytes_sent
        assert next(s for s in listing if s["id"] == report["snapshot"]["id"])["bytes_sent"] == report["bytes_sent"]
    assert all(TOKEN not in e.target and e.target.startswith("http://127.0.0.1") for e in done)
    result = run("backup", "verify", "--from", server.url, "--read-data", "100")
    assert result.exit_code == 0, result.output


def test_round_trip_through_a_file_url(market, tmp_path):
    (market / "plugins" / "back\\slash.txt").write_text("a backslash is an ordinary character in a POSIX name\n")
    vendored = market / "plugins" / "devops" / "deploy-checker" / "node_modules" / "dep" / "index.js"
    vendored.parent.mkdir(parents=True)
    vendored.write_text("module.exports = 1;\n")  # a plugin's undo snapshot leaves it out, a backup does not
    url = f"file:{tmp_path / 'offsite.db'}"
    backup_json(market, url)
    before = tree_hashes(market)
    dest = tmp_path / "again"
    assert run("restore", "--from", url, "--to", dest).exit_code == 0
    assert tree_hashes(dest) == {k: v for k, v in before.items() if not k.startswith(".git/")}
    assert (dest / vendored.relative_to(market)).read_text() == "module.exports = 1;\n"
    assert run("audit", "verify", dest).exit_code == 0


def test_backup_survives_drops_500s_413s_and_latency(market, server):
    server.fail_500 = 2
    server.drop_mid_batch = 1
    server.drop_after_commit = 1
    server.max_body = 1_000_000  # a batch of several chunks must be split
    server.latency = 0.01
    backup_json(market, server.url)
    assert {r.status for r in server.requests} >= {0, 413, 500, 200}
    server.max_body = None
    result = run("backup", "verify", "--from", server.url, "--read-data", "100", "--json")
    assert result.exit_code == 0, result.output


def test_round_trip_over_websocket_survives_dropped_sockets(market, server, tmp_path):
    before = tree_hashes(market)
    server.drop_mid_batch = 1
    server.drop_after_commit = 1
    report = backup_json(market, server.ws_url)
    assert report["snapshot"]["plugins"] == 4
    kinds = {(r.path, r.status) for r in server.requests}
    assert ("ws:batch", 0) in kinds and ("ws:batch", 200) in kinds
    assert not [r for r in server.requests if not r.path.startswith("ws:")]  # nothing over HTTP
    result = run("backup", "verify", "--from", server.ws_url, "--read-data", "100", "--json")
    assert result.exit_code == 0, result.output
    dest = tmp_path / "restored"
    assert run("restore", "--from", server.ws_url, "--to", dest).exit_code == 0
    assert tree_hashes(dest) == {k: v for k, v in before.items() if not k.startswith(".git/")}
    assert run("audit", "verify", dest).exit_code == 0
    assert set(server.headers_seen) == {TOKEN}  # the hello's jwt

    denied = run("backup", market, "--to", server.ws_url, env={"TURSO_AUTH_TOKEN": "wrong-" + TOKEN})
    assert denied.exit_code == 1 and "Unauthorized" in denied.output and TOKEN not in denied.output


@pytest.fixture
def tls_server(tmp_path):
    """The test server over TLS, its certificate from a throwaway CA; yields (server, CA file)."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with LibsqlServer(tmp_path / "remote-tls.db", token=TOKEN, tls=context) as srv:
        yield srv, ca_file


def test_round_trip_over_https_wss_and_libsql_urls_with_a_private_ca(market, tls_server, tmp_path):
    """As a user reaches Turso: a `libsql://` URL (wss:// underneath) and https://, the private
    CA named by SSL_CERT_FILE, in a fresh process (the client reads it when it starts)."""
    server, ca_file = tls_server
    assert server.libsql_url.startswith("libsql://") and server.url.startswith("https://")
    env = {**os.environ, "TURSO_AUTH_TOKEN": TOKEN, "SSL_CERT_FILE": str(ca_file)}
    env.pop("OVERNIGHT_BACKUP_URL", None)
    env.pop("TURSO_DATABASE_URL", None)

    def overnight(*args: object) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert TOKEN not in done.stdout + done.stderr
        return done

    before = tree_hashes(market)
    first = json.loads(overnight("backup", market, "--to", server.libsql_url, "--json").stdout)
    assert first["snapshot"]["plugins"] == 4
    assert {r.path for r in server.requests} <= {"ws:execute", "ws:batch"}  # libsql:// went over wss
    (market / "plugins" / "productivity" / "late-note.md").write_text("written after the first backup\n")
    http_requests = len(server.requests)
    overnight("backup", market, "--to", server.url)
    assert {r.path for r in server.requests[http_requests:]} <= {"/v1/execute", "/v1/batch"}
    overnight("backup", "verify", "--from", server.libsql_url, "--read-data", "100")
    dest = tmp_path / "restored"
    overnight("restore", "--from", server.ws_url, "--to", dest)
    assert tree_hashes(dest) == {k: v for k, v in tree_hashes(market).items() if not k.startswith(".git/")}
    assert "plugins/productivity/late-note.md" in tree_hashes(dest) and tree_hashes(dest) != before
    assert run("audit", "verify", dest).exit_code == 0
    assert set(server.headers_seen) == {TOKEN, f"Bearer {TOKEN}"}  # the hello's jwt, the HTTP header


def test_an_untrusted_certificate_fails_at_once_with_a_clear_error(market, tls_server):
    server, _ca_file = tls_server
    for url in (server.libsql_url, server.url):
        result = run("backup", market, "--to", url, env={"SSL_CERT_FILE": None, "SSL_CERT_DIR": None})
        assert result.exit_code == 1
        assert "certificate verify failed" in result.output and "SSL_CERT_FILE" in result.output
        assert "attempts" not in result.output  # one attempt: a retried failure says "(after N attempts)"
        assert TOKEN not in result.output
    assert server.requests == []  # the handshake failed before any request was sent


def test_transport_errors_never_show_the_token(market, server, tmp_path):
    server.max_body = 10_000  # even one chunk is refused
    result = run("backup", market, "--to", server.url)
    assert result.exit_code == 1 and "413" in result.output and TOKEN not in result.output
    server.max_body = None
    result = run("backup", market, "--to", server.url, env={"TURSO_AUTH_TOKEN": "wrong-" + TOKEN})
    assert result.exit_code == 1 and "Unauthorized" in result.output and TOKEN not in result.output
    unreachable = open_remote("http://127.0.0.1:9/", TOKEN, retries=1, backoff=0.01)
    try:
        with pytest.raises(RemoteError) as caught:
            unreachable.execute("SELECT 1")
    finally:
        unreachable.close()  # the client's event-loop thread is not a daemon: an open one blocks exit
    assert TOKEN not in str(caught.value) and "127.0.0.1:9" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    with open_log(market, writer=False) as store:
        assert TOKEN not in json.dumps(store.query("SELECT data FROM events"))


def test_backup_killed_at_ten_random_instants_then_completes_and_verifies(market, server):
    for i in range(40):
        (market / "plugins" / "productivity" / f"note-{i}.md").write_text(f"note {i}\n" * 200)
    (market / "plugins" / "big.bin").write_bytes(random.Random(2).randbytes(2_500_000))
    server.latency = 0.03
    rng = random.Random(7)
    env = {**os.environ, "TURSO_AUTH_TOKEN": TOKEN}
    command = [sys.executable, "-m", "cli", "backup", str(market), "--to", server.url]
    remote = open_remote(server.url, TOKEN)
    try:
        for attempt in range(10):
            # new content each time, so every run has work to be interrupted in
            (market / "plugins" / f"new-{attempt}.bin").write_bytes(rng.randbytes(700_000))
            proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.3, 2.0))
            proc.kill()
            proc.wait()
            # what is on the remote is consistent at every instant: no index row without chunks
            if remote.execute("SELECT 1 FROM sqlite_master WHERE name = 'blobs'"):
                assert replication.verify_blobs(remote, 1.0)[1] == []
    finally:
        remote.close()
    server.latency = 0
    final = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    result = run("backup", "verify", "--from", server.url, "--read-data", "100")
    assert result.exit_code == 0, result.output


def test_a_tampered_remote_blob_is_reported_and_refused(market, server, tmp_path):
    snapshot = backup_json(market, server.url)["snapshot"]["id"]
    path = next(p for p in sorted(market.rglob("*.md")) if ".overnight" not in p.parts)
    target = hashlib.sha256(path.read_bytes()).hexdigest()
    (data,) = server.sql("SELECT data FROM blob_chunks WHERE hash = ?", (target,))[0]
    tampered = bytes([data[0] ^ 1]) + data[1:]
    server.sql("UPDATE blob_chunks SET data = ? WHERE hash = ?", (tampered, target))

    assert run("backup", "verify", "--from", server.url).exit_code == 0  # same size: structure holds
    result = run("backup", "verify", "--from", server.url, "--read-data", "100", "--json")
    rel = path.relative_to(market)
    assert result.exit_code == 1 and json.loads(result.stdout)["problems"] == [  # named by its file, once
        f"snapshot {snapshot}: {rel.as_posix()}: blob {target} is corrupt on the remote (its bytes do not match its hash)"]

    dest = tmp_path / "restored"
    dest.mkdir()
    result = run("restore", "--from", server.url, "--to", dest)
    assert result.exit_code == 1 and target in result.output
    assert " is damaged (1 problem below): nothing was put in " in result.output
    assert list(dest.iterdir()) == []  # all or nothing: the destination is as it was
    kept = tmp_path / "restored.incomplete"
    assert not (kept / rel).exists() and (kept / rel).parent.is_dir()
    assert not list(kept.rglob(".restore-*"))
    assert [p.name for p in tmp_path.iterdir() if ".restoring-" in p.name] == []
    # what is kept passed every check: the files it has, and its log
    assert run("audit", "verify", kept).exit_code == 0
    # tried again: the first attempt's stays as it is, this one is beside it, nothing is hidden
    again = run("restore", "--from", server.url, "--to", dest)
    assert again.exit_code == 1 and f"is in {tmp_path / 'restored.incomplete-2'}" in again.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".restored", "restored"))) == [
        "restored", "restored.incomplete", "restored.incomplete-2"]


def test_a_remote_blob_missing_its_chunk_is_told_once_by_the_file_that_has_it(market, server):
    """`verify --read-data` told it twice ("incomplete", then "missing chunks"), by hash alone."""
    snapshot = backup_json(market, server.url)["snapshot"]["id"]
    path = next(p for p in sorted(market.rglob("*.md")) if ".overnight" not in p.parts)
    target = hashlib.sha256(path.read_bytes()).hexdigest()
    server.sql("DELETE FROM blob_chunks WHERE hash = ?", (target,))
    told = (f"snapshot {snapshot}: {path.relative_to(market).as_posix()}: blob {target} is incomplete on the remote "
            f"(0 of 1 chunks, 0 bytes of {path.stat().st_size})")
    for share in ("0", "100"):
        result = run("backup", "verify", "--from", server.url, "--read-data", share, "--json")
        assert result.exit_code == 1 and json.loads(result.stdout)["problems"] == [told], share


def crafted_remote(url: str, root_entries: list[dict], extra: dict[str, list[dict]]) -> None:
    """A remote whose only snapshot has the given root entries (and subtrees by fake name)."""
    remote = open_remote(url)
    try:
        replication.ensure_schema(remote, (backup_service.SNAPSHOT_SCHEMA,))
        writer = replication.Writer(remote)
        content = b"payload\n"
        file_hash = hashlib.sha256(content).hexdigest()
        writer.put_blob(file_hash, content)
        names: dict[str, str] = {}
        for name, entries in extra.items():
            node = backup_service.encode_node([{**e, "hash": e.get("hash") or file_hash} for e in entries])
            names[name] = hashlib.sha256(node).hexdigest()
            writer.put_blob(names[name], node)
        resolved = [{"mode": 0o644, "size": 8, "target": "", **e,
                     "hash": names.get(e.get("hash", ""), file_hash) if e["kind"] != "symlink" else ""}
                    for e in root_entries]
        node = backup_service.encode_node(resolved)
        root = hashlib.sha256(node).hexdigest()
        writer.put_blob(root, node)
        writer.add(f"INSERT INTO snapshots ({backup_service.SNAPSHOT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   ("crafted", "2024-01-01T00:00:00Z", root, 0, "", 1, 8, 0, 0))
        writer.flush()
    finally:
        remote.close()


def test_crafted_snapshots_cannot_write_outside_the_destination(tmp_path):
    url = f"file:{tmp_path / 'evil.db'}"
    entry = {"mode": 0o644, "size": 8, "target": ""}
    crafted_remote(url, [
        {**entry, "name": "ok.txt", "kind": "file"},
        {**entry, "name": "..", "kind": "dir", "hash": "sub"},
        {**entry, "name": "../escape.txt", "kind": "file"},
        {**entry, "name": "/tmp/abs.txt", "kind": "file"},
        {**entry, "name": "sub", "kind": "dir", "hash": "sub"},
        {**entry, "name": "up", "kind": "symlink", "target": "../../outside"},
        {**entry, "name": "abs", "kind": "symlink", "target": "/etc"},
        {**entry, "name": "here", "kind": "symlink", "target": "."},
        {**entry, "name": "sneaky", "kind": "symlink", "target": "here/.."},
        {**entry, "name": "inside", "kind": "symlink", "target": "sub/x.txt"},
        {**entry, "name": ".overnight", "kind": "dir", "hash": "sub"},
    ], {"sub": [{**entry, "name": "x.txt", "kind": "file"},
                {**entry, "name": "x.txt", "kind": "file", "mode": 0o6755}]})
    before = sorted(p for p in tmp_path.rglob("*"))
    dest = tmp_path / "box" / "dest"
    result = run("restore", "--from", url, "--to", dest)
    assert result.exit_code == 1
    for refused in ("'..'", "'../escape.txt'", "'/tmp/abs.txt'", "'../../outside'", "'/etc'",
                    "'here/..'", "appears twice", ".overnight/"):
        assert refused in result.output, refused
    # The destination stays untouched; what passed every check is kept beside it, for a person.
    kept = dest.with_name("dest.incomplete")
    assert not dest.exists() and f"nothing was put in {dest}; what could be restored and verified is in {kept}" \
        in result.output.replace("\n", " ")
    outside = sorted(p for p in tmp_path.rglob("*") if kept not in p.parents and p not in (kept, dest.parent))
    assert outside == before
    assert sorted(p.relative_to(kept).as_posix() for p in kept.iterdir() if p.name != ".overnight") == \
        ["here", "inside", "ok.txt", "sub"]
    assert (kept / "inside").read_bytes() == b"payload\n"
    assert stat.S_IMODE(os.stat(kept / "sub" / "x.txt").st_mode) == 0o644


@pytest.mark.parametrize("longer", [False, True])
def test_of_two_copies_of_a_log_backing_up_at_once_the_one_that_lost_makes_no_snapshot(market, server, tmp_path,
                                                                                        monkeypatch, longer):
    """The old machine comes back while the restored copy runs, and both back up to the same URL
    at the same time: the events of the one that ships second are ignored there, and its
    snapshot row named a head the remote does not have. Both said they succeeded, and the
    newest snapshot there could not be restored. With more events than the other, the loser's
    extra ones went in above the other's, breaking the remote's hash chain."""
    assert run("backup", market, "--to", server.url).exit_code == 0
    twin = tmp_path / "twin"
    assert run("restore", "--from", server.url, "--to", twin).exit_code == 0
    for root, plugin in ((market, "deploy-checker"), (twin, "deploy-checker")):
        (root / "plugins" / "devops" / plugin / "NOTES.md").write_text(f"edited on {root.name}\n")
        assert run("scan", root).exit_code == 0  # the two logs part here
    if longer:
        (market / "plugins" / "devops" / "deploy-checker" / "MORE.md").write_text("more\n")
        assert run("scan", market).exit_code == 0
    ship = replication.ship_events

    def twin_first(store, writer, head, last_seq):
        monkeypatch.setattr(replication, "ship_events", ship)
        with open_log(twin) as other:
            backup_service.backup(other, twin, server.url, TOKEN)  # after our head was checked
        return ship(store, writer, head, last_seq)

    monkeypatch.setattr(replication, "ship_events", twin_first)
    lost = run("backup", market, "--to", server.url)
    assert lost.exit_code == 1
    assert "another copy of this log backed up there at the same time" in lost.stderr, lost.stderr
    listing = json.loads(run("backup", "list", "--from", server.url, "--json").stdout)
    assert len(listing["snapshots"]) == 2  # the first backup's and the twin's
    verified = run("backup", "verify", "--from", server.url)
    assert verified.exit_code == 0, verified.output
    restored = run("restore", "--from", server.url, "--to", tmp_path / "again")
    assert restored.exit_code == 0, restored.output
    assert (tmp_path / "again" / "plugins" / "devops" / "deploy-checker" / "NOTES.md").read_text() == "edited on twin\n"


def test_of_two_logs_backing_up_at_once_to_an_empty_remote_the_loser_is_told_it_is_another_log(
        market, server, tmp_path, monkeypatch):
    """Two marketplaces backing up to one new URL at the same time: the one that lost was told
    "another copy of this log" had backed up there."""
    other = tmp_path / "other"
    shutil.copytree(EXAMPLE, other, ignore=shutil.ignore_patterns(".overnight"))
    assert run("scan", other).exit_code == 0  # a log of its own
    ship = replication.ship_events

    def other_first(store, writer, head, last_seq):
        monkeypatch.setattr(replication, "ship_events", ship)
        with open_log(other) as theirs:
            backup_service.backup(theirs, other, server.url, TOKEN)  # after our (empty) head was checked
        return ship(store, writer, head, last_seq)

    monkeypatch.setattr(replication, "ship_events", other_first)
    lost = run("backup", market, "--to", server.url)
    assert lost.exit_code == 1
    assert "another log backed up there at the same time, and the remote holds its events now" in lost.stderr, \
        lost.stderr
    assert run("backup", "verify", "--from", server.url).exit_code == 0


def test_a_backup_cut_short_in_a_big_file_sends_only_its_missing_chunks_again(market, server, tmp_path):
    """A backup killed after some of a big file's chunks sent them all again: on a link that
    keeps dropping, a big file might never get there."""
    big = market / "plugins" / "devops" / "deploy-checker" / "assets.bin"  # 1.3 MB: three chunks
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    whole = backup_json(market, server.url)["bytes_sent"]
    for table in ("snapshots", "events", "log_blobs", "blobs"):  # as if the first backup was cut short
        server.sql(f"DELETE FROM {table}")                       # after the big file's first two chunks
    server.sql("DELETE FROM blob_chunks WHERE NOT (hash = ? AND idx < 2)", (digest,))
    again = backup_json(market, server.url)
    assert again["bytes_sent"] < whole - 2 * 512 * 1024 + 2_000, (whole, again)
    dest = tmp_path / "restored"
    assert run("restore", "--from", server.url, "--to", dest).exit_code == 0
    assert (dest / big.relative_to(market)).read_bytes() == big.read_bytes()
    assert run("backup", "verify", "--from", server.url, "--read-data", "100").exit_code == 0


def test_restore_refuses_a_non_empty_directory_and_a_missing_url(market, tmp_path):
    url = f"file:{tmp_path / 'offsite.db'}"
    backup_json(market, url)
    result = run("restore", "--from", url, "--to", market)
    assert result.exit_code == 1 and "not an empty directory" in result.output
    assert run("backup", market).exit_code == 2
    second = backup_json(market, url)
    newest, first = second["snapshot"]["id"], json.loads(run("backup", "list", "--from", url, "--json").stdout)[
        "snapshots"][0]["id"]
    for wanted, said in (("", "not found"), ("zz", "not found")):  # "" matched every snapshot: "is ambiguous"
        unknown = run("restore", "--from", url, "--to", tmp_path / "dest", "--snapshot", wanted)
        assert unknown.exit_code == 1
        assert unknown.output == (f"error: snapshot {wanted!r} {said} (the newest here: {newest}, {first}; "
                                  "`overnight backup list` lists them all)\n")
    assert run("backup", market, env={"OVERNIGHT_BACKUP_URL": url}).exit_code == 0


def test_restore_destinations_it_cannot_use_are_one_clear_error(market, tmp_path):
    url = f"file:{tmp_path / 'offsite.db'}"
    backup_json(market, url)
    (tmp_path / "afile").write_text("x")
    result = run("restore", "--from", url, "--to", tmp_path / "afile" / "sub")
    assert result.exit_code == 1, result.output
    assert result.output == f"error: cannot restore into {tmp_path}/afile/sub: {tmp_path}/afile is not a directory\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    os.symlink(empty, tmp_path / "link")
    result = run("restore", "--from", url, "--to", tmp_path / "link")
    assert result.exit_code == 1 and "is a symlink" in result.output
    for command in (("restore", "--to", tmp_path / "new"), ("backup", "verify"), ("backup", "list")):
        missing = run(*command, "--from", f"file:{tmp_path / 'no-such.db'}")
        assert missing.exit_code == 1 and "no backup there (the file does not exist)" in missing.output
    assert not (tmp_path / "no-such.db").exists() and not (tmp_path / "new").exists()


def test_a_restore_cut_off_midway_leaves_nothing_behind(market, server, tmp_path):
    backup_json(market, server.url)
    before = len(server.requests)

    def cut_off() -> None:  # the server starts failing a few requests into the restore
        while len(server.requests) < before + 4:
            time.sleep(0.005)
        server.fail_500 = 10**6

    cutter = threading.Thread(target=cut_off, daemon=True)
    cutter.start()
    dest = tmp_path / "restored"
    dest.mkdir()
    result = run("restore", "--from", server.url, "--to", dest)
    cutter.join()
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: restore abandoned, nothing was put in {dest}: ")
    assert "HTTP" in result.output and TOKEN not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["market", "remote.db", "restored"]
    assert list(dest.iterdir()) == []
    server.fail_500 = 0
    assert run("restore", "--from", server.url, "--to", dest).exit_code == 0
    assert run("audit", "verify", dest).exit_code == 0


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_signal_stops_a_restore_and_leaves_nothing_behind(market, server, tmp_path, sig, code):
    backup_json(market, server.url)
    server.latency = 0.3  # each request to the remote takes a while: the restore is under way
    dest = tmp_path / "restored"
    ended = signalled(["restore", "--from", server.url, "--to", str(dest)], {**os.environ, "TURSO_AUTH_TOKEN": TOKEN},
                      lambda: any(".restoring-" in p.name for p in tmp_path.iterdir()), sig)
    assert (ended.returncode, ended.stderr) == (code, f"error: interrupted by {signal.Signals(sig).name}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["market", "remote.db"]


def test_a_signal_while_the_restore_makes_its_stage_leaves_nothing_behind(market, tmp_path, monkeypatch):
    """The signal test hit it once: a SIGHUP just after the staging directory was made, before
    the restore held it, left the directory behind."""
    import statemachine.backup

    url = f"file:{tmp_path / 'offsite.db'}"
    backup_json(market, url)

    def signalled_now(fd, operation):
        raise KeyboardInterrupt  # as a signal's handler raises it here

    monkeypatch.setattr(statemachine.backup.fcntl, "flock", signalled_now)
    stopped = run("restore", "--from", url, "--to", tmp_path / "restored")
    assert (stopped.exit_code, stopped.stderr) == (130, "error: interrupted by SIGINT\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["market", "offsite.db"]


def test_a_killed_restores_leftovers_are_removed_by_the_next_restore_there(market, server, tmp_path):
    backup_json(market, server.url)
    server.latency = 0.3
    dest = tmp_path / "restored"
    env = {**os.environ, "TURSO_AUTH_TOKEN": TOKEN}
    killed = signalled(["restore", "--from", server.url, "--to", str(dest)], env,
                       lambda: any(".restoring-" in p.name for p in tmp_path.iterdir()), signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    (leftover,) = [p for p in tmp_path.iterdir() if ".restoring-" in p.name]  # nothing could remove it
    # a restore at work keeps its own: another one into the same place leaves it alone
    server.latency = 0.0
    busy = tmp_path / ".restored.restoring-0busy000"
    busy.mkdir()
    lock = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = run("restore", "--from", server.url, "--to", dest)
    finally:
        os.close(lock)
    assert result.exit_code == 0, result.output
    assert f"warning: removed {leftover}, left behind by a restore that was killed" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [busy.name, "market", "remote.db", "restored"]


def test_a_restore_whose_destination_is_filled_meanwhile_removes_itself_and_says_so(market, server, tmp_path):
    backup_json(market, server.url)
    server.latency = 0.2
    dest = tmp_path / "restored"
    dest.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "cli", "restore", "--from", server.url, "--to", str(dest)],
                            cwd=REPO, env={**os.environ, "TURSO_AUTH_TOKEN": TOKEN}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not any(".restoring-" in p.name for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        (dest / "theirs.txt").write_text("another restore got here first\n")
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, out + err
    assert err == (f"error: {dest} is no longer empty: something else (another restore?) put files there during "
                   "this restore, which was removed and changed nothing there\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["market", "remote.db", "restored"]
    assert [p.name for p in dest.iterdir()] == ["theirs.txt"]


def test_run_backs_up_when_it_pauses_for_quota_and_when_it_finishes(night, server):
    root, emu, env = night
    os.symlink("/etc/passwd", root / "plugins" / "x")
    emu.script("rate_limit_day", retry_delay=None, phase="skill")
    paused = run("run", root, "--base-url", emu.url, "--rpm", "1000", "--rpd", "1000", "--no-wait",
                 "--backup-to", server.url, "--json", env=env)
    assert paused.exit_code == 0, paused.output
    summary = json.loads(paused.stdout)
    assert summary["outcome"] == "paused" and summary["backup_failed"] is False
    assert "(paused for quota)" in summary["backups"][0]
    # what `overnight backup` would warn about is in the run's summary too
    assert summary["backups"][1:] == [
        "  warning: plugins/x: symlink to '/etc/passwd' is absolute; skipped: restore would refuse it"]
    unreachable = run("run", root, "--base-url", emu.url, "--rpm", "1000", "--rpd", "1000",
                      "--force", "--plugin", "meeting-notes", "--backup-to", "http://127.0.0.1:9/x",
                      "--json", env=env)
    assert unreachable.exit_code == 1  # the run itself completed; the off-site copy did not happen
    after = json.loads(unreachable.stdout)
    assert after["outcome"] == "complete" and after["backup_failed"] is True
    assert "failed" in after["backups"][0] and TOKEN not in unreachable.output
    # the one error line on stderr says so, also for a script reading --json (it said nothing)
    assert [line for line in unreachable.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: {after['backups'][0]}"]
    snapshots = run("backup", "list", "--from", server.url, "--json")
    assert snapshots.exit_code == 0 and len(json.loads(snapshots.stdout)["snapshots"]) == 1
    assert TOKEN not in (root / ".overnight" / "overnight.db").read_bytes().decode("latin-1")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_stops_the_backup_that_ends_a_run(night, server, sig, code):
    root, emu, env = night
    server.latency = 0.3  # each request to the remote takes a while: the backup is under way
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
    child_env.update(GOOGLE_API_KEY=env["GOOGLE_API_KEY"], TURSO_AUTH_TOKEN=TOKEN)
    log = root / ".overnight" / "overnight.db"
    ended = signalled(["run", str(root), "--base-url", emu.url, "--rpm", "1000", "--rpd", "1000", "--backup-to",
                       server.url], child_env, lambda: bool(
        server.requests and log.exists()
        and sqlite_rows(log, "SELECT count(*) FROM sqlite_schema WHERE name = 'events'")[0][0]
        and sqlite_rows(log, "SELECT count(*) FROM events WHERE type = 'RunFinished'")[0][0]), sig, wait=60)
    assert ended.returncode == code, ended.stdout + ended.stderr
    name = signal.Signals(sig).name
    assert f"(run complete) stopped by {name}; the next backup goes on from where it stopped" in ended.stderr
    assert sqlite_rows(log, "SELECT count(*) FROM events WHERE type = 'BackupCompleted'") == [(0,)]
    server.latency = 0
    assert run("backup", root, "--to", server.url).exit_code == 0
    assert run("backup", "verify", "--from", server.url).exit_code == 0


def test_resume_backs_up_where_the_run_did_and_a_bad_url_is_refused_before_the_run(night, tmp_path):
    root, emu, env = night
    offsite = tmp_path / "offsite.db"
    typo = run("run", root, "--base-url", emu.url, "--backup-to", "bogus://x", env=env)
    assert typo.exit_code == 2
    assert typo.output == ("error: --backup-to bogus://x: unsupported scheme 'bogus' "
                           "(use one of file, http, https, ws, wss, libsql)\n")
    no_host = run("run", root, "--base-url", emu.url, "--backup-to", "http://", env=env)
    assert (no_host.exit_code, no_host.output) == (
        2, "error: --backup-to the http: backup URL names no host (http://HOST)\n")
    for command in (["backup", root, "--to"], ["backup", "list", "--from"], ["backup", "verify", "--from"],
                    ["restore", "--to", tmp_path / "r", "--from"]):
        refused = run(*command, "bogus://x")
        assert (refused.exit_code, refused.output) == (2, "error: bogus://x: unsupported scheme 'bogus' "
                                                          "(use one of file, http, https, ws, wss, libsql)\n")
        # libsql-client refused these with "Cannot combine AUTHORIZATION header with AUTH argument..."
        refused = run(*command, "http://user:SECRET-PW-1@127.0.0.1:9/db")
        assert (refused.exit_code, refused.output) == (2, "error: http://127.0.0.1:9: credentials in the URL "
                                                          "are not used; give the token in TURSO_AUTH_TOKEN\n")
        for url in ("wss://127.0.0.1:9/db?authToken=SECRET-TOKEN-1",  # libsql-client's own way
                    "wss://127.0.0.1:9/db;authToken=SECRET-TOKEN-1", "wss://127.0.0.1:9/db#authToken=SECRET-TOKEN-1"):
            refused = run(*command, url)  # (a `;` parameter was recorded as part of the path)
            assert (refused.exit_code, refused.output) == (2, "error: wss://127.0.0.1:9/db: credentials in the URL "
                                                              "are not used; give the token in TURSO_AUTH_TOKEN\n")
        # an internal error (exit 4) at the first use of the port; or 5 tries to reach no host
        for url, told in (("http://127.0.0.1:notaport", "http://127.0.0.1:notaport: its port is not a number "
                                                         "from 1 to 65535"),
                          ("libsql://", "the libsql: backup URL names no host (libsql://HOST)"),
                          ("libsql:u:SECRET-PW-2@127.0.0.1:9", "the libsql: backup URL names no host (libsql://HOST)"),
                          ("http://[u:SECRET-PW-3@127.0.0.1]:9", "the backup URL cannot be read as a URL (a host in "
                                                                 "[brackets] is an IPv6 address)"),
                          ("file:", "file: names no file (file:PATH)")):
            refused = run(*command, url)
            assert (refused.exit_code, refused.output) == (2, f"error: {told}\n"), url
    assert emu.requests == [] and not (root / ".overnight").exists()
    paused = run("run", root, "--base-url", emu.url, "--rpm", "1000", "--rpd", "2", "--no-wait",
                 "--backup-to", f"file:{offsite}", "--json", env=env)
    assert json.loads(paused.stdout)["outcome"] == "paused", paused.output
    resumed = run("resume", root, "--rpd", "1000", "--json", env=env)
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout)
    assert summary["outcome"] == "complete"
    assert summary["backups"][0].startswith(f"backup to file://{offsite} (run complete): ")
    listed = json.loads(run("backup", "list", "--from", f"file:{offsite}", "--json").stdout)["snapshots"]
    assert len(listed) == 2
    idle = run("run", root, "--base-url", emu.url, "--backup-to", f"file:{offsite}", "--json", env=env)
    assert idle.exit_code == 0, idle.output  # no run to record, and still the backup the option asks for
    assert json.loads(idle.stdout)["run_id"] is None
    assert json.loads(idle.stdout)["backups"][0].startswith(f"backup to file://{offsite} (nothing to do): ")
    assert len(json.loads(run("backup", "list", "--from", f"file:{offsite}", "--json").stdout)["snapshots"]) == 3


def test_resume_backs_up_to_the_file_a_relative_url_named_and_keeps_tls_0(night, server, tmp_path, monkeypatch):
    """A relative `file:` URL is resolved when given (resume may run from any directory), and
    a recorded URL keeps `?tls=0` (only credentials are left out)."""
    root, emu, env = night
    given_in, elsewhere = tmp_path / "given-in", tmp_path / "elsewhere"
    given_in.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(given_in)
    plain_libsql = server.ws_url.replace("ws://", "libsql://") + "?tls=0"  # libsql:// is wss:// unless tls=0
    for url, shown in (("file:offsite.db", f"file://{given_in / 'offsite.db'}"), (plain_libsql, plain_libsql)):
        monkeypatch.chdir(given_in)
        paused = run("run", root, "--base-url", emu.url, "--rpm", "1000", "--rpd", "1", "--no-wait", "--force",
                     "--backup-to", url, "--json", env=env)
        assert json.loads(paused.stdout)["outcome"] == "paused", paused.output
        assert json.loads(paused.stdout)["backups"][0].startswith(f"backup to {shown} (paused for quota): ")
        monkeypatch.chdir(elsewhere)
        resumed = run("resume", root, "--rpd", "1000", "--json", env=env)
        summary = json.loads(resumed.stdout)
        assert summary["outcome"] == "complete" and summary["backup_failed"] is False, resumed.output
        assert summary["backups"][0].startswith(f"backup to {shown} (run complete): ")
    assert list(elsewhere.iterdir()) == [] and (given_in / "offsite.db").is_file()
    assert len(json.loads(run("backup", "list", "--from", server.url, "--json",
                              ).stdout)["snapshots"]) == 2


def test_a_runs_backup_repairs_damaged_blobs_on_the_remote_and_says_so(night, tmp_path):
    root, emu, env = night
    offsite = tmp_path / "offsite.db"
    first = run("run", root, "--base-url", emu.url, "--rpm", "1000", "--rpd", "1000",
                "--backup-to", f"file:{offsite}", "--json", env=env)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["backups"][0].startswith(f"backup to file://{offsite} (run complete): ")
    readme = root / "plugins" / "devops" / "deploy-checker" / "README.md"
    sqlite_rows(offsite, "UPDATE blobs SET size = size + 1 WHERE hash = ?",
                (hashlib.sha256(readme.read_bytes()).hexdigest(),))
    verified = run("backup", "verify", "--from", f"file:{offsite}", "--json")
    assert verified.exit_code == 1
    ((snapshot_seq, snapshot),) = sqlite_rows(
        root / ".overnight" / "overnight.db", "SELECT seq, json_extract(data, '$.tree_sha256') FROM events "
        "WHERE type = 'PluginSnapshotted' AND stream = 'plugin:plugins/devops/deploy-checker'")
    digest = hashlib.sha256(readme.read_bytes()).hexdigest()
    assert json.loads(verified.stdout)["problems"] == [  # with the event that needs it
        f"remote log: seq {snapshot_seq}: plugin snapshot {snapshot} names README.md: blob {digest} is incomplete "
        f"on the remote (1 of 1 chunks, {readme.stat().st_size} bytes of {readme.stat().st_size + 1})"]
    second = run("run", root, "--base-url", emu.url, "--rpm", "1000", "--rpd", "1000", "--force",
                 "--plugin", "meeting-notes", "--backup-to", f"file:{offsite}", env=env)
    assert second.exit_code == 0, second.output
    assert "  damaged blobs on the remote repaired: 1\n" in second.output
    assert run("backup", "verify", "--from", f"file:{offsite}").exit_code == 0


def test_backup_mends_damaged_or_missing_log_blobs_from_the_marketplace_or_the_backup(night, tmp_path):
    root, emu, env = night
    assert run("run", root, "--base-url", emu.url, "--rpm", "1000", "--rpd", "1000", env=env).exit_code == 0
    log = root / ".overnight" / "overnight.db"
    skill = root / "plugins" / "devops" / "deploy-checker" / "skills" / "deploy-checker" / "SKILL.md"
    readme = root / "plugins" / "productivity" / "meeting-notes" / "README.md"
    written, original = (hashlib.sha256(p.read_bytes()).hexdigest() for p in (skill, readme))
    drafts = [h for (h,) in sqlite_rows(
        log, "SELECT json_extract(data, '$.draft_sha256') FROM events WHERE type = 'SkillReceived' ORDER BY seq")]
    lost, damaged, later = drafts[:3]
    sqlite_rows(log, "UPDATE blobs SET data = x'00' WHERE hash IN (?, ?)", (written, damaged))
    sqlite_rows(log, "DELETE FROM blobs WHERE hash IN (?, ?)", (original, lost))
    ((snapshot_seq, snapshot),) = sqlite_rows(
        log, "SELECT seq, json_extract(data, '$.tree_sha256') FROM events WHERE type = 'PluginSnapshotted' "
             "AND stream = 'plugin:plugins/productivity/meeting-notes'")
    ((draft_seq,),) = sqlite_rows(log, "SELECT seq FROM events WHERE json_extract(data, '$.draft_sha256') = ?",
                                  (lost,))
    offsite = tmp_path / "offsite.db"
    url = f"file:{offsite}"

    first = backup_json(root, url)
    gone = (f"neither this marketplace nor the backup at file://{offsite} has its content: "
            "a restore of this log lacks it")
    assert sorted(first["warnings"]) == sorted([
        f"this log: seq {snapshot_seq}: plugin snapshot {snapshot} names README.md, whose blob {original} is "
        f"missing from the store: mended from {readme}, which has that content",
        f"this log: blob {written}: content does not match its hash: mended from {skill}, which has that content",
        f"this log: seq {draft_seq} (SkillReceived): blob {lost} (its draft) is missing from the store, and {gone}",
        f"this log: blob {damaged}: content does not match its hash, and {gone}"])  # each told once
    unmendable = [w for w in first["warnings"] if w.endswith(gone)]
    problems = json.loads(run("audit", "verify", root, "--json").stdout)["problems"]
    assert sorted(problems) == sorted([  # the mended two are whole again
        f"blob {damaged}: content does not match its hash",
        f"seq {draft_seq} (SkillReceived): blob {lost} (its draft) is missing from the store"])

    # damaged after it was backed up: the backup has it
    sqlite_rows(log, "UPDATE blobs SET data = x'00' WHERE hash = ?", (later,))
    again = backup_json(root, url)
    assert sorted(again["warnings"]) == sorted(unmendable + [
        f"this log: blob {later}: content does not match its hash: mended from the backup at file://{offsite}, "
        "which has that content"])
    assert len(json.loads(run("audit", "verify", root, "--json").stdout)["problems"]) == 2

    # bytes intact, only the recorded size wrong: mended from its own bytes
    sqlite_rows(log, "UPDATE blobs SET size = size + 1 WHERE hash = ?", (later,))
    third = backup_json(root, url)
    assert f"this log: blob {later}: content does not match its hash: mended from its own bytes (only its " \
           "recorded size was wrong), which has that content" in third["warnings"]

    # the backup loses a blob the log lost too, and the index row of another one
    gone_everywhere, unlisted = drafts[3], snapshot
    sqlite_rows(log, "DELETE FROM blobs WHERE hash = ?", (gone_everywhere,))
    sqlite_rows(offsite, "DELETE FROM blob_chunks WHERE hash = ?", (gone_everywhere,))
    sqlite_rows(offsite, "DELETE FROM blobs WHERE hash = ?", (gone_everywhere,))
    sqlite_rows(offsite, "DELETE FROM log_blobs WHERE hash = ?", (unlisted,))
    dest = tmp_path / "restored"
    restored = run("restore", "--from", url, "--to", dest)
    assert restored.exit_code == 0, restored.output  # files and events whole: lost drafts are warnings
    why = {lost: "the backup does not have it (the log backed up lacked it, or it was deleted from the backup)",
           damaged: "the backup does not have it (the log backed up lacked it, or it was deleted from the backup)",
           gone_everywhere: f"blob {gone_everywhere} is missing from the remote"}
    assert [line for line in restored.output.splitlines() if line.startswith("warning: ")] == [
        f"warning: restored log: seq {seq} (SkillReceived): blob {draft} (its draft) is missing from the store: "
        f"{why[draft]}" for seq, draft in sqlite_rows(
            log, "SELECT seq, json_extract(data, '$.draft_sha256') FROM events WHERE type = 'SkillReceived' "
                 "AND json_extract(data, '$.draft_sha256') IN (?, ?, ?) ORDER BY seq", tuple(why))]
    assert (dest / skill.relative_to(root)).read_bytes() == skill.read_bytes()
    assert sqlite_rows(dest / ".overnight" / "overnight.db", "SELECT count(*) FROM blobs WHERE hash = ?",
                       (unlisted,)) == [(1,)]  # the remote held it: restored

    # backup verify tells every log blob the backup cannot give back, also those no index row lists
    verified = run("backup", "verify", "--from", url, "--json")
    assert verified.exit_code == 1, verified.output
    assert sorted(json.loads(verified.stdout)["problems"]) == sorted(
        f"remote log: seq {seq} (SkillReceived): blob {draft} (its draft) is missing from the remote"
        for seq, draft in sqlite_rows(
            log, "SELECT seq, json_extract(data, '$.draft_sha256') FROM events "
                 "WHERE json_extract(data, '$.draft_sha256') IN (?, ?, ?)", (lost, damaged, gone_everywhere)))


def test_restore_fsyncs_every_file_and_directory_it_creates(market, tmp_path, monkeypatch):
    frozen = market / "plugins" / "devops" / "frozen"
    frozen.mkdir()
    (frozen / "notes.md").write_text("read-only directory\n")
    os.symlink("notes.md", frozen / "latest.md")
    os.chmod(frozen, 0o555)
    url = f"file:{tmp_path / 'offsite.db'}"
    backup_json(market, url)
    synced: set[tuple[int, int]] = set()
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    dest = tmp_path / "again"
    assert run("restore", "--from", url, "--to", dest).exit_code == 0
    monkeypatch.undo()
    restored = [p for p in dest.rglob("*") if ".overnight" not in p.relative_to(dest).parts
                and not p.is_symlink()]
    assert len(restored) > 20
    for path in restored + [dest, dest.parent]:
        st = os.stat(path)
        assert (st.st_dev, st.st_ino) in synced, path
    assert stat.S_IMODE(os.stat(dest / "plugins" / "devops" / "frozen").st_mode) == 0o555
    assert os.readlink(dest / "plugins" / "devops" / "frozen" / "latest.md") == "notes.md"


def sqlite_rows(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def schema(path: Path) -> list[tuple]:
    return sqlite_rows(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name")


def test_backup_refuses_a_database_that_is_not_a_backup_before_writing_anything(market, tmp_path):
    foreign = tmp_path / "foreign.db"
    sqlite_rows(foreign, "CREATE TABLE events (id INTEGER PRIMARY KEY, name TEXT)")
    sqlite_rows(foreign, "CREATE TABLE blobs (k TEXT, v BLOB)")
    sqlite_rows(foreign, "INSERT INTO events (name) VALUES ('theirs')")
    before = schema(foreign)
    result = run("backup", market, "--to", f"file:{foreign}")
    assert result.exit_code == 1
    assert result.output == (f"error: file://{foreign} is not an overnight backup "
                             "(its table events has columns id, name)\n")
    assert schema(foreign) == before and sqlite_rows(foreign, "SELECT name FROM events") == [("theirs",)]

    log = market / ".overnight" / "overnight.db"
    before = schema(log)
    result = run("backup", market, "--to", f"file:{log}")
    assert result.exit_code == 1
    assert "is not an overnight backup (its table blobs has columns hash, size, data)" in result.output
    assert schema(log) == before
    assert run("audit", "verify", market).exit_code == 0
    # the reading commands say the same of it: they said no backup was made yet ("run `overnight
    # backup` first", and `backup list` exited 0)
    for args in (["restore", "--from", f"file:{log}", "--to", tmp_path / "restored"], ["backup", "list", "--from",
                 f"file:{log}"], ["backup", "verify", "--from", f"file:{log}"]):
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr == (f"error: file://{log} is not an overnight backup "
                                 "(its table blobs has columns hash, size, data)\n"), (args, result.output)
    assert schema(log) == before and not (tmp_path / "restored").exists()

    empty = tmp_path / "empty.db"
    sqlite_rows(empty, "SELECT 1")  # an SQLite database with no table at all
    assert backup_json(market, f"file:{empty}")["snapshot"]["plugins"] == 4


def test_backing_up_another_log_is_refused_before_anything_is_shipped(market, tmp_path):
    url = f"file:{tmp_path / 'offsite.db'}"
    backup_json(market, url)
    other = tmp_path / "other"
    shutil.copytree(EXAMPLE, other, ignore=shutil.ignore_patterns(".overnight"))
    assert run("scan", other).exit_code == 0
    with open_log(other) as store:
        store.put_blob(b"a blob only the other log has")
    offsite = tmp_path / "offsite.db"
    before = [sqlite_rows(offsite, f"SELECT * FROM {table} ORDER BY 1")
              for table in ("events", "blobs", "log_blobs", "snapshots")]
    result = run("backup", other, "--to", url)
    assert result.exit_code == 1 and "another log" in result.output, result.output
    assert [sqlite_rows(offsite, f"SELECT * FROM {table} ORDER BY 1")
            for table in ("events", "blobs", "log_blobs", "snapshots")] == before


def test_a_log_that_lost_its_newest_events_is_told_so_with_both_counts(market, tmp_path):
    older = tmp_path / "older.db"
    shutil.copyfile(market / ".overnight" / "overnight.db", older)
    url = f"file:{tmp_path / 'offsite.db'}"
    backup_json(market, url)
    backup_json(market, url)  # ships the first backup's event: the remote is now ahead of `older`
    (local,) = sqlite_rows(older, "SELECT count(*) FROM events")[0]
    (remote,) = sqlite_rows(tmp_path / "offsite.db", "SELECT count(*) FROM events")[0]
    assert remote == local + 1
    result = run("backup", market, "--db", older, "--to", url)
    assert result.exit_code == 1
    assert result.output == (f"error: file://{tmp_path / 'offsite.db'} holds {remote} events but this log "
                             f"only {local}: this log has lost its newest events, or it was restored from an "
                             "older snapshot there (back it up to another URL), or the remote belongs to another "
                             "log\n")


def test_resume_backs_up_elsewhere_or_not_at_all_from_now_on(night, tmp_path):
    """After a restore of an older snapshot the URL a run recorded no longer takes its log,
    and every resume, by hand, from cron or after a quota pause, failed backing up there, with
    no way to name another."""
    root, emu, env = night
    one, two = f"file:{tmp_path / 'one.db'}", f"file:{tmp_path / 'two.db'}"

    def snapshots(url: str) -> int:
        return len(json.loads(run("backup", "list", "--from", url, "--json").stdout)["snapshots"])

    go = ("--base-url", emu.url, "--rpm", "1000", "--rpd", "1000")
    assert run("run", root, *go, "--backup-to", one, "--max-requests", "2", env=env).exit_code == 0
    assert run("resume", root, "--backup-to", two, "--max-requests", "4", env=env).exit_code == 0
    assert (snapshots(one), snapshots(two)) == (1, 1)
    assert run("resume", root, "--max-requests", "6", env=env).exit_code == 0  # the URL now recorded
    assert (snapshots(one), snapshots(two)) == (1, 2)
    both = run("resume", root, "--no-backup", "--backup-to", two, env=env)
    assert both.exit_code == 2 and "--backup-to and --no-backup contradict each other" in both.output
    finished = run("resume", root, "--no-backup", "--max-requests", "100", "--json", env=env)
    assert finished.exit_code == 0, finished.output
    assert json.loads(finished.stdout)["outcome"] == "complete"
    assert (snapshots(one), snapshots(two)) == (1, 2)
    assert run("audit", "verify", root).exit_code == 0
    changes = [json.loads(d) for (d,) in sqlite_rows(root / ".overnight" / "overnight.db",
               "SELECT data FROM events WHERE type = 'BackupTargetChanged' ORDER BY seq")]
    assert [(c["backup_to"], c["reason"]) for c in changes] == [
        (f"file://{tmp_path / 'two.db'}", f"resume with --backup-to file://{tmp_path / 'two.db'}"),
        (None, "resume with --no-backup")]


def test_a_restore_after_a_backup_cut_short_keeps_its_events_and_goes_on_backing_up_there(night, tmp_path):
    """A backup ships blobs and events before its snapshot row: cut short, the remote holds
    events past its newest snapshot. A restore gives them back too, so the restored log can
    go on backing up to the same remote."""
    root, emu, env = night
    url = f"file:{tmp_path / 'offsite.db'}"
    assert run("scan", root).exit_code == 0
    first = backup_json(root, url)
    assert run("run", root, "--base-url", emu.url, "--rpm", "1000", "--rpd", "1000", env=env).exit_code == 0
    cut = backup_json(root, url)  # as if cut short before its snapshot row:
    sqlite_rows(tmp_path / "offsite.db", "DELETE FROM snapshots WHERE id = ?", (cut["snapshot"]["id"],))
    shipped = cut["snapshot"]["last_seq"]
    past = shipped - first["snapshot"]["last_seq"]
    dest = tmp_path / "restored"
    restored = run("restore", "--from", url, "--to", dest, "--json")
    assert restored.exit_code == 0, restored.output
    report = json.loads(restored.stdout)
    assert report["events"] == shipped
    assert report["warnings"] == [
        f"the remote holds {past} events past this snapshot (seq {first['snapshot']['last_seq'] + 1}-{shipped}), "
        "shipped by a backup that did not finish: restored too, so this log goes on from there; the files are as "
        f"of seq {first['snapshot']['last_seq']}, and the next run does again the work those events record"]
    assert run("audit", "verify", dest).exit_code == 0
    assert run("run", dest, "--base-url", emu.url, "--rpm", "1000", "--rpd", "1000", env=env).exit_code == 0
    assert json.loads(run("status", dest, "--json").stdout)["by_state"] == \
        json.loads(run("status", root, "--json").stdout)["by_state"]  # the work done again
    again = run("backup", dest, "--to", url)
    assert again.exit_code == 0, again.output
    # an older snapshot is restored as it was: its own events only
    older = run("restore", "--from", url, "--to", tmp_path / "older", "--snapshot", first["snapshot"]["id"],
                "--json")
    assert older.exit_code == 0 and json.loads(older.stdout)["events"] == first["snapshot"]["last_seq"]


def test_backup_ships_no_event_past_a_break_in_the_local_hash_chain(market, tmp_path):
    url = f"file:{tmp_path / 'offsite.db'}"
    first = backup_json(market, url)
    shipped = first["snapshot"]["last_seq"]
    log = market / ".overnight" / "overnight.db"
    sqlite_rows(log, "DROP TRIGGER events_no_update")
    sqlite_rows(log, "UPDATE events SET data = '{}' WHERE seq = ?", (shipped + 1,))  # the backup's event
    result = run("backup", market, "--to", url)
    assert result.exit_code == 1
    assert f"seq {shipped + 1}: hash mismatch" in result.output and "overnight audit verify" in result.output
    assert len(result.output.splitlines()) == 1
    offsite = tmp_path / "offsite.db"
    assert sqlite_rows(offsite, "SELECT max(seq) FROM events") == [(shipped,)]
    assert sqlite_rows(offsite, "SELECT count(*) FROM snapshots") == [(1,)]


def test_backup_repairs_damaged_blobs_it_has_and_warns_of_the_others(market, tmp_path):
    offsite = tmp_path / "offsite.db"
    url = f"file:{offsite}"
    first = backup_json(market, url)
    assets = market / "plugins" / "devops" / "deploy-checker" / "assets.bin"
    tool = market / "plugins" / "devops" / "deploy-checker" / "run.sh"
    log_blob = hashlib.sha256(b"a log blob " * 100_000).hexdigest()
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (assets, tool)}
    sqlite_rows(offsite, "DELETE FROM blob_chunks WHERE hash = ? AND idx = 1", (sha[assets],))
    sqlite_rows(offsite, "UPDATE blobs SET size = size + 1 WHERE hash = ?", (sha[tool],))
    sqlite_rows(offsite, "DELETE FROM blob_chunks WHERE hash = ?", (first["snapshot"]["root"],))
    sqlite_rows(offsite, "DELETE FROM blobs WHERE hash = ?", (log_blob,))
    nobody, stray = "f" * 64, "e" * 64  # damaged, and no copy of them here
    sqlite_rows(offsite, "INSERT INTO blobs (hash, size, chunks) VALUES (?, 10, 1)", (nobody,))
    sqlite_rows(offsite, "INSERT INTO log_blobs (hash) VALUES (?)", (stray,))
    assert run("backup", "verify", "--from", url).exit_code == 1

    second = backup_json(market, url)
    assert second["blobs_repaired"] == 4
    assert len(second["warnings"]) == 2
    assert second["warnings"][0].startswith(f"blob {nobody} is incomplete on the remote (0 of 1 chunks")
    assert second["warnings"][1].startswith(f"log blob {stray} is missing from the remote, and neither "
                                            "this log nor this marketplace has a copy")
    result = run("backup", market, "--to", url)
    assert result.exit_code == 0, result.output
    assert "repaired" not in result.output  # nothing left to repair
    assert [line for line in result.output.splitlines() if line.startswith("warning: ")] == \
        [f"warning: {w}" for w in second["warnings"]]

    sqlite_rows(offsite, "DELETE FROM blobs WHERE hash = ?", (nobody,))
    sqlite_rows(offsite, "DELETE FROM log_blobs WHERE hash = ?", (stray,))
    result = run("backup", "verify", "--from", url, "--read-data", "100")
    assert result.exit_code == 0, result.output
    dest = tmp_path / "restored"
    assert run("restore", "--from", url, "--to", dest, "--snapshot", first["snapshot"]["id"]).exit_code == 0
    assert run("audit", "verify", dest).exit_code == 0


@pytest.mark.parametrize("over", ["file", "http"])
def test_backup_ships_again_events_deleted_from_the_remote_and_warns_of_its_deleted_snapshot(
        market, tmp_path, request, over):
    offsite = tmp_path / "remote.db"  # the server fixture's database
    url = request.getfixturevalue("server").url if over == "http" else f"file:{offsite}"
    backup_json(market, url)
    second = backup_json(market, url if over == "http" else f"file:{tmp_path}/market/../remote.db")  # the same file
    head = second["snapshot"]["last_seq"]
    sqlite_rows(offsite, "DELETE FROM events WHERE seq IN (1, 3, 4, ?)", (head - 1,))
    sqlite_rows(offsite, "DELETE FROM snapshots WHERE id = ?", (second["snapshot"]["id"],))
    assert run("backup", "verify", "--from", url).exit_code == 1
    (at,) = sqlite_rows(market / ".overnight" / "overnight.db",
                        "SELECT at FROM events WHERE stream = 'backup' ORDER BY seq DESC LIMIT 1")[0]

    result = run("backup", market, "--to", url)
    assert result.exit_code == 0, result.output
    assert "\nshipped again 4 events missing from the remote\n" in result.output
    assert result.output.endswith(f"\nwarning: snapshot {second['snapshot']['id']}, made by this log's last "
                                  f"backup here ({at}), is missing from the remote: deleted there? This backup "
                                  "makes a new one\n")
    assert run("backup", "verify", "--from", url).exit_code == 0
    again = backup_json(market, url)
    assert (again["events_repaired"], again["warnings"]) == (0, [])


def test_backup_skips_the_symlinks_restore_would_refuse_and_says_so(market, tmp_path):
    os.symlink("/etc/passwd", market / "plugins" / "x")
    os.symlink("../../etc", market / "plugins" / "y")
    os.symlink(".", market / "here")
    os.symlink("here/..", market / "sneaky")  # reads as inside, resolves to the parent
    url = f"file:{tmp_path / 'offsite.db'}"
    report = backup_json(market, url)
    assert report["warnings"] == [
        "plugins/x: symlink to '/etc/passwd' is absolute; skipped: restore would refuse it",
        "plugins/y: symlink to '../../etc' escapes the tree; skipped: restore would refuse it",
        "sneaky: symlink to 'here/..' resolves outside the tree; skipped: restore would refuse it",
    ]
    text = run("backup", market, "--to", url)
    assert text.exit_code == 0 and "warning: plugins/x: symlink to '/etc/passwd' is absolute" in text.output
    assert run("backup", "verify", "--from", url).exit_code == 0
    dest = tmp_path / "restored"
    result = run("restore", "--from", url, "--to", dest)
    assert result.exit_code == 0, result.output
    links = {k: v for k, v in tree_hashes(dest).items() if v.startswith("link:")}
    assert links == {"here": "link:.", "plugins/devops/run-link": "link:../deploy-checker/run.sh"}


def test_a_log_kept_inside_the_marketplace_is_not_copied_as_files_and_a_fifo_is_skipped_with_a_warning(
        market, tmp_path):
    log = market / "state" / "ov.db"
    assert run("scan", market, "--db", log).exit_code == 0
    os.mkfifo(market / "plugins" / "pipe")
    url = f"file:{tmp_path / 'offsite.db'}"
    result = run("backup", market, "--db", log, "--to", url, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["warnings"] == ["plugins/pipe: a fifo, not a file; skipped"]
    dest = tmp_path / "again"
    assert run("restore", "--from", url, "--to", dest).exit_code == 0
    restored = tree_hashes(dest)
    assert not [name for name in restored if name.startswith("state/")]  # ov.db, -wal, -shm, .lock
    assert {k for k in tree_hashes(market) if not k.startswith(("state/", ".git/"))} == set(restored)
    assert run("audit", "verify", dest).exit_code == 0  # the log, shipped event by event


@needs_permissions
def test_what_cannot_be_read_is_left_out_of_a_backup_with_a_warning(market, tmp_path):
    """One file or directory the user cannot read (the scan refuses its plugin) stopped every
    backup with an internal error: no off-site copy at all."""
    assert run("scan", market).exit_code == 0
    locked = market / "plugins" / "devops" / "deploy-checker" / "locked.md"
    locked.write_text("private\n")
    closed = market / "plugins" / "database" / "closed"
    closed.mkdir()
    (closed / "inside.md").write_text("private\n")
    locked.chmod(0o000)
    closed.chmod(0o000)
    offsite = tmp_path / "offsite.db"
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("TURSO_AUTH_TOKEN", "OVERNIGHT_BACKUP_URL")}
        result = subprocess.run([*unprivileged(), sys.executable, "-m", "cli", "backup", str(market), "--to",
                                 f"file:{offsite}", "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)
    finally:
        locked.chmod(0o644)
        closed.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["warnings"] == [
        "plugins/database/closed: cannot be read (Permission denied); skipped: the backup does not hold it",
        "plugins/devops/deploy-checker/locked.md: cannot be read (Permission denied); skipped: the backup does not "
        "hold it"]
    dest = tmp_path / "restored"
    assert run("restore", "--from", f"file:{offsite}", "--to", dest).exit_code == 0
    left_out = (".git/", "plugins/database/closed", str(locked.relative_to(market)))
    assert tree_hashes(dest) == {k: v for k, v in tree_hashes(market).items() if not k.startswith(left_out)}


def test_a_backup_file_inside_the_marketplace_is_left_out_of_its_snapshots(market, tmp_path, monkeypatch):
    files = backup_json(market, f"file:{tmp_path / 'elsewhere.db'}")["snapshot"]["files"]
    monkeypatch.chdir(market)  # PATH defaults to here: `overnight backup --to file:backup.db`
    for _ in range(3):
        result = run("backup", "--to", "file:backup.db", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["snapshot"]["files"] == files
    dest = tmp_path / "restored"
    assert run("restore", "--from", f"file:{market / 'backup.db'}", "--to", dest).exit_code == 0
    assert not list(dest.glob("backup.db*"))


def test_backup_refuses_a_directory_without_an_event_log(tmp_path):
    plain = tmp_path / "plain"
    (plain / "plugins").mkdir(parents=True)  # a marketplace never scanned
    (plain / "notes.md").write_text("not scanned yet\n")
    result = run("backup", plain, "--to", f"file:{tmp_path / 'offsite.db'}")
    assert result.exit_code == 1
    assert result.output == (f"error: no event log at {plain.resolve()}/.overnight/overnight.db "
                             "(run `overnight scan` first, or pass --db)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]
    assert sorted(p.name for p in plain.iterdir()) == ["notes.md", "plugins"]


def test_verify_counts_each_tree_once_however_many_snapshots_reach_it(market, tmp_path):
    url = f"file:{tmp_path / 'offsite.db'}"
    for _ in range(3):
        backup_json(market, url)
    result = run("backup", "verify", "--from", url, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    dirs = [p for p in market.rglob("*") if p.is_dir() and not p.is_symlink()
            and not {".overnight", ".git"} & set(p.relative_to(market).parts)]
    assert report["snapshots"] == 3 and report["trees"] == len(dirs) + 1  # and the root


@needs_permissions
def test_restore_onto_an_empty_disk_builds_on_that_disk(market, tmp_path):
    """A fresh disk mounted as the destination: a restore built beside it (on the parent's file
    system) could not be renamed onto it, so it is built inside it."""
    from tests.torture.test_disk_faults import can_mount

    if not can_mount():
        pytest.skip("mount -t tmpfs is not permitted here")
    offsite = f"file:{tmp_path / 'offsite.db'}"
    backup_json(market, offsite)
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    try:
        result = run("restore", "--from", offsite, "--to", disk)
        assert result.exit_code == 0, result.output
        assert tree_hashes(disk) == {k: v for k, v in tree_hashes(market).items() if not k.startswith(".git/")}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "market", "offsite.db"]
        assert not [p.name for p in disk.iterdir() if ".restoring-" in p.name]
        assert run("audit", "verify", disk).exit_code == 0
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_plugin_nested_deeper_than_pythons_recursion_limit_is_backed_up_and_restored(market, tmp_path, request):
    """Walking the marketplace recursed once per directory level: 1,200 levels stopped every backup."""
    dest = tmp_path / "restored"
    request.addfinalizer(lambda: [remove_deep(p) for p in (market, dest) if p.exists()])  # pytest's recurses
    deep_tree(market / "plugins" / "devops" / "deploy-checker", 1200)
    offsite = f"file:{tmp_path / 'offsite.db'}"
    assert backup_json(market, offsite)["snapshot"]["files"] > 0
    restored = run("restore", "--from", offsite, "--to", dest)
    assert restored.exit_code == 0, restored.output
    assert bottom(dest / "plugins" / "devops" / "deploy-checker", 1200) == "at the bottom\n"
    assert run("backup", "verify", "--from", offsite).exit_code == 0


def test_restore_into_an_empty_directory_whose_parent_this_user_cannot_write(market, tmp_path):
    """An administrator made the empty destination for the user inside a directory the user
    cannot write: the restore is built inside it, then moved up; a damaged one stays in
    DEST/.incomplete, and the destination holds nothing else. A read-only directory of the
    backup is moved up too (moving it needs it writable: its mode comes after)."""
    offsite = tmp_path / "offsite.db"
    (market / "plugins").chmod(0o555)
    try:
        backup_json(market, f"file:{offsite}")
    finally:
        (market / "plugins").chmod(0o755)
    before = tree_hashes(market)
    parent = tmp_path / "srv"
    dest, damaged = parent / "market", parent / "other"
    for d in (dest, damaged):
        d.mkdir(parents=True)
    parent.chmod(0o555)

    def restore(to: Path) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("TURSO_AUTH_TOKEN", "OVERNIGHT_BACKUP_URL")}
        return subprocess.run([*unprivileged(), sys.executable, "-m", "cli", "restore", "--from", f"file:{offsite}",
                               "--to", str(to)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    try:
        result = restore(dest)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("restored snapshot ") and f" into {dest}: " in result.stdout
        assert tree_hashes(dest) == {k: v for k, v in before.items() if not k.startswith(".git/")}
        assert stat.S_IMODE((dest / "plugins").stat().st_mode) == 0o555
        assert not [p.name for p in dest.iterdir() if ".restoring-" in p.name]
        assert sorted(p.name for p in parent.iterdir()) == ["market", "other"]
        assert run("audit", "verify", dest).exit_code == 0

        assets = market / "plugins" / "devops" / "deploy-checker" / "assets.bin"
        sqlite_rows(offsite, "DELETE FROM blob_chunks WHERE hash = ? AND idx = 1",
                    (hashlib.sha256(assets.read_bytes()).hexdigest(),))
        broken = restore(damaged)
        assert broken.returncode == 1, broken.stderr
        assert f"what could be restored and verified is in {damaged / '.incomplete'}" in broken.stdout
        assert [p.name for p in damaged.iterdir()] == [".incomplete"]
        assert not (damaged / ".incomplete" / "plugins" / "devops" / "deploy-checker" / "assets.bin").exists()
    finally:
        parent.chmod(0o755)
