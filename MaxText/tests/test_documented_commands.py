"""Every `python3 -m MaxText.<entry> ...` command in a fenced block of README.md or docs/*.md names a module that
exists, and its keys exist and validate through the loader that entry point uses (the same program checks).

Convention for placeholders in documented commands: a config path that is not a file in the repository (`CONFIG`,
`/ckpt/qwen3-8b/model.yml`) stands for any config and is checked as MaxText/configs/base.yml; path values (`DIR`,
`/ckpt/...`, `gs://bucket/...`) are the reader's own and are not opened. Commands that must run for real at small
size are the end-to-end scripts' (end_to_end/cpu/).
"""

import importlib.util
import re
import shlex
import subprocess
import sys

import pytest

from MaxText import pyconfig
from MaxText.config import checks
from MaxText.tests.test_train import REPO
from MaxText.utils.ckpt_conversion import cli, to_huggingface, to_maxtext

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]
BASE = "MaxText/configs/base.yml"
_SHELL_OPERATORS = {"&", "&&", "||", ";", "|", ">", ">>", "2>", "<"}
# Documented only to show the error it prints.
_ERROR_EXAMPLES = {"MaxText.pyconfig": "stepz=3"}


def _commands_in(text: str):
  """(module, args) for each `python3 -m MaxText.X args` in the fenced blocks (indented ones too)."""
  for block in re.findall(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", text, re.S | re.M):
    yield from _commands_in_shell(block)


def _commands_in_shell(script: str):
  """Commands in shell text: continuation lines joined, a quoted script (`bash -c '...'`) spanning lines kept whole."""
  pending = ""
  for line in script.replace("\\\n", " ").splitlines():
    if not pending and "python3 -m MaxText." not in line and " -c " not in line:
      continue  # output shown with the commands, or another tool's command
    pending = f"{pending}\n{line}" if pending else line
    try:
      tokens = shlex.split(pending.lstrip("$ "), comments=True)
    except ValueError:  # a quote still open: the command goes on
      continue
    pending = ""
    for i, token in enumerate(tokens):
      if "python3 -m MaxText." in token:  # a quoted inner script (bash -c '...')
        yield from _commands_in_shell(token)
      elif token == "python3" and tokens[i + 1 : i + 2] == ["-m"] and tokens[i + 2].startswith("MaxText."):
        args = []
        for arg in tokens[i + 3 :]:
          if arg in _SHELL_OPERATORS:
            break
          args.append(arg)
        yield tokens[i + 2], args
  assert not pending, f"unclosed quote in a documented command: {pending[:200]}"


def documented():
  found = []
  for path in DOCS:
    for module, args in _commands_in(path.read_text()):
      found.append(pytest.param(module, args, id=f"{path.name}:{module.split('.')[-1]}:{len(found)}"))
  return found


def _config_file(arg: str) -> str:
  return arg if (REPO / arg).is_file() else BASE


def test_docs_show_commands_for_every_entry_point():
  modules = {p.values[0] for p in documented()}
  for program in ("train", "decode", "serve", "train_compile"):
    assert f"MaxText.{program}" in modules
  assert "MaxText.utils.ckpt_conversion.to_maxtext" in modules


@pytest.mark.parametrize("module,args", documented())
def test_documented_command_validates(module, args):
  assert importlib.util.find_spec(module) is not None, f"{module} does not exist"
  program = module.removeprefix("MaxText.")
  if program in checks.PROGRAMS:
    assert args and "=" not in args[0], f"{module}: the first argument is the config file"
    pyconfig.initialize(["", _config_file(args[0]), *args[1:]], program=program)
  elif module == "MaxText.utils.ckpt_conversion.to_maxtext":
    own, overrides = cli.split_args(args, to_maxtext.TOOL_KEYS)
    assert set(own) == set(to_maxtext.TOOL_KEYS), own
    pyconfig.initialize(["", BASE, *overrides])
  elif module == "MaxText.utils.ckpt_conversion.to_huggingface":
    own, overrides = cli.split_args(args[1:], to_huggingface.TOOL_KEYS)
    assert own.keys() & {"hf_output_path", "peft_output_path"}, own  # at least one output
    pyconfig.initialize(["", _config_file(args[0]), *overrides])
  elif module in _ERROR_EXAMPLES:
    assert _ERROR_EXAMPLES[module] in args


def test_docs_site_builds_without_broken_links(tmp_path):
  """mkdocs in strict mode: a link to a missing page or anchor, or a page left out of the nav, fails the build."""
  proc = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "site" / "config_reference" / "index.html").is_file()


def test_readme_links_reach_existing_pages():
  text = (REPO / "README.md").read_text()
  targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
  local = [t for t in targets if "://" not in t]
  assert local and all((REPO / t).exists() for t in local), [t for t in local if not (REPO / t).exists()]
