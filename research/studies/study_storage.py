"""A study's Optuna storage, opened from --storage: a database URL or a journal file.

Part of research/studies/study.py's set-up. A database URL is checked before anything is
written: its kind (scheme) must be one SQLAlchemy and Optuna serve, its driver
installed, its server reachable with the login given; each failure is one line
(UserError). A bare `postgresql://` uses psycopg2, the driver installed with the
project (SQLAlchemy 2 would otherwise pick psycopg 3).

A journal file survives damage: Optuna 4.9's JournalFileBackend stops at the first
line that is not a record (a crash or a full disk mid-write leaves one). Here such
a line is copied to a side file (FILE.damaged, never deleted), named in a warning
with its byte offset, and replayed as a record that changes nothing, so the log
numbers of the records after it stay right and the readable history is used. A
damaged tail is ended with a newline before the next record is appended, so new
records never run into it.
"""

import base64
import json
import os
import re
import warnings

from absl import logging
from optuna.storages import journal

from research.errors import UserError

# Schemes named in the refusal of an unknown one: SQLAlchemy dialects Optuna's RDBStorage
# supports, with the drivers installed here or named for installation.
ACCEPTED = ("postgresql://USER@HOST[:PORT]/DB (psycopg2)", "mysql+pymysql://USER@HOST/DB",
            "sqlite:///PATH", "or a journal file path (no scheme)")
# Python module SQLAlchemy imports -> the package that provides it.
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]",
                   "pymysql": "PyMySQL", "MySQLdb": "mysqlclient", "asyncpg": "asyncpg",
                   "pg8000": "pg8000", "mysql": "mysql-connector-python",
                   "cx_Oracle": "cx_Oracle", "oracledb": "oracledb", "pyodbc": "pyodbc"}
DAMAGED_SUFFIX = ".damaged"


def is_url(storage: str) -> bool:
  return "://" in storage


def database_url(storage: str):
  """The SQLAlchemy URL of --storage, its dialect and driver checked (nothing connects)."""
  from sqlalchemy import exc
  from sqlalchemy.engine import make_url

  try:
    url = make_url(storage)
  except exc.ArgumentError as e:
    raise UserError(f"--storage={storage!r} is not a database URL ({e}). Accepted: "
                    f"{', '.join(ACCEPTED)}.") from None
  if url.drivername == "postgresql":  # SQLAlchemy 2's default is psycopg 3: not installed
    url = url.set(drivername="postgresql+psycopg2")
  shown = url.render_as_string(hide_password=True)
  try:
    dialect = url.get_dialect()
  except exc.NoSuchModuleError:
    raise UserError(f"--storage={shown}: {url.drivername!r} is not a kind of database storage "
                    f"known here. Accepted: {', '.join(ACCEPTED)}.") from None
  try:
    dialect.import_dbapi()
  except ImportError as e:
    module = (e.name or "").split(".")[0]
    package = DRIVER_PACKAGES.get(module, module or "its driver")
    raise UserError(f"--storage={shown}: the {url.get_backend_name()} driver {module!r} is not "
                    f"installed: `pip install {package}`, or use postgresql:// (psycopg2 is "
                    "installed).") from None
  return url


def open_database(storage: str, heartbeat_seconds: float):
  """Optuna's RDBStorage on --storage, or a UserError naming host, port and the server's
  own reason (unreachable, login refused, no such database)."""
  import optuna
  from sqlalchemy import exc
  from sqlalchemy.engine import make_url

  url = database_url(storage)
  shown = make_url(storage).render_as_string(hide_password=True)  # as typed, password hidden
  # "Experimental" notices (the heartbeat, the retry callback): the versions are pinned.
  warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
  try:
    return optuna.storages.RDBStorage(
        url.render_as_string(hide_password=False),
        heartbeat_interval=max(1, int(heartbeat_seconds)),
        grace_period=max(2, int(3 * heartbeat_seconds)),
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=3))
  except exc.SQLAlchemyError as e:
    reason = " ".join(str(getattr(e, "orig", None) or e).split()).rstrip(".?") or type(e).__name__
    where = (f"{url.host}:{url.port or _default_port(url)}" if url.host
             else url.database or "(no host)")
    raise UserError(f"--storage={shown}: cannot open the "
                    f"study database at {where}: {reason[:400]}. Check that the server runs "
                    "and that the user may log in to that database.") from None


def _default_port(url) -> int | str:
  return {"postgresql": 5432, "mysql": 3306}.get(url.get_backend_name(), "default port")


def check_journal_folder(path: str) -> None:
  if os.path.isdir(path):
    raise UserError(f"--storage={path} is a folder: give a journal file's path (e.g. "
                    f"{os.path.join(path, 'study.journal')}) or a database URL.")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise UserError(f"--storage={path}: the folder {folder} does not exist. Create it (on "
                    "storage every worker sees), or leave --storage out for the study folder.")


def open_journal(path: str):
  """Optuna's JournalStorage on the file `path` (created when missing)."""
  check_journal_folder(path)
  return journal.JournalStorage(TolerantJournalFile(path))


class TolerantJournalFile(journal.JournalFileBackend):
  """Optuna's journal file backend, reading past records that are damaged."""

  def __init__(self, file_path: str, lock_obj=None):
    super().__init__(file_path, lock_obj)
    self._side_path = file_path + DAMAGED_SUFFIX
    self._warned = set()

  def read_logs(self, log_number_from: int):
    """Optuna 4.9's read_logs, with a damaged line yielded as a record that changes nothing."""
    with open(self._file_path, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      number = log_number_from if log_number_from in self._log_number_offset else 0
      offset = self._log_number_offset[number]
      f.seek(offset)
      for line in f:
        if offset + len(line) > size or not line.endswith(b"\n"):
          break  # being written (or a damaged tail: append_logs ends it with a newline)
        self._log_number_offset.setdefault(number + 1, offset + len(line))
        if number >= log_number_from:
          yield self._record(line, offset)
        number, offset = number + 1, offset + len(line)

  def append_logs(self, logs) -> None:
    from optuna.storages.journal._file import get_lock_file

    text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
    with get_lock_file(self._lock), open(self._file_path, "ab+") as f:
      # Under the lock no one is writing: a tail without a newline is damage, ended here.
      if f.tell() > 0:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
          text = "\n" + text
      f.write(text.encode("utf-8"))
      f.flush()
      os.fsync(f.fileno())

  def _record(self, line: bytes, offset: int) -> dict:
    try:
      record = json.loads(line)
      if isinstance(record, dict) and isinstance(record.get("op_code"), int):
        return record
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
      pass
    self._set_aside(line, offset)
    return _stand_in(line)

  def _set_aside(self, line: bytes, offset: int) -> None:
    if offset in self._warned:
      return
    self._warned.add(offset)
    kept = set()
    try:
      with open(self._side_path) as f:
        kept = {json.loads(entry)["offset"] for entry in f if entry.strip()}
    except (OSError, ValueError, KeyError, TypeError):
      pass
    if offset not in kept:
      with open(self._side_path, "a") as f:
        f.write(json.dumps({"file": self._file_path, "offset": offset, "length": len(line),
                            "bytes_base64": base64.b64encode(line).decode()}) + "\n")
    logging.warning("%s: the record at byte %d (%d bytes) cannot be read; it is set aside in %s "
                    "and the study goes on with the rest of its history.", self._file_path,
                    offset, len(line), self._side_path)


_CREATES_TRIAL = re.compile(rb'^\{"op_code":4,.*?"study_id":(\d+)')


def _stand_in(line: bytes) -> dict:
  """A record that keeps the log's numbering and changes nothing; for a damaged trial
  creation (still recognisable), a failed trial, so that later records name the right
  trials (Optuna numbers trials by their creation records)."""
  from optuna.storages.journal._storage import JournalOperation
  from optuna.trial import TrialState

  created = _CREATES_TRIAL.match(line)
  if created:
    return {"op_code": JournalOperation.CREATE_TRIAL, "worker_id": "damaged-record",
            "study_id": int(created.group(1)), "datetime_start": None,
            "state": TrialState.FAIL.value,
            "user_attrs": {"failure": "its record in the study journal was damaged"}}
  return {"op_code": JournalOperation.SET_STUDY_USER_ATTR, "worker_id": "damaged-record",
          "study_id": -1, "user_attr": {}}
