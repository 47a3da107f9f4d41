"""Property: whatever a user types or feeds in, the program runs or says clearly why not.

Random config overrides (real keys with random values of random types, and
unknown keys), random bytes as images, as source files and as prepared dataset
files: the outcome is a result or a UserError (`error: ...`, exit status 2 from
the command line), never a traceback, and never a changed good checkpoint.
Configs are checked in-process through the parser and checks `research.main`
uses; a few examples run the real program.
"""

import dataclasses
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import REPO, run_here, run_main, tree_digest
from research.config import command_line, config_schema, config_validation
from research.data import datasets, prepare_data
from research.errors import UserError
from research.tools import predict

SMOKE = "--config=configs/default.py:smoke"
FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
# ml_collections loads config files with the deprecated load_module, once per parse.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def _flat_keys(config, prefix=""):
  keys = []
  for key, value in config.items():
    if hasattr(value, "items"):
      keys += _flat_keys(value, f"{prefix}{key}.")
    else:
      keys.append(f"{prefix}{key}")
  return keys


REAL_KEYS = _flat_keys(command_line.parse_config([]))
GROUPS = sorted({key.split(".")[0] for key in REAL_KEYS if "." in key})
NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
KEYS = st.one_of(
    st.sampled_from(REAL_KEYS),
    st.sampled_from(REAL_KEYS),  # twice: real keys with random values matter most
    NAME,  # unknown top-level key
    st.builds(lambda group, leaf: f"{group}.{leaf}", st.sampled_from(GROUPS), NAME),
    st.builds(lambda key, leaf: f"{key}.{leaf}", st.sampled_from(REAL_KEYS), NAME),
)
VALUES = st.one_of(
    st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "True", "0", "-1", "1e400", "-0.0", "nan", "()", "(1, 2)",
                     "[1]", "{}", "None", "", "train[:0]", "latest", "best", "sgd", "cnn",
                     "loss", "5,3", "-5,3"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=20),
)
OVERRIDES = st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=3)


def _flags(overrides):
  return [f"--config.{key}={value}" for key, value in overrides]


def _clear(message: str, overrides) -> bool:
  """A message that names what was given (one of the overridden keys)."""
  return bool(message) and "Traceback" not in message and any(
      key.split(".")[-1] in message or key.split(".")[0] in message for key, _ in overrides)


@settings(max_examples=250, deadline=None)
@given(OVERRIDES)
@pytest.mark.slow
def test_random_overrides_parse_and_validate_or_say_why(overrides):
  try:
    config = command_line.parse_config(_flags(overrides))
    config_validation.validate(config)
  except UserError as e:
    assert _clear(str(e), overrides), (overrides, str(e))


# ---- Every field of every config, from the one table (research/config/config_schema.py) -----------

def _arguments(config_file: str) -> list[str]:
  """The arguments a config file accepts, read from its own refusal of an unknown one
  ("accepted: 'smoke', 'model=NAME'"), so a new argument is covered without editing this."""
  from research import models
  from research.run import optim

  found, problem = command_line._load_config(f"{config_file}:no-such-argument")
  assert found is None and "accepted" in problem, problem
  arguments = re.findall(r"'([^']+)'", problem.split("accepted", 1)[1])
  expanded = []
  for argument in arguments:
    if argument == "model=NAME":
      expanded += [f"model={name}" for name in models.MODELS]
    elif argument == "optimizer=NAME":
      expanded += [f"optimizer={name}" for name in optim.OPTIMIZERS]
    else:
      expanded.append(argument)
  return expanded


CONFIG_FILES = sorted(f"configs/{name}" for name in os.listdir(os.path.join(REPO, "configs"))
                      if name.endswith(".py") and not name.startswith("_"))
CONFIG_SPECS = [spec for config_file in CONFIG_FILES
                for spec in [config_file, *(f"{config_file}:{a}" for a in _arguments(config_file))]]
FIELDS_OF = {spec: sorted(config_schema.flatten(command_line.parse_config([], spec)))
             for spec in CONFIG_SPECS}


def test_every_config_and_argument_has_table_entries_and_validates():
  assert len(CONFIG_SPECS) > len(CONFIG_FILES) + 20  # the arguments were found
  for spec, fields in FIELDS_OF.items():
    config = command_line.parse_config([], spec)
    missing = [field for field in fields if field not in config_schema.fields_for(config)]
    assert not missing, (spec, missing)
    config_validation.validate(config)


def test_table_defaults_are_the_defaults_and_every_registry_knob_has_an_entry():
  from research import models
  from research.run import optim

  defaults = command_line.parse_config([], "configs/default.py")
  declared = config_schema.fields_for(defaults)
  for field, value in config_schema.flatten(defaults).items():
    assert declared[field].default == value or (value, declared[field].default) == ([], ()), field
  # Each entry's knobs: declared next to its code, their defaults the code's own and accepted.
  for name, entry in models.MODELS.items():
    for knob, field in models.fields(name).items():
      assert field.default == models.defaults(name)[knob] and not field.problem(field.default)
      assert field.meaning and entry.knobs[knob].kind == field.kind, (name, knob)
  for name in optim.OPTIMIZERS:
    for knob, field in optim.fields(name).items():
      assert field.default == optim.defaults(name)[knob] and not field.problem(field.default)
  for knob, field in optim.schedule_fields().items():
    assert not field.problem(field.default), knob


def test_a_field_without_a_table_entry_is_refused():
  import ml_collections

  config = command_line.parse_config([]).to_dict()
  config["augment"]["mixup"] = 0.2  # a config file that grew a field the table lacks
  with pytest.raises(UserError, match="augment.mixup .* has no entry in research/config/config_schema.py"):
    config_validation.validate(ml_collections.ConfigDict(config))


# Values a user can type, and values a config file can hold.
EXTREME_TYPED = ["nan", "inf", "-inf", "1e400", str(2**70), str(-2**70), "-1", "0", "-0.0", "1.5",
                 "abc", "", "true", "false", "None", "()", "(1, -2)", "(nan,)", "(1e400, 2)",
                 "[1]", "latest", "7", "2147483648"]
EXTREME_HELD = [float("nan"), float("inf"), -float("inf"), 2**70, -2**70, -1, 0, 1.5, -0.0,
                "abc", "", True, False, None, (), (1, -2), (float("nan"),), [3], {"a": 1}, 1e308,
                2**31]


def _set(tree: dict, dotted: str, value) -> None:
  *groups, leaf = dotted.split(".")
  for group in groups:
    tree = tree[group]
  tree[leaf] = value


@settings(max_examples=400, deadline=None)
@given(st.data())
@pytest.mark.slow
def test_every_field_of_every_config_with_extreme_values_is_accepted_or_named(data):
  import ml_collections

  spec = data.draw(st.sampled_from(CONFIG_SPECS))
  field = data.draw(st.sampled_from(FIELDS_OF[spec]))
  typed = data.draw(st.sampled_from(EXTREME_TYPED))
  try:  # as typed on the command line
    config_validation.validate(command_line.parse_config([f"--config.{field}={typed}"], spec))
  except UserError as e:
    assert _clear(str(e), [(field, typed)]), (spec, field, typed, str(e))
  held = data.draw(st.sampled_from(EXTREME_HELD))
  config = command_line.parse_config([], spec).to_dict()
  _set(config, field, held)
  try:  # as a config file may hold it, past the parser's type checks
    config_validation.validate(ml_collections.ConfigDict(config))
  except UserError as e:
    assert _clear(str(e), [(field, held)]), (spec, field, held, str(e))


@pytest.mark.parametrize("override, accepted", [
    ("--config.dataset.image_size=-5", "an integer from 0 to 8192"),
    ("--config.optimizer.b2=nan", "a finite number in [0, 1)"),
])
@pytest.mark.slow
def test_out_of_range_values_end_the_program_with_one_line(tmp_path, override, accepted):
  spec = "--config=configs/default.py:smoke,optimizer=adam"
  workdir = str(tmp_path / "run")
  result = run_main(workdir, spec, override, timeout=120)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  message = result.stderr[result.stderr.index("error: "):].strip()
  assert "\n" not in message and override[2:] in message and accepted in message, message
  assert not os.path.exists(workdir)


# ---- What the program runs once its flags are parsed, on a good, finished workdir -------------

@pytest.fixture(scope="module")
def good_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("good") / "run")
  result = run_here(workdir, SMOKE, "--config.num_train_steps=50")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@settings(max_examples=6, deadline=None, suppress_health_check=FIXTURES)
@given(st.one_of(OVERRIDES, st.lists(st.tuples(st.sampled_from(REAL_KEYS), VALUES), min_size=1,
                                     max_size=2)))
@example([("num_train_steps", "50")])  # the stored value: "already finished", exit 0
@example([("optimizer.learning_rate", "0.5")])  # valid but different: refused, fields listed
@pytest.mark.slow
def test_random_overrides_on_a_good_workdir_never_change_its_checkpoint(good_workdir, overrides):
  before = tree_digest(os.path.join(good_workdir, "checkpoints"))
  # Any exception but a UserError (main's traceback) fails the test from run_here.
  with mock.patch.dict(os.environ, {prepare_data.OFFLINE_ENV: "1"}):
    result = run_here(good_workdir, SMOKE, "--config.num_train_steps=50", *_flags(overrides))
  if result.returncode != 0:
    assert result.returncode == 2, (overrides, result.stderr[-3000:])
    assert "error: " in result.stderr
  assert tree_digest(os.path.join(good_workdir, "checkpoints")) == before


# ---- Random bytes as images -----------------------------------------------------------------

def _png(height, width, mode="L"):
  from PIL import Image

  buffer = io.BytesIO()
  Image.new(mode, (width, height), 128).save(buffer, format="PNG")
  return buffer.getvalue()


def _claimed_size(width: int, height: int) -> bytes:
  """GOOD_PNG whose header claims width x height pixels (a decompression-bomb shape)."""
  import struct
  import zlib

  header = b"IHDR" + struct.pack(">II", width, height) + GOOD_PNG[24:29]
  return GOOD_PNG[:12] + header + struct.pack(">I", zlib.crc32(header)) + GOOD_PNG[33:]


GOOD_PNG = _png(28, 28)
IMAGE_BYTES = st.one_of(
    st.builds(_claimed_size, st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)),
    st.binary(max_size=2000),
    st.binary(max_size=500).map(lambda tail: b"\x89PNG\r\n\x1a\n" + tail),
    st.binary(max_size=500).map(lambda tail: b"\xff\xd8\xff\xe0" + tail),
    st.integers(0, len(GOOD_PNG) - 1).map(lambda n: GOOD_PNG[:n]),
    st.tuples(st.integers(8, len(GOOD_PNG) - 1), st.integers(1, 255)).map(
        lambda flip: GOOD_PNG[:flip[0]] + bytes([GOOD_PNG[flip[0]] ^ flip[1]])
        + GOOD_PNG[flip[0] + 1:]),
)


@settings(max_examples=150, deadline=None)
@given(IMAGE_BYTES)
def test_random_bytes_as_an_image_are_classified_or_refused(content):
  limits = predict.Limits(max_file_bytes=1 << 20, max_pixels=1 << 20)
  with tempfile.NamedTemporaryFile(suffix=".png") as f:
    f.write(content)
    f.flush()
    try:
      pixels = predict.load_image(f.name, (28, 28, 1), limits)
    except predict.ImageRefused as e:
      assert str(e)
    else:
      assert pixels.shape == (28, 28, 1) and pixels.dtype == np.uint8


@settings(max_examples=2, deadline=None, suppress_health_check=FIXTURES)
@given(st.lists(IMAGE_BYTES, min_size=2, max_size=4))
@pytest.mark.slow
def test_predict_command_refuses_bad_files_and_still_classifies_good_ones(good_workdir, files):
  with tempfile.TemporaryDirectory() as folder:
    paths = []
    for index, content in enumerate([GOOD_PNG, *files]):
      paths.append(os.path.join(folder, f"{index}.png"))
      with open(paths[-1], "wb") as f:
        f.write(content)
    result = subprocess.run([sys.executable, "-m", "research.predict",
                             f"--workdir={good_workdir}", *paths], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.returncode in (0, 1), result.stderr[-3000:]
  assert result.stdout.startswith(f"{paths[0]}: ")  # the good image is classified
  refused = result.stderr.count(": error: ")
  assert len(result.stdout.splitlines()) + refused == len(paths)


# ---- Random bytes as dataset source files and prepared files -----------------------------

@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
  source = prepare_data.LOCAL_SOURCES["fashion_mnist"]
  if not prepare_data._has_local_files(source):
    pytest.skip(f"{source.directory} is not installed")
  directory = tmp_path_factory.mktemp("source")
  for name in source.gzip_mtimes:
    shutil.copy(os.path.join(source.directory, name), directory)
  return source, str(directory)


def _damaged(original: bytes, how):
  kind, position, value, noise = how
  if kind == "random":
    return noise
  if kind == "truncated":
    return original[:position % len(original)]
  index = 10 + position % (len(original) - 10)  # past the gzip header we rewrite anyway
  return original[:index] + bytes([original[index] ^ (value or 1)]) + original[index + 1:]


DAMAGE = st.tuples(st.sampled_from(["random", "truncated", "flipped"]),
                   st.integers(0, 2**31), st.integers(0, 255), st.binary(max_size=3000))


@settings(max_examples=8, deadline=None, suppress_health_check=FIXTURES)
@given(st.sampled_from(sorted(prepare_data.LOCAL_SOURCES["fashion_mnist"].gzip_mtimes)), DAMAGE)
@pytest.mark.slow
def test_random_bytes_as_a_source_file_prepare_or_name_the_file(source_copy, victim, how):
  source, good = source_copy
  with tempfile.TemporaryDirectory() as folder:
    directory = os.path.join(folder, "source")
    os.makedirs(directory)
    for name in source.gzip_mtimes:
      if name != victim:
        os.symlink(os.path.join(good, name), os.path.join(directory, name))
    with open(os.path.join(good, victim), "rb") as f:
      original = f.read()
    path = os.path.join(directory, victim)
    with open(path, "wb") as f:
      f.write(_damaged(original, how))
    data_dir = os.path.join(folder, "tfds")
    builder = prepare_data.builder_for("fashion_mnist", data_dir)
    try:
      prepare_data._prepare_from_local_files(
          builder, dataclasses.replace(source, directory=directory), data_dir)
    except UserError as e:
      assert path in str(e), str(e)
    else:
      assert prepare_data.is_prepared(builder)


@pytest.fixture(scope="module")
def prepared_dir(fashion_mnist):
  return os.fspath(prepare_data.builder_for("fashion_mnist", None).data_path)


PREPARED_FILES = ["dataset_info.json", "features.json", "label.labels.txt",
                  "fashion_mnist-test.array_record-00000-of-00001", "../3.0.1.decoded/test.npz"]
FILE_BYTES = st.one_of(
    st.binary(max_size=3000),
    st.sampled_from([b"", b"{}", b"[]", b"null", b'{"name": 1}', b'{"splits": "x"}', b"\x00" * 70000]),
)


@settings(max_examples=12, deadline=None, suppress_health_check=FIXTURES)
@given(st.sampled_from(PREPARED_FILES), FILE_BYTES)
@pytest.mark.slow
def test_random_bytes_in_a_prepared_dataset_load_or_say_why(prepared_dir, victim, content):
  import ml_collections

  before = tree_digest(prepared_dir)
  with tempfile.TemporaryDirectory() as folder:
    version = os.path.basename(prepared_dir)
    target = os.path.join(folder, "fashion_mnist", version)
    shutil.copytree(prepared_dir, target, copy_function=os.link)
    if os.path.isdir(prepared_dir + ".decoded"):
      shutil.copytree(prepared_dir + ".decoded", target + ".decoded", copy_function=os.link)
    path = os.path.normpath(os.path.join(target, victim))
    if os.path.exists(path):
      os.remove(path)  # break the hard link: the real file stays intact
    with open(path, "wb") as f:
      f.write(content)
    config = ml_collections.ConfigDict({"name": "fashion_mnist", "data_dir": folder})
    try:
      info, split = datasets.load_split(config, "test")
    except UserError as e:
      assert str(e)
    else:
      assert len(split) == 10000 and info.image_shape == (28, 28, 1)
  assert tree_digest(prepared_dir) == before
