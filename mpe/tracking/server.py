"""A project-local MLflow tracking server on PostgreSQL (``mpe tracking-server start|stop|status``).

``start`` initialises a PostgreSQL cluster in a project folder once (TCP on 127.0.0.1 only, an
unprivileged role ``mlflow`` that owns the ``mlflow`` database and may connect to nothing else, its
generated password in a 0600 libpq passfile), starts it, then runs ``mlflow server`` against it with a
local artifact folder. A second ``start`` reuses what runs; ``stop`` ends both. The password never
appears in a command line, an URI, params or a log: MLflow's driver reads it from the passfile.

PostgreSQL refuses to run as root, so as root the cluster runs as an unprivileged OS user (``postgres``,
which Debian's package creates, or ``--os-user``) through ``runuser``; the folder then has to be
reachable by that user.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mpe.errors import ServiceError
from mpe.files.atomic import write_json
from mpe.runtime.loopback import free_port, port_free

DEFAULT_DIR = ".mlflow-pg"
DEFAULT_PORT = 5000
ROLE = DATABASE = "mlflow"
# Every process of a folder's server (MLflow, its uvicorn workers, PostgreSQL and its backends) inherits
# MPE_TRACKING_SERVER=<folder>: how status finds them all, and stop ends them, whoever their parent is now.
MARKER = "MPE_TRACKING_SERVER"


class Layout:
    """The files of one server folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.pgdata = self.root / "pgdata"
        self.socket = self.root / "socket"  # postgres' unix socket: 0700, the superuser's way in (peer)
        self.passfile = self.root / "pgpass"  # 0600, libpq format
        self.cluster = self.root / "cluster.json"  # port and OS user of the cluster, fixed at initdb
        self.state = self.root / "server.json"  # the running MLflow server: pid, port, URI
        self.artifacts = self.root / "artifacts"
        self.pg_log = self.root / "postgres.log"
        self.mlflow_log = self.root / "mlflow.log"


def pg_bindir() -> Path:
    """The folder of initdb/pg_ctl/psql: Debian keeps them off PATH, under /usr/lib/postgresql/N/bin."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise ServiceError(
        "PostgreSQL's initdb was not found (neither /usr/lib/postgresql/*/bin nor PATH): "
        "install PostgreSQL (Debian/Ubuntu: apt-get install postgresql)"
    )


def _os_user(requested: str | None) -> str | None:
    """Who runs PostgreSQL: None (this user) unless we are root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        if requested and requested != pwd.getpwuid(os.geteuid()).pw_name:
            raise ServiceError(f"--os-user {requested}: only root can run PostgreSQL as another user")
        return None
    name = requested or "postgres"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ServiceError(
            f"running as root, and PostgreSQL refuses root: OS user '{name}' does not exist; "
            "create an unprivileged one (useradd --system postgres) or pass --os-user"
        ) from None
    if entry.pw_uid == 0:
        raise ServiceError(f"--os-user {name} is root: PostgreSQL needs an unprivileged user")
    return name


def _as(user: str | None, cmd: list) -> list[str]:
    return [*(["runuser", "-u", user, "--"] if user else []), *map(str, cmd)]


def _run(cmd: list[str], lay: Layout, what: str, stdin: str | None = None) -> str:
    # cwd: the server folder, which the OS user can reach (the caller's cwd may not be)
    out = subprocess.run(
        cmd,
        cwd=lay.root,
        env=_server_env(lay),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode != 0:
        raise ServiceError(
            f"{what} failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-1500:]}\nlog: {lay.pg_log}"
        )
    return out.stdout


def _server_env(lay: Layout, **extra) -> dict:
    """The environment of the folder's processes: its mark, and no run owner's (the server outlives the command
    that starts it; ``mpe.runtime.lifeline``)."""
    env = {k: v for k, v in os.environ.items() if k != "MPE_OWNER"}
    return {**env, MARKER: str(lay.root), **extra}


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = 4096) -> str:
    """PostgreSQL's stored form of a SCRAM-SHA-256 password (RFC 5802/7677), so that the plain password
    never reaches the server (nor its log, should the statement fail)."""
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


def _write_secret(path: Path, text: str) -> None:
    """Write ``text`` readable by its owner only from the first byte on, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _chown(path: Path, user: str | None) -> None:
    if user:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _check_reachable(lay: Layout, user: str) -> None:
    out = subprocess.run(_as(user, ["test", "-w", lay.pgdata.parent / "socket"]), capture_output=True)
    if out.returncode != 0:
        blocked = next(
            (
                p
                for p in [*reversed(lay.root.parents), lay.root]
                if subprocess.run(_as(user, ["test", "-x", p]), capture_output=True).returncode
            ),
            lay.root,
        )
        raise ServiceError(
            f"{lay.root}: OS user '{user}' (who runs PostgreSQL, since root may not) cannot reach "
            f"this folder: {blocked} is not traversable for it; `chmod o+x {blocked}` or pass "
            "--dir a folder it can reach"
        )


def _pg_superuser(user: str | None) -> str:
    # peer authentication maps the OS user to the database role of the same name
    return user or pwd.getpwuid(os.geteuid()).pw_name


def _init_cluster(lay: Layout, user: str | None, bindir: Path) -> None:
    """initdb into a temporary folder, configure, create the role and database, then rename it into
    place: an interrupted init leaves no half cluster behind."""
    tmp = lay.root / "pgdata.init"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    _chown(tmp, user)
    superuser = _pg_superuser(user)
    _run(
        _as(
            user,
            [
                bindir / "initdb",
                "-D",
                tmp,
                "-U",
                superuser,
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-instructions",
            ],
        ),
        lay,
        "initdb",
    )
    port = free_port()
    if "'" in str(lay.socket):
        raise ServiceError(f"{lay.root}: a folder name with a quote cannot hold the PostgreSQL socket")
    with open(tmp / "postgresql.conf", "a") as conf:  # appending keeps the file's owner
        conf.write(
            f"\n# mpe tracking server: loopback TCP only; the socket is for the superuser alone\n"
            f"listen_addresses = '127.0.0.1'\nport = {port}\n"
            f"unix_socket_directories = '{lay.socket}'\nunix_socket_permissions = 0700\n"
            "password_encryption = scram-sha-256\n"
        )
    with open(tmp / "pg_hba.conf", "w") as hba:
        hba.write(f"local all {superuser} peer\nhost {DATABASE} {ROLE} 127.0.0.1/32 scram-sha-256\n")
    password = secrets.token_urlsafe(32)
    _write_secret(lay.passfile, f"127.0.0.1:{port}:{DATABASE}:{ROLE}:{password}\n")
    _pg_ctl(lay, user, bindir, "start", tmp)
    try:
        sql = (
            f"CREATE ROLE {ROLE} LOGIN PASSWORD '{scram_verifier(password)}';\n"
            f"CREATE DATABASE {DATABASE} OWNER {ROLE};\n"
            f"REVOKE ALL ON DATABASE postgres, template1 FROM PUBLIC;\n"
        )
        _run(
            _as(
                user,
                [
                    bindir / "psql",
                    "-h",
                    lay.socket,
                    "-p",
                    port,
                    "-U",
                    superuser,
                    "-d",
                    "postgres",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-f",
                    "-",
                ],
            ),
            lay,
            "creating the mlflow role and database",
            sql,
        )
    finally:
        _pg_ctl(lay, user, bindir, "stop", tmp)
    write_json(lay.cluster, {"pg_port": port, "os_user": user, "superuser": superuser, "bindir": str(bindir)})
    tmp.rename(lay.pgdata)


def _pg_ctl(lay: Layout, user: str | None, bindir: Path, action: str, pgdata: Path | None = None) -> None:
    extra = ["-l", lay.pg_log, "-t", "60"] if action == "start" else ["-m", "fast", "-t", "60"]
    if action == "start":
        lay.pg_log.touch()
        _chown(lay.pg_log, user)
    _run(_as(user, [bindir / "pg_ctl", "-D", pgdata or lay.pgdata, "-w", *extra, action]), lay, f"pg_ctl {action}")


def _pg_running(lay: Layout, user: str | None, bindir: Path) -> bool:
    out = subprocess.run(
        _as(user, [bindir / "pg_ctl", "-D", lay.pgdata, "status"]),
        cwd=lay.root,
        env=_server_env(lay),
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    return out.returncode == 0


def _healthy(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _alive(pid: int, lay: Layout) -> bool:
    """Whether ``pid`` is still this folder's MLflow server (not a reused pid, not a zombie)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return status != "Z" and b"server" in cmdline and str(lay.artifacts).encode() in cmdline


def _proc(pid: int) -> tuple[list[str], int, bytes] | None:
    """``(command line, parent pid, environment)`` of a live process, or None (gone, a zombie, or not ours
    to read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return [a.decode(errors="replace") for a in cmdline.split(b"\0") if a], int(fields[1]), environ


def _postmaster(lay: Layout) -> int | None:
    """The pid ``pgdata/postmaster.pid`` names, if that process is alive and a PostgreSQL server."""
    try:
        pid = int((lay.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    proc = _proc(pid)
    return pid if proc and proc[0] and "postgres" in Path(proc[0][0]).name else None


def processes(folder: str | Path = DEFAULT_DIR) -> list[dict]:
    """Every live process of the folder's server, whoever its parent is now: ``{pid, ppid, role, command}``
    with role ``mlflow server``, ``mlflow worker``, ``postgresql`` (the postmaster) or ``postgresql child``."""
    lay = Layout(folder)
    mark = f"{MARKER}={lay.root}".encode()
    main = json.loads(lay.state.read_text()).get("pid") if lay.state.exists() else None
    postmaster = _postmaster(lay)
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        pid = int(d.name)
        proc = _proc(pid)
        if proc is None or pid == os.getpid():
            continue
        cmdline, ppid, environ = proc
        try:  # PostgreSQL writes its process titles over its environment; its processes work in pgdata
            in_pgdata = os.readlink(f"/proc/{pid}/cwd") == str(lay.pgdata)
        except OSError:
            in_pgdata = False
        if mark not in environ.split(b"\0") and pid not in (main, postmaster) and not in_pgdata:
            continue
        if pid == main and not _alive(pid, lay):
            continue
        name = Path(cmdline[0]).name if cmdline else ""
        if pid == postmaster:
            role = "postgresql"
        elif "postgres" in name or (cmdline and cmdline[0].startswith("postgres:")):
            role = "postgresql child"
        elif "pg_ctl" in name or "runuser" in name:
            continue  # a start or stop in progress, not the server
        else:
            role = "mlflow server" if pid == main else "mlflow worker"
        out.append({"pid": pid, "ppid": ppid, "role": role, "command": " ".join(cmdline)[:160]})
    return sorted(out, key=lambda p: p["pid"])


def _database_answers(lay: Layout, pg_port: int) -> bool:
    """Whether PostgreSQL takes a query from MLflow's role, as the MLflow server connects (TCP, passfile)."""
    import psycopg

    try:
        with psycopg.connect(
            host="127.0.0.1",
            port=pg_port,
            dbname=DATABASE,
            user=ROLE,
            passfile=str(lay.passfile),
            connect_timeout=5,
        ) as conn:
            conn.execute("select 1")
        return True
    except (psycopg.Error, OSError):
        return False


def status(folder: str | Path = DEFAULT_DIR) -> dict | None:
    """What runs of ``folder``'s server, checked end to end, or None when nothing does.

    ``healthy`` only when the MLflow server process lives and answers ``/health`` and PostgreSQL runs and
    answers MLflow's role; otherwise ``problems`` says what is wrong. ``processes`` lists every process of
    the folder (orphaned uvicorn workers and PostgreSQL children included)."""
    lay = Layout(folder)
    state = json.loads(lay.state.read_text()) if lay.state.exists() else None
    cluster = json.loads(lay.cluster.read_text()) if lay.cluster.exists() else {}
    procs = processes(lay.root)
    if state is None and not procs:
        return None
    main = state is not None and _alive(state["pid"], lay)
    answers = state is not None and _healthy(state["port"])
    postmaster = _postmaster(lay)
    database = postmaster is not None and "pg_port" in cluster and _database_answers(lay, cluster["pg_port"])
    workers = [p["pid"] for p in procs if p["role"] == "mlflow worker"]
    problems = []
    if state is None:
        problems.append(f"no MLflow server was started ({lay.state} is missing)")
    elif not main:
        problems.append(
            f"the MLflow server (pid {state['pid']}) is gone"
            + (f", but {len(workers)} of its workers still run (pids {workers})" if workers else "")
            + (" and answer on its port" if answers else "")
        )
    elif not answers:
        problems.append(f"the MLflow server (pid {state['pid']}) does not answer on 127.0.0.1:{state['port']}/health")
    if postmaster is None:
        children = [p["pid"] for p in procs if p["role"] == "postgresql child"]
        problems.append(
            "PostgreSQL is not running" + (f" (orphaned children left: pids {children})" if children else "")
        )
    elif not database:
        problems.append(
            f"PostgreSQL (pid {postmaster}) does not answer on 127.0.0.1:{cluster.get('pg_port')} (see {lay.pg_log})"
        )
    return {
        **(state or {}),
        "pg_port": cluster.get("pg_port"),
        "healthy": not problems,
        "mlflow_server": main,
        "answers": answers,
        "postgresql_pid": postmaster,
        "database": database,
        "problems": problems,
        "processes": procs,
    }


def _wait_healthy(port: int, exited, lay: Layout, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _healthy(port):
        if exited():
            raise ServiceError(
                f"mlflow server exited while starting; its log ({lay.mlflow_log}) ends:\n"
                + lay.mlflow_log.read_text(errors="replace")[-2000:]
            )
        if time.monotonic() > deadline:
            raise ServiceError(
                f"mlflow server on 127.0.0.1:{port} not healthy after {timeout:.0f}s; see {lay.mlflow_log}"
            )
        time.sleep(0.5)


def start(
    folder: str | Path = DEFAULT_DIR,
    port: int = DEFAULT_PORT,
    os_user: str | None = None,
    workers: int = 2,
    timeout: float = 180.0,
) -> dict:
    """Start (or find running) the PostgreSQL cluster and the MLflow server of ``folder``."""
    lay = Layout(folder)
    running = status(lay.root)
    repaired: list[str] = []
    if running is not None and running["healthy"]:
        return {**running, "already_running": True, "repaired": repaired}
    if running is not None and running["mlflow_server"] and running["database"] and not running["answers"]:
        _wait_healthy(running["port"], lambda: not _alive(running["pid"], lay), lay, timeout)  # still starting
        return {**status(lay.root), "already_running": True, "repaired": repaired}
    if running is not None:  # half of it runs: end what is left, then start it whole
        repaired = running["problems"]
        stop(lay.root)
    lay.root.mkdir(parents=True, exist_ok=True)
    if lay.cluster.exists() and lay.pgdata.exists():
        cluster = json.loads(lay.cluster.read_text())
        user, bindir = cluster["os_user"], Path(cluster["bindir"])
        if not (bindir / "pg_ctl").exists():
            bindir = pg_bindir()
    else:
        user, bindir = _os_user(os_user), pg_bindir()
    for d in (lay.socket, lay.artifacts):
        d.mkdir(exist_ok=True)
    lay.socket.chmod(0o700)
    _chown(lay.socket, user)
    if user:
        _check_reachable(lay, user)
    if len(str(lay.socket / ".s.PGSQL.65535")) > 107:
        raise ServiceError(f"{lay.root}: the path is too long for PostgreSQL's socket (107 bytes); use a shorter --dir")
    if not (lay.cluster.exists() and lay.pgdata.exists()):
        _init_cluster(lay, user, bindir)
    cluster = json.loads(lay.cluster.read_text())
    started_pg = False
    if not _pg_running(lay, user, bindir):
        if not port_free(cluster["pg_port"]):
            raise ServiceError(f"port {cluster['pg_port']} on 127.0.0.1 (this folder's PostgreSQL) is in use")
        _pg_ctl(lay, user, bindir, "start")
        started_pg = True
    if not port_free(port):
        if started_pg:
            _pg_ctl(lay, user, bindir, "stop")
        raise ServiceError(f"port {port} on 127.0.0.1 is in use: pass --port (make tracking-server TRACKING_PORT=...)")
    # no password here: libpq reads PGPASSFILE; the dialect named, not left to SQLAlchemy's default driver
    backend = f"postgresql+psycopg://{ROLE}@127.0.0.1:{cluster['pg_port']}/{DATABASE}"
    env = _server_env(
        lay,
        PGPASSFILE=str(lay.passfile),
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
    )
    with open(lay.mlflow_log, "a") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                backend,
                "--artifacts-destination",
                str(lay.artifacts),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            cwd=lay.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    state = {"tracking_uri": f"http://127.0.0.1:{port}", "port": port, "pid": proc.pid, "pg_port": cluster["pg_port"]}
    write_json(lay.state, state)
    try:
        _wait_healthy(port, lambda: proc.poll() is not None, lay, timeout)  # /proc/cmdline lags the exec
    except BaseException:
        stop(lay.root)
        raise
    return {**state, "healthy": True, "already_running": False, "repaired": repaired}


def _end_group(pid: int, lay: Layout, grace: float = 30.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while _alive(pid, lay) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)  # what is left of the group (uvicorn workers that ignored TERM)
    except ProcessLookupError:
        pass


def _end(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is still there after ``grace``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_proc(pid) for pid in pids):
            time.sleep(0.1)


def stop(folder: str | Path = DEFAULT_DIR) -> list[str]:
    """Stop every process of ``folder``'s server: the MLflow server and its workers (orphaned ones too), and
    the PostgreSQL cluster (what a killed postmaster left included). Returns what was stopped."""
    lay = Layout(folder)
    stopped = []
    state = json.loads(lay.state.read_text()) if lay.state.exists() else None
    if state and _alive(state["pid"], lay):
        _end_group(state["pid"], lay)
        stopped.append(f"mlflow server (pid {state['pid']}, port {state['port']})")
    orphans = [p["pid"] for p in processes(lay.root) if p["role"].startswith("mlflow")]
    if orphans:  # workers whose server was killed: another process group, or reparented
        _end(orphans)
        stopped.append(f"{len(orphans)} orphaned mlflow worker(s) (pids {orphans})")
    if state:
        deadline = time.monotonic() + 10
        while not port_free(state["port"]) and time.monotonic() < deadline:  # killed workers close late
            time.sleep(0.1)
    lay.state.unlink(missing_ok=True)
    if lay.cluster.exists() and lay.pgdata.exists():
        cluster = json.loads(lay.cluster.read_text())
        bindir = Path(cluster["bindir"]) if (Path(cluster["bindir"]) / "pg_ctl").exists() else pg_bindir()
        if _pg_running(lay, cluster["os_user"], bindir):
            _pg_ctl(lay, cluster["os_user"], bindir, "stop")
            stopped.append(f"postgresql (port {cluster['pg_port']})")
    left = [p["pid"] for p in processes(lay.root)]
    if left:  # the children of a killed postmaster: they hold its shared memory, which blocks a restart
        _end(left)
        stopped.append(f"{len(left)} orphaned postgresql process(es) (pids {left})")
    return stopped
