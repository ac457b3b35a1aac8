"""Driver behaviour checks with psycopg 3, run by tests/proxy/drivers.rs.

Usage: psycopg_checks.py CHECK DSN ADMIN_DSN
Prints one JSON object: what the driver saw, and whether the statement still runs on the
server afterwards (read through ADMIN_DSN, a direct superuser connection).
"""

import json
import signal
import sys
import threading
import time

import psycopg

SLEEP = "SELECT pg_sleep(30) /* {tag} */"


def still_running(admin, tag):
    """Seconds until no server session runs the tagged statement (None: still after 5 s)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5:
        n = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s"
            " AND pid <> pg_backend_pid()",
            (f"%{tag}%",),
        ).fetchone()[0]
        if n == 0:
            return round(time.monotonic() - t0, 3)
        time.sleep(0.05)
    return None


def cancel(dsn, admin, tag):
    conn = psycopg.connect(dsn, autocommit=True)
    threading.Timer(0.5, conn.cancel).start()
    t0 = time.monotonic()
    try:
        conn.execute(SLEEP.format(tag=tag))
        outcome = "completed"
    except psycopg.errors.QueryCanceled:
        outcome = "QueryCanceled"
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        outcome = f"{type(e).__name__}: {e}"
    elapsed = time.monotonic() - t0
    usable = conn.execute("SELECT 1").fetchone()[0] == 1
    conn.close()
    return {"outcome": outcome, "seconds": elapsed, "usable_after": usable}


def ctrl_c(dsn, admin, tag):
    """psycopg's KeyboardInterrupt path: the interrupted execute sends a cancel request and
    raises; the application then closes the connection."""
    conn = psycopg.connect(dsn, autocommit=True)
    threading.Timer(0.5, lambda: signal.raise_signal(signal.SIGINT)).start()
    t0 = time.monotonic()
    try:
        conn.execute(SLEEP.format(tag=tag))
        outcome = "completed"
    except KeyboardInterrupt:
        outcome = "KeyboardInterrupt"
    except Exception as e:  # noqa: BLE001
        outcome = f"{type(e).__name__}: {e}"
    elapsed = time.monotonic() - t0
    t1 = time.monotonic()
    conn.close()
    return {
        "outcome": outcome,
        "seconds": elapsed,
        "close_seconds": time.monotonic() - t1,
        "server_done_after": still_running(admin, tag),
    }


def close_from_another_thread(dsn, admin, tag):
    conn = psycopg.connect(dsn, autocommit=True)
    seen = {}

    def run():
        t0 = time.monotonic()
        try:
            conn.execute(SLEEP.format(tag=tag))
            seen["outcome"] = "completed"
        except psycopg.OperationalError:
            seen["outcome"] = "OperationalError"
        except Exception as e:  # noqa: BLE001
            seen["outcome"] = f"{type(e).__name__}: {e}"
        seen["seconds"] = time.monotonic() - t0

    th = threading.Thread(target=run)
    th.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    conn.close()
    seen["close_seconds"] = time.monotonic() - t0
    th.join(10)
    seen["server_done_after"] = still_running(admin, tag)
    return seen


def listen(dsn, admin, tag):
    """psycopg sends every statement with the extended protocol, LISTEN included."""
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(f"LISTEN {tag}")
    sender = psycopg.connect(dsn, autocommit=True)
    sender.execute(f"NOTIFY {tag}, 'hello'")
    got = [n.payload for n in conn.notifies(timeout=5, stop_after=1)]
    conn.execute(f"UNLISTEN {tag}")
    usable = conn.execute("SELECT 1").fetchone()[0] == 1
    return {"payloads": got, "usable_after": usable}


CHECKS = {"listen": listen, "cancel": cancel, "ctrl_c": ctrl_c, "close_from_another_thread": close_from_another_thread}

if __name__ == "__main__":
    check, dsn, admin_dsn = sys.argv[1:4]
    admin = psycopg.connect(admin_dsn, autocommit=True)
    tag = f"{check}_{time.time_ns()}"
    print(json.dumps(CHECKS[check](dsn, admin, tag)))
