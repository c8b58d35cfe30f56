"""The ``prunehub`` command line.

Service roles: ``serve`` (the API; ``--with-worker`` also starts a worker process), ``worker``, ``db upgrade``.
Client commands (``submit``, ``bundles list``, ``watch``, ``status``, ``best``, ``trials``, ``list``, ``cancel``,
``download``; ``submit --code DIR`` uploads your code as a bundle first) talk HTTP to the API at
``PRUNEHUB_API_URL``, never to the database. ``demo`` runs the whole path on the embedded defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["main", "terminal_safe"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# `demo` runs the baseline and one search at the same FLOPs budget, and prints them side by side.
DEMO_SPECS = (EXAMPLES / "digits_budget_uniform.json", EXAMPLES / "digits_budget_annealing.json")


# C0 controls (ESC starts every terminal escape sequence), DEL and the C1 controls (CSI, OSC as single bytes).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def terminal_safe(value: Any) -> Any:
    """``value`` (a string, or JSON of them) with every control character shown as an escape (``\\x1b``).

    Names, errors, phases and layer names are other people's text (an experiment's owner, the user's model and
    code): printed raw, an ESC in them would drive the terminal (retitle it, clear it, fake output, or worse).
    Every CLI command prints what the API returns through this.
    """
    if isinstance(value, str):
        return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", value)
    if isinstance(value, list):
        return [terminal_safe(item) for item in value]
    if isinstance(value, dict):
        return {terminal_safe(key): terminal_safe(item) for key, item in value.items()}
    return value


class _TerminalSafeClient:
    """The API client as the CLI uses it: what each call returns goes through :func:`terminal_safe` (an event
    stream item by item; a downloaded file as it is)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __enter__(self) -> _TerminalSafeClient:
        self._client.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attribute(*args, **kwargs)
            if isinstance(result, bytes | bytearray):
                return result
            if isinstance(result, Iterator):
                return (terminal_safe(item) for item in result)
            return terminal_safe(result)

        return call


def _safe_client(base_url: str, api_key: str | None = None) -> Any:
    from server.client import PrunehubClient

    return _TerminalSafeClient(PrunehubClient(base_url, api_key=api_key))


def _client(args: argparse.Namespace) -> Any:
    from server.settings import get_settings

    settings = get_settings()
    return _safe_client(args.api_url or settings.api_url, api_key=settings.client_api_key())


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _progress_line(experiment: dict[str, Any]) -> str:
    progress = experiment["progress"]
    total = progress.get("total")
    amount = f"{progress['done']:g}/{total:g}" if total else f"{progress['done']:g}"
    best = experiment.get("best_score")
    best_text = f"  best={best:.4f}" if best is not None else ""
    return f"[{experiment['status']:>10}] {amount:>8}  {progress.get('phase') or ''}{best_text}"


def _num(value: float | None, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if value is not None else "-"


def _print_best(best: dict[str, Any]) -> None:
    """The best distribution as a table (rich): per layer, requested vs achieved sparsity."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, markup=False)  # user strings print as text
    console.print(
        f"best trial {best['trial_id']}: score={_num(best.get('score'))}  "
        f"overall sparsity={_num(best.get('overall_sparsity'))}"
    )
    sizes = [
        f"{name} {best[f'{key}_before']:,} -> {best[f'{key}_after']:,}"
        for key, name in (("params", "params"), ("flops", "FLOPs"))
        if best.get(f"{key}_before") and best.get(f"{key}_after") is not None
    ]
    if sizes:
        console.print("   ".join(sizes))
    requested = best.get("requested") or best.get("distribution") or {}
    achieved = best.get("achieved") or {}
    table = Table(title=f"best distribution (trial {best['trial_id']})", title_justify="left")
    table.add_column("layer")
    table.add_column("requested", justify="right")
    table.add_column("achieved", justify="right")
    for layer in requested or achieved:
        table.add_row(layer, _num(requested.get(layer)), _num(achieved.get(layer)))
    console.print(table)


def _watch(client: Any, experiment_id: int) -> dict[str, Any]:
    """Follow an experiment's event stream with a live progress bar (status, done/total, best score, phase) until
    it is terminal; prints each finished trial above the bar. Returns the final experiment."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    experiment = client.get(experiment_id)
    console = Console(highlight=False, markup=False)  # user strings print as text
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[status]:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("best [bold]{task.fields[best]}"),
        TextColumn("[dim]{task.fields[phase]}"),
        TimeElapsedColumn(),
    )

    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(
            f"experiment {experiment_id}",
            total=experiment["progress"].get("total"),
            completed=experiment["progress"]["done"],
            status=experiment["status"],
            best=_num(experiment.get("best_score")),
            phase=experiment["progress"].get("phase") or "",
        )
        for event in client.events(experiment_id):
            kind = event["kind"]
            if kind == "status":
                progress.update(bar, status=event["status"])
                if event.get("error"):
                    progress.console.print(f"error: {event['error']}", style="red")
            elif kind == "progress":
                progress.update(bar, completed=event["done"], total=event.get("total"), phase=event.get("phase") or "")
            elif kind == "best":
                progress.update(bar, best=_num(event.get("score")))
            elif kind == "trial":
                progress.console.print(
                    f"trial {event['seq']:>4} {event['status']:>9}  score={_num(event.get('score'))}  "
                    f"sparsity={_num(event.get('overall_sparsity'), 3)}"
                    + (f"  error={event['error']}" if event.get("error") else "")
                )
        final: dict[str, Any] = client.get(experiment_id)
        progress.update(bar, status=final["status"], best=_num(final.get("best_score")))
        if final["status"] == "succeeded":
            total = final["progress"].get("total") or final["progress"]["done"]
            progress.update(bar, total=total, completed=total)
    return final


def _finish_watch(client: Any, experiment_id: int) -> int:
    final = _watch(client, experiment_id)
    if final["status"] == "succeeded":
        _print_best(client.best(experiment_id))
    elif final.get("error"):
        print(f"experiment {experiment_id} {final['status']}: {final['error']}")
    else:
        print(f"experiment {experiment_id} {final['status']}")
    return 0 if final["status"] == "succeeded" else 1


# --- service roles -------------------------------------------------------------------------------------------


def cmd_db(args: argparse.Namespace) -> int:
    from server.db.migrate import downgrade, upgrade
    from server.settings import get_settings

    url = get_settings().database_url
    if args.action == "upgrade":
        upgrade(url, args.revision or "head")
    else:
        downgrade(url, args.revision or "base")
    print(f"database {args.action}d: {url}")
    return 0


def _die_with_parent(args: argparse.Namespace) -> None:
    """A process started by another prunehub process (``--parent-pid``) ends when that one dies, even by SIGKILL,
    instead of running on under PID 1 (a restart would then find two workers)."""
    if args.parent_pid is not None:
        from worker.child import die_with_parent

        die_with_parent(args.parent_pid)


def cmd_worker(args: argparse.Namespace) -> int:
    _die_with_parent(args)
    if args.gpu is not None:
        # Before anything imports torch: this process only ever sees its own GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
        os.environ.setdefault("PRUNEHUB_DEVICE", "cuda")
    from server.files import secure_home
    from server.settings import get_settings
    from worker.celery_app import make_celery
    from worker.signals import connect_signals
    from worker.tasks import register_tasks

    settings = get_settings()
    secure_home(settings.home)
    Path(settings.artifacts_dir).mkdir(parents=True, exist_ok=True)
    app = make_celery(settings)
    register_tasks(app)
    connect_signals()
    if "experiments" in args.queues.split(","):
        from celery.signals import worker_ready

        from worker.reaper import start_reaper

        @worker_ready.connect(weak=False)
        def _reap(**_kwargs: object) -> None:
            start_reaper(app, settings.reaper_interval_s)

    argv = [
        "worker",
        "--queues",
        args.queues,
        "--concurrency",
        str(args.concurrency),
        "--pool",
        "prefork",
        "--loglevel",
        args.loglevel,
        "--hostname",
        f"prunehub-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    if settings.broker_url.startswith("filesystem://"):
        argv.append("--without-heartbeat")
    app.worker_main(argv)
    return 0


def _spawn_worker(loglevel: str) -> subprocess.Popen[bytes]:
    command = ["worker", "--loglevel", loglevel, "--parent-pid", str(os.getpid())]
    return subprocess.Popen([sys.executable, "-m", "server.cli", *command])


# Every stop path ends every process within 10 s: the API drains for at most API_DRAIN_S, the worker gets
# WORKER_STOP_S to finish its warm shutdown, then SIGKILL, which takes its pool and task processes with it (each
# dies with its parent). A running experiment's lease then goes stale and the next worker resumes it.
API_DRAIN_S = 2
WORKER_STOP_S = 5.0
SERVE_STOP_S = 8.0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api.main import create_app
    from server.db.migrate import upgrade
    from server.files import secure_home
    from server.settings import get_settings

    _die_with_parent(args)
    settings = get_settings()
    secure_home(settings.home)
    upgrade(settings.database_url)  # before a worker starts: one migrator at a time
    worker = _spawn_worker(args.worker_loglevel) if args.with_worker else None
    try:
        # A process that only serves: its start-up heap is frozen (see create_app). The graceful-shutdown timeout:
        # an open event stream would otherwise hold it forever.
        app = create_app(settings, migrate=False, freeze_heap=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=API_DRAIN_S)
    finally:
        if worker is not None:
            _stop(worker, timeout=WORKER_STOP_S)
    return 0


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def demo_rows(runs: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]]) -> list[list[str]]:
    """The demo's side-by-side comparison: one column per (spec, final experiment, best result or ``None``).

    Rows: the score after the spec's fine-tuning, the measured FLOPs ratio of the shrunk best model (against the
    budget), its params, the trials spent and the per-unit sparsity the search chose.
    """
    header = ["", *[f"{spec['algorithm']} (experiment {experiment['id']})" for spec, experiment, _ in runs]]
    epochs = {spec.get("finetune_epochs", 0) for spec, _, _ in runs}
    score_label = "score" + (f" after {epochs.pop()} fine-tuning epochs" if len(epochs) == 1 else "")
    rows = [header]

    def row(label: str, cell: Any) -> None:
        rows.append([label, *[cell(spec, experiment, best) for spec, experiment, best in runs]])

    def need(best: dict[str, Any] | None, experiment: dict[str, Any], text: str) -> str:
        return text if best is not None else experiment["status"]

    row("status", lambda s, e, b: e["status"])
    row(score_label, lambda s, e, b: need(b, e, _num(b and b.get("score"))))
    row(
        "FLOPs / dense (shrunk)",
        lambda s, e, b: need(
            b,
            e,
            f"{_num(b and b.get('flops_ratio'), 3)}"
            + (f" (budget {b['budget']['flops']:g})" if b and (b.get("budget") or {}).get("flops") else ""),
        ),
    )
    row(
        "params",
        lambda s, e, b: need(
            b,
            e,
            f"{b['params_after']:,} of {b['params_before']:,} ({_num(b.get('params_ratio'), 3)})"
            if b and b.get("params_after") is not None and b.get("params_before")
            else "-",
        ),
    )
    row("trials", lambda s, e, b: str(e.get("trials_count", "-")))
    units = list(dict.fromkeys(unit for _, _, best in runs if best for unit in best.get("distribution") or {}))
    for unit in units:
        row(f"sparsity {unit}", lambda s, e, b, u=unit: need(b, e, _num((b or {}).get("distribution", {}).get(u), 3)))
    return rows


def _print_side_by_side(runs: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]]) -> None:
    from rich.console import Console
    from rich.table import Table

    header, *rows = demo_rows(runs)
    table = Table(title="same FLOPs budget, side by side", title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for cells in rows:
        table.add_row(*cells)
    Console(highlight=False, markup=False).print(table)


def cmd_demo(args: argparse.Namespace) -> int:
    """Start API + worker quietly (their output goes to ``$PRUNEHUB_HOME/demo.log``), submit the shipped examples
    (uniform and annealing at the same FLOPs budget on the digits CNN), follow them, print their results side by
    side, keep serving the dashboard."""
    from server.files import secure_home
    from server.settings import get_settings

    url = f"http://{args.host}:{args.port}"
    env = {**os.environ, "PRUNEHUB_API_URL": url}
    home = get_settings().home
    secure_home(home)
    log_path = home / "demo.log"
    print(f"starting the API and a worker at {url} (their logs: {log_path}) ...", flush=True)
    serve = ["serve", "--with-worker", "--host", args.host, "--port", str(args.port), "--parent-pid",
             str(os.getpid())]
    with open(log_path, "ab") as log:  # the child processes keep their own descriptors
        server = subprocess.Popen(
            [sys.executable, "-m", "server.cli", *serve], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        with _safe_client(url) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    client.health()
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    if server.poll() is not None or time.monotonic() > deadline:
                        tail = log_path.read_text(errors="replace")[-3000:]
                        print(f"the API did not start; the end of {log_path}:\n{tail}", file=sys.stderr)
                        return 1
                    time.sleep(0.5)
        # The API created the local key on its first start; the embedded demo needs no setup.
        with _safe_client(url, api_key=get_settings().client_api_key()) as client:
            specs = [json.loads(Path(path).read_text()) for path in args.spec]
            submitted = []
            for spec in specs:
                experiment = client.submit(spec)
                budget = ", ".join(f"{k} {v:g}" for k, v in (spec.get("budget") or {}).items())
                print(
                    f"submitted experiment {experiment['id']}: {spec['algorithm']} on {spec['entrypoint']}"
                    + (f" (budget: {budget} of the dense model)" if budget else "")
                )
                submitted.append((spec, experiment))
            runs: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]] = []
            for spec, experiment in submitted:
                final = _watch(client, experiment["id"])
                if final.get("error"):
                    print(f"experiment {experiment['id']} {final['status']}: {final['error']}")
                best = client.best(experiment["id"]) if final["status"] == "succeeded" else None
                runs.append((spec, final, best))
            print()
            _print_side_by_side(runs)
        print(f"\nprunehub is running at {url}  (dashboard: {url}/, API docs: {url}/docs). Press Ctrl-C to stop.")
        server.wait()
    except KeyboardInterrupt:
        print("\nstopping API and worker ...")
    finally:
        _stop(server, timeout=SERVE_STOP_S)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Manage API keys (needs the database, like ``db upgrade``)."""
    from server.db.session import make_engine, make_session_factory
    from server.services import auth
    from server.settings import get_settings

    engine = make_engine(get_settings().database_url)
    try:
        with make_session_factory(engine)() as session:
            if args.action == "create":
                token = auth.create_key(session, args.owner, "admin" if args.admin else "user")
                session.commit()
                print(token)
                print(f"# key for owner {args.owner!r}; it is shown only now (stored hashed)", file=sys.stderr)
            elif args.action == "list":
                for key in auth.list_keys(session):
                    state = "revoked" if key.revoked_at else "live"
                    owner = terminal_safe(key.owner)
                    print(f"{key.prefix}...  {owner:<20} {key.role:<6} {state:<8} {key.created_at:%Y-%m-%d}")
            else:
                count = auth.revoke_key(session, args.prefix)
                session.commit()
                print(f"revoked {count} key(s)")
    finally:
        engine.dispose()
    return 0


# --- client commands -----------------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    spec = json.loads(Path(args.file).read_text())
    with _client(args) as client:
        if args.code:
            bundle = client.upload_bundle(args.code)
            print(f"bundle {bundle['id']} ({bundle['size']:,} bytes, {len(bundle['modules'])} modules)")
            spec["bundle"] = bundle["id"]
        experiment = client.submit(spec)
        print(f"experiment {experiment['id']} {experiment['status']}")
        if args.wait:
            return _finish_watch(client, experiment["id"])
    return 0


def cmd_bundles(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.bundles(limit=args.limit)
    if args.json:
        _print_json(page)
        return 0
    for b in page["items"]:
        modules = ", ".join(b["modules"][:4]) + (", ..." if len(b["modules"]) > 4 else "")
        print(f"{b['id']}  {b['size']:>10,} B  {b['created_at'][:19]}  {modules}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _finish_watch(client, args.id)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        experiment = client.get(args.id)
        print(_progress_line(experiment))
        if experiment.get("error"):
            print(f"error: {experiment['error']}")
        if args.json:
            _print_json(experiment)
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    with _client(args) as client:
        best = client.best(args.id)
        _print_json(best) if args.json else _print_best(best)
    return 0


def cmd_trials(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.trials(args.id, order_by=args.order_by, limit=args.limit)
        print(f"{'seq':>4} {'status':>10} {'score':>10} {'sparsity':>9} {'flops':>7}  context")
        for t in page["items"]:
            score, sparsity, flops = _num(t["score"]), _num(t["overall_sparsity"], 3), _num(t["flops_ratio"], 3)
            print(f"{t['seq']:>4} {t['status']:>10} {score:>10} {sparsity:>9} {flops:>7}  {json.dumps(t['context'])}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list(status=args.status, entrypoint=args.entrypoint)
        for e in page["items"]:
            print(f"{e['id']:>5} {e['status']:>10} {e['algorithm']:>12} {_num(e['best_score']):>8}  {e['name']}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(_progress_line(client.cancel(args.id)))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    import io
    import zipfile

    with _client(args) as client:
        data = client.download_model(args.id)
    target = Path(args.dir)
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        archive.extractall(target)
    print(f"wrote {target / 'model.safetensors'} and {target / 'recipe.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunehub", description=__doc__.splitlines()[0])
    parser.add_argument("--api-url", default=None, help="API base URL (default: PRUNEHUB_API_URL)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the API (applies migrations first)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--with-worker", action="store_true", help="also run one worker process")
    p.add_argument("--worker-loglevel", default="WARNING")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)  # die with it (the demo)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a Celery worker")
    p.add_argument("--queues", default="experiments,evaluations")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--gpu", type=int, default=None, help="serve this GPU only (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)  # die with it (serve)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("db", help="database migrations")
    p.add_argument("action", choices=["upgrade", "downgrade"])
    p.add_argument("revision", nargs="?")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("keys", help="API keys: create, list, revoke")
    keys = p.add_subparsers(dest="action", required=True)
    k = keys.add_parser("create", help="create a key for an owner (printed once)")
    k.add_argument("--owner", required=True)
    k.add_argument("--admin", action="store_true", help="the key sees every owner's experiments")
    keys.add_parser("list", help="list keys (prefixes only)")
    k = keys.add_parser("revoke", help="revoke the keys with this prefix")
    k.add_argument("prefix")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser(
        "demo", help="start API + worker, run uniform and annealing at one FLOPs budget on digits, keep serving"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--spec", nargs="+", default=[str(path) for path in DEMO_SPECS], help="experiment files, shown side by side"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("submit", help="submit an experiment from a JSON file")
    p.add_argument("file")
    p.add_argument("--wait", action="store_true", help="follow its progress and print the best result")
    p.add_argument(
        "--code",
        metavar="DIR",
        help="upload DIR (the folder holding your task package, or the package itself) as a bundle and run the "
        "spec's entrypoint from it",
    )
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("bundles", help="your uploaded task bundles")
    bundles = p.add_subparsers(dest="action", required=True)
    b = bundles.add_parser("list", help="your bundles, newest first")
    b.add_argument("--limit", type=int, default=100)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bundles)

    for name, func, help_text in (
        ("status", cmd_status, "an experiment's status and progress"),
        ("best", cmd_best, "the best distribution of an experiment"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("id", type=int)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("watch", help="follow an experiment live (progress, best score, phase), then its best")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("trials", help="an experiment's trials")
    p.add_argument("id", type=int)
    p.add_argument("--order-by", choices=["seq", "score"], default="seq")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_trials)

    p = sub.add_parser("list", help="experiments, newest first")
    p.add_argument("--status")
    p.add_argument("--entrypoint")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("cancel", help="cancel an experiment")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("download", help="download the best pruned model into DIR")
    p.add_argument("id", type=int)
    p.add_argument("dir")
    p.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from server.client import ApiError

        if isinstance(exc, ApiError):
            print(f"error: {terminal_safe(str(exc))}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
