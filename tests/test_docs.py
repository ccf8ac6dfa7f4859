"""What the documentation promises and can silently stop keeping: links that resolve, a README
that stays a front door, the README's test command being CI's, every config field documented,
and no task-tracker numbers in the text users read."""

import pathlib
import re

from configs import base, sweep

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 220

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
_REPO_PATH_IN_CODE = re.compile(r"`((?:docs|notes)/[^`\s*]+)`")
_ISSUE = re.compile(r"\bissues?[\s_#-]*(?:no\.?\s*)?(?:\d|\*)", re.I)


def _markdown_files() -> list[pathlib.Path]:
  return [README, *sorted(DOCS.rglob("*.md"))]


def _prose(text: str) -> str:
  """The text outside fenced code blocks (links in code are not links)."""
  return _FENCE.sub("", text)


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: link text kept, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
  seen: dict[str, int] = {}
  anchors = set()
  for match in _HEADING.finditer(_prose(path.read_text(encoding="utf-8"))):
    slug = _slug(match.group(1))
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    anchors.add(slug if count == 0 else f"{slug}-{count}")
  return anchors


def _broken_links(path: pathlib.Path) -> list[str]:
  broken = []
  prose = _INLINE_CODE.sub("", _prose(path.read_text(encoding="utf-8")))
  for target in _LINK.findall(prose):
    if _SCHEME.match(target):
      continue  # http(s), mailto: not checked offline
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    if not dest.exists():
      broken.append(f"{target} (no such file)")
    elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
      broken.append(f"{target} (no heading with anchor #{anchor} in {dest.name})")
  for mention in _REPO_PATH_IN_CODE.findall(_prose(path.read_text(encoding="utf-8"))):
    if not (ROOT / mention).exists():
      broken.append(f"`{mention}` (a repository path in code quotes that does not exist)")
  return broken


def test_every_relative_link_in_readme_and_docs_resolves():
  broken = {str(p.relative_to(ROOT)): b for p in _markdown_files() if (b := _broken_links(p))}
  assert not broken, f"broken links: {broken}"


def test_readme_is_a_front_door_of_at_most_220_lines():
  lines = README.read_text(encoding="utf-8").count("\n")
  assert lines <= README_MAX_LINES, (
      f"README.md has {lines} lines (limit {README_MAX_LINES}): move detail into docs/")


def _ci_test_commands() -> list[str]:
  commands = []
  for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines():
    if line.lstrip().startswith("#"):
      continue
    commands += [m.strip() for m in re.findall(r"python -m pytest[^|;&\n#]*", line)]
  return commands


def _readme_code_lines() -> set[str]:
  text = README.read_text(encoding="utf-8")
  blocks = re.findall(r"^ {0,3}```[^\n]*\n(.*?)^ {0,3}```", text, re.M | re.S)
  return {line.strip() for block in blocks for line in block.splitlines()}


def test_readme_shows_the_test_command_ci_runs():
  commands = _ci_test_commands()
  assert len(commands) == 1, f".ci/run should run one pytest command, found {commands}"
  assert commands[0] in _readme_code_lines(), (
      f"README.md's code blocks do not show CI's test command `{commands[0]}`")


def _config_fields(config, prefix: str = "") -> list[str]:
  fields = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    fields += _config_fields(value, name + ".") if hasattr(value, "items") else [name]
  return fields


def test_every_config_field_is_in_docs_config_md():
  documented = (DOCS / "config.md").read_text(encoding="utf-8")
  fields = set(_config_fields(base.get_config())) | set(_config_fields(sweep.get_config()))
  missing = sorted(f for f in fields if f"`{f}`" not in documented)
  assert not missing, f"config fields missing from docs/config.md: {missing}"


def _issue_number_mentions() -> list[str]:
  text_files = (p for p in DOCS.rglob("*") if p.suffix in {".md", ".json", ".txt", ".py"})
  code = [ROOT / "main.py", *sorted((ROOT / "twodquant_jax").rglob("*.py")),
          *sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py")),
          *sorted((ROOT / "benchmarks").glob("*.sh"))]
  files = [README, *sorted(text_files), *sorted((ROOT / "configs").glob("*.py")),
           *sorted((ROOT / "notebooks").glob("*.ipynb")), *code]
  found = []
  for path in files:
    if _ISSUE.search(path.name):
      found.append(f"{path.relative_to(ROOT)} (file name)")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      if _ISSUE.search(line):
        found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
  return found


def test_no_issue_numbers_in_docs_configs_notebooks_or_code():
  found = _issue_number_mentions()
  assert not found, "say what the work did, not which ticket asked for it: " + "; ".join(found)
