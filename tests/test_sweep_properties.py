"""Property: whatever a user gives `launch.sweep`'s flags (extreme, empty, wrong-type values),
the study command plans the study or says why in one line (exit status 2), never a traceback,
and writes nothing. In-process through the command's own flag parser and checks
(`--dry_run`, so nothing runs); a few examples run the real program."""

import os
import subprocess
import sys

import pytest
from absl import flags
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import REPO
from launch import sweep
from research.errors import UserError

SMOKE = "configs/default.py:smoke"
# ml_collections loads config files with the deprecated load_module, once per parse.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def _flag_names() -> list[str]:
  defined = flags.FlagValues()
  sweep._define_flags(defined)
  return sorted(name for name in defined if name not in ("help", "helpfull", "helpshort",
                                                         "helpxml", "dry_run"))


NAMES = _flag_names()
VALUES = st.one_of(
    st.sampled_from(["", "0", "-1", "1", "2", "-0.0", "nan", "inf", "-inf", "1e400", "1e-300",
                     str(2**63), str(-2**63), str(2**31), "true", "false", "None", "()", "[]",
                     "abc", "seed=0,1", "://", "mongodb://x/y", "sqlite://", "/", ".",
                     "train[:0]", "test", "grid", "tpe", "slurm", "'", "\"", "--x", "a b"]),
    st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=20),
)
OVERRIDES = st.lists(st.tuples(st.sampled_from(NAMES), VALUES), min_size=1, max_size=3)


def _plan_or_refuse(argv: list[str], monkeypatch, capsys) -> str:
  """'' when the command plans the study (dry run), else its one-line refusal. The flags
  are the test's own: the command's functions read no global ones."""
  defined = flags.FlagValues()
  sweep._define_flags(defined)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # run() sets it; restored after the test
  monkeypatch.setattr(sweep.logging, "set_verbosity", lambda level: None)  # the test's own
  try:
    extra = sweep.parse_command_line(["launch.sweep", *argv], defined)[1:]
    sweep.run(sweep.read_options(defined), extra, argv)
    capsys.readouterr()
    return ""
  except UserError as e:
    message = str(e)
    assert message and "\n" not in message, message
    return message


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(OVERRIDES)
@example([("trials", str(10**30))])
@example([("sampler_seed", "-1")])
@example([("heartbeat", "nan")])
@example([("timeout", "-inf")])
@example([("workers", "0")])
@example([("storage", "mongodb://x/y")])
@example([("workdir", "")])
@example([("config", "")])
@example([("sbatch_args", "'")])
@example([("launcher", "slurm"), ("array", "-5")])
def test_any_flag_value_plans_or_is_refused_in_one_line(tmp_path_factory, monkeypatch, capsys,
                                                         overrides):
  root = tmp_path_factory.mktemp("sweep")
  workdir = root / "study"
  argv = [f"--config={SMOKE}", f"--workdir={workdir}", "--sweep=seed=0,1",
          *(f"--{name}={value}" for name, value in overrides), "--dry_run"]
  before = sorted(os.listdir(root))
  _plan_or_refuse(argv, monkeypatch, capsys)  # any other exception fails the test
  assert sorted(os.listdir(root)) == before  # a dry run or a refusal writes nothing


@pytest.mark.parametrize("flag, message", [
    ("--trials=abc", "error: --trials=abc: invalid literal for int()"),
    ("--search=bayes", "error: --search=bayes: value should be one of"),
    ("--sampler_seed=99999999999", "error: --sampler_seed=99999999999 is not accepted"),
    ("--no_such_flag=1", "error: --no_such_flag is not a flag of launch.sweep. Flags: --config,"),
])
def test_the_command_refuses_bad_flags_in_one_line(tmp_path, flag, message):
  result = subprocess.run([sys.executable, "-m", "launch.sweep", f"--config={SMOKE}",
                           f"--workdir={tmp_path / 'study'}", "--sweep=seed=0", flag],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
  assert not (tmp_path / "study").exists()
