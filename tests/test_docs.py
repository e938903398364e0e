"""The documentation: the site builds, its links resolve, the reference is complete.

- ``mkdocs build --strict`` builds the site (and a broken link or anchor fails it);
- every relative link and ``#anchor`` in the top-level documents and ``docs/``
  resolves, by the slug rule of the renderer that shows that file (GitHub for
  the top-level files, mkdocs for ``docs/``);
- ``docs/configuration.md`` lists every environment variable the package reads
  and every key the config parser accepts (table by table, with the parser's
  own defaults), and nothing the parser would refuse.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
import unicodedata
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from creditgate import config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIG_PAGE = DOCS / "configuration.md"
TOP_LEVEL_DOCS = ("README.md", "ARCHITECTURE.md", "BENCHMARKS.md")


def _doc_files() -> list[Path]:
    return [ROOT / name for name in TOP_LEVEL_DOCS] + sorted(DOCS.glob("*.md"))


# ---------------------------------------------------------------- markdown


FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\".*\")?\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:[^>]*\s)?(?:id|name)=\"([^\"]+)\"")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            continue
        if fence is None:
            out.append((n, line))
    return out


def _heading_text(raw: str) -> str:
    """A heading's visible text: code spans' content kept, link targets and markup dropped."""
    text = INLINE_CODE.sub(lambda m: m.group(2).strip(), raw)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"(\*\*|__|\*)", "", text).strip()


def github_slug(text: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def mkdocs_slug(text: str) -> str:
    """Python-Markdown's ``toc`` slugify, which mkdocs uses by default."""
    value = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def anchors(path: Path, *, mkdocs: bool) -> set[str]:
    """Every anchor a link may name in ``path``, as GitHub or mkdocs renders it."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in _prose_lines(path.read_text("utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if not m:
            continue
        text = _heading_text(m.group(2))
        slug = mkdocs_slug(text) if mkdocs else github_slug(text)
        if slug in seen:  # a repeated heading: -1, -2 (GitHub) or _1, _2 (mkdocs)
            seen[slug] += 1
            slug = f"{slug}{'_' if mkdocs else '-'}{seen[slug]}"
        else:
            seen[slug] = 0
        found.add(slug)
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition."""
    out: list[tuple[int, str]] = []
    for n, line in _prose_lines(path.read_text("utf-8")):
        prose = INLINE_CODE.sub("", line)
        out += [(n, t) for t in LINK.findall(prose)]
        m = REF_DEF.match(prose)
        if m:
            out.append((n, m.group(1)))
    return out


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """The links of ``path`` that do not resolve, each as ``file:line: target: why``.

    Files in ``root/docs`` are pages of the site: they may link only to each other.
    """
    docs = root / "docs"
    in_docs = path.parent == docs
    problems: list[str] = []
    for n, target in links(path):
        if _is_external(target):
            continue
        where = f"{path.relative_to(root)}:{n}: {target}"
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.is_relative_to(root):
            problems.append(f"{where}: points outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if in_docs and not dest.is_relative_to(docs):
            problems.append(f"{where}: a docs page may only link to docs pages (the site)")
            continue
        if anchor:
            if dest.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest, mkdocs=in_docs):
                problems.append(f"{where}: no heading with the anchor #{anchor}")
    return problems


# ---------------------------------------------------------------- (a) the site


def _mkdocs(config_file: Path, site_dir: Path) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[test]' (it pins mkdocs)")
    # Not --quiet: it hides the warnings from the counter that --strict fails on.
    command = [sys.executable, "-m", "mkdocs", "build", "--strict"]
    return subprocess.run(
        [*command, "--config-file", str(config_file), "--site-dir", str(site_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_site_builds_strictly_with_every_page_in_the_nav(tmp_path: Path) -> None:
    result = _mkdocs(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    for page in DOCS.glob("*.md"):
        built = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert (tmp_path / "site" / built).is_file(), f"{page.name} was not built"


@pytest.mark.parametrize(
    ("bad_link", "why"),
    [("[x](no-such-page.md)", "missing page"), ("[x](configuration.md#no-such-heading)", "anchor")],
)
def test_a_broken_link_fails_the_site_build(tmp_path: Path, bad_link: str, why: str) -> None:
    """The validation settings in mkdocs.yml make a broken link an error, not a note."""
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "index.md"
    page.write_text(page.read_text("utf-8") + f"\n{bad_link}\n", "utf-8")
    result = _mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0, f"a {why} link did not fail the build"


# ---------------------------------------------------------------- (b) links


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path: Path) -> None:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    assert broken_links(path) == []


def test_the_link_checker_finds_broken_links_and_anchors(tmp_path: Path) -> None:
    """The checker itself: good links pass, each kind of broken one is reported."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# Readme\n", "utf-8")
    shutil.copy(CONFIG_PAGE, tmp_path / "docs" / "configuration.md")
    page = tmp_path / "docs" / "probe.md"
    page.write_text(
        "# Probe\n\n## Money & credits\n\n## Money & credits\n\n"
        "[ok](#money-credits) [ok](#money-credits_1) [ok](configuration.md#ledger)\n"
        "[bad](#money--credits) [bad](nope.md) [bad](configuration.md#nope)\n"
        "[bad](../README.md) [bad](../../outside.md) `[code](nope.md)`\n"
        "```\n[fenced](nope.md)\n```\n",
        "utf-8",
    )
    problems = broken_links(page, tmp_path)
    assert [p.split(": ")[1] for p in problems] == [
        "#money--credits",
        "nope.md",
        "configuration.md#nope",
        "../README.md",
        "../../outside.md",
    ]
    assert github_slug("Money & credits") == "money--credits"
    assert github_slug("`creditgate dev` (local)") == "creditgate-dev-local"


OUTSIDE = re.compile(r"DESIGN\.md|REFERENCES\.md|\.\./shared|/work/")


def outside_references(path: Path) -> list[str]:
    """Lines of ``path`` naming a file users do not have (the design notes, a workspace path)."""
    return [
        f"{path.name}:{n}: {line.strip()}"
        for n, line in enumerate(path.read_text("utf-8").splitlines(), 1)
        if OUTSIDE.search(line)
    ]


def test_no_page_refers_to_files_outside_the_repository() -> None:
    """Users have only the repository: no page, top-level document or site config
    points at the design notes or a workspace path."""
    paths = [*_doc_files(), ROOT / "mkdocs.yml"]
    assert [p for p in paths if p.name in TOP_LEVEL_DOCS] == [ROOT / n for n in TOP_LEVEL_DOCS]
    assert [line for path in paths for line in outside_references(path)] == []


def test_the_outside_reference_check_finds_them(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "ok\nsee DESIGN.md §8\n[x](../shared/REFERENCES.md)\nPYTHONPATH=/work/main\n", "utf-8"
    )
    assert [p.split(":")[1] for p in outside_references(page)] == ["2", "3", "4"]


# ---------------------------------------------------------------- the README


def _readme_blocks() -> list[str]:
    return re.findall(r"^```\w*\n(.*?)^```", (ROOT / "README.md").read_text("utf-8"), re.M | re.S)


def test_the_readme_opens_with_the_two_commands_and_ci_runs_the_second() -> None:
    """The first two commands a newcomer meets: dev (with the dev extra) and the tests;
    CI runs exactly the README's test command."""
    text = (ROOT / "README.md").read_text("utf-8")
    first_block = _readme_blocks()[0]
    assert text.index("```") < text.index("\n## "), "the commands come before any section"
    dev, test = first_block.strip().splitlines()
    assert dev == (
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && .venv/bin/creditgate dev"
    )
    assert test.endswith(".venv/bin/pytest") and "'.[test]'" in test
    ci = (ROOT / ".ci" / "run").read_text("utf-8").strip().splitlines()
    assert ci[-1] == test
    assert first_block in (DOCS / "index.md").read_text("utf-8"), "the site's overview agrees"


def test_the_readme_has_one_contents_line_per_docs_page() -> None:
    text = (ROOT / "README.md").read_text("utf-8")
    rows = [line for line in text.splitlines() if re.match(r"^\| \[.+\]\(docs/[\w-]+\.md\)", line)]
    linked = [re.search(r"\(docs/([\w-]+\.md)\)", row).group(1) for row in rows]  # type: ignore[union-attr]
    pages = sorted(p.name for p in DOCS.glob("*.md") if p.name != "index.md")
    assert sorted(linked) == pages, "each docs page once in the README's table of contents"
    assert "ARCHITECTURE.md" in text and "BENCHMARKS.md" in text


# ---------------------------------------------------------------- (c) the reference

ENV_RECEIVERS = {"env", "environ"}  # os.environ, or a Mapping passed as ``env``
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _env_receiver(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id in ENV_RECEIVERS) or (
        isinstance(node, ast.Attribute) and node.attr == "environ"
    )


def _literal(node: ast.expr | None) -> str | None:
    is_name = isinstance(node, ast.Constant) and isinstance(node.value, str)
    return node.value if is_name and ENV_NAME.match(node.value) else None  # type: ignore[union-attr]


def env_vars_read_by_the_package() -> dict[str, str]:
    """Variable name → first place it is read: ``env.get("X")``, ``environ["X"]``,
    ``"X" in os.environ``, ``getenv("X")`` in every module of the package."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "creditgate").rglob("*.py")):
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            name: str | None = None
            if isinstance(node, ast.Call) and node.args:
                f = node.func
                if isinstance(f, ast.Attribute) and f.attr in ("get", "pop", "setdefault"):
                    name = _literal(node.args[0]) if _env_receiver(f.value) else None
                elif (isinstance(f, ast.Attribute) and f.attr == "getenv") or (
                    isinstance(f, ast.Name) and f.id == "getenv"
                ):
                    name = _literal(node.args[0])
            elif isinstance(node, ast.Subscript) and _env_receiver(node.value):
                name = _literal(node.slice)
            elif (
                isinstance(node, ast.Compare)
                and isinstance(node.ops[0], ast.In | ast.NotIn)
                and _env_receiver(node.comparators[0])
            ):
                name = _literal(node.left)
            if name is not None:
                found.setdefault(name, f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}")
    return found


def _sections(text: str) -> list[tuple[int, str, list[str]]]:
    """(level, heading text, prose lines up to the next heading) of a Markdown page."""
    sections: list[tuple[int, str, list[str]]] = []
    for _, line in _prose_lines(text):
        m = HEADING.match(line)
        if m:
            sections.append((len(m.group(1)), m.group(2), []))
        elif sections:
            sections[-1][2].append(line)
    return sections


ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|")


def _rows(lines: list[str]) -> dict[str, list[str]]:
    """First-column code span → the row's cells, for every table row of ``lines``."""
    rows: dict[str, list[str]] = {}
    for line in lines:
        m = ROW.match(line)
        if m:
            rows[m.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


def documented_env_vars() -> set[str]:
    """Variables in the tables of the page's "Environment variables" section."""
    found: set[str] = set()
    inside = False
    for level, title, lines in _sections(CONFIG_PAGE.read_text("utf-8")):
        if level == 2:
            inside = title == "Environment variables"
        if inside:
            found |= {k for k in _rows(lines) if ENV_NAME.match(k)}
    return found


TABLE_HEADING = re.compile(r"`\[\[?([A-Za-z0-9_.*]+)\]\]?`")
NAMED_TABLES = re.compile(r"^(upstreams|models|tiers|products)\.[^.\[]+")


def _normal(table: str) -> str:
    """``models.gpt.deployments[1]`` / ``models.NAME.deployments`` → ``models.*.deployments``."""
    return re.sub(r"\[\d+\]$", "", NAMED_TABLES.sub(r"\1.*", table))


def documented_tables() -> dict[str, dict[str, list[str]]]:
    """Normalised table name → key → row cells, from the ``[table]`` headings."""
    tables: dict[str, dict[str, list[str]]] = {}
    for _, title, lines in _sections(CONFIG_PAGE.read_text("utf-8")):
        m = TABLE_HEADING.search(title)
        if m:
            tables[_normal(m.group(1))] = _rows(lines)
    return tables


# A configuration with an entry of every table, so the parser checks every table's keys.
SAMPLE = """
[upstreams.main]
base_url = "http://127.0.0.1:9/v1"
[models.m]
input_price = 1
output_price = 2
max_output_tokens = 10
deployments = [{ upstream = "main", model = "m" }]
[models.m.timeouts]
[tiers.free]
requests_per_minute = 1
tokens_per_minute = 1
max_parallel = 1
messages_per_day = 1
[products.p]
kind = "pack"
[ledger]
[proxy]
[http]
[throttle]
[polar]
[notifications]
[retention]
"""


def accepted_keys(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, set[str]], Any]:
    """Table → the keys the parser accepts there (recorded from its own checks), and the
    parsed sample (whose values are the parser's defaults)."""
    accepted: dict[str, set[str]] = {}
    original = config._check_keys

    def record(table: dict[str, Any], allowed: set[str], where: str) -> None:
        accepted.setdefault(_normal(where), set()).update(allowed)
        original(table, allowed, where)

    monkeypatch.setattr(config, "_check_keys", record)
    parsed = config.parse_config(tomllib.loads(SAMPLE, parse_float=Decimal), {})
    return accepted, parsed


def test_every_environment_variable_the_package_reads_is_documented() -> None:
    read = env_vars_read_by_the_package()
    # The scanner must see the reads it is meant to see, or this test proves nothing.
    assert {"DATABASE_URL", "CREDITGATE_CONFIG", "PROMETHEUS_MULTIPROC_DIR"} <= set(read)
    missing = {name: where for name, where in read.items() if name not in documented_env_vars()}
    assert not missing, f"read but not in docs/configuration.md: {missing}"


def test_every_toml_key_the_parser_accepts_is_documented_in_its_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    accepted, _ = accepted_keys(monkeypatch)
    top_level = accepted.pop("config")
    documented = documented_tables()
    for name in top_level:
        assert any(t.split(".")[0] == name for t in accepted), (
            f"[{name}]: add an entry of it to SAMPLE so its keys are checked"
        )
    for table, keys in sorted(accepted.items()):
        assert table in documented, f"no `[{table}]` heading in docs/configuration.md"
        missing = keys - set(documented[table])
        assert not missing, f"[{table}] keys not documented: {sorted(missing)}"
    for table, rows in documented.items():
        assert table in accepted, f"docs/configuration.md documents [{table}], the parser has none"
        unknown = {k for k, cells in rows.items() if k not in accepted[table]}
        stale = {k for k in unknown if "deprecated" not in " ".join(rows[k]).lower()}
        assert not stale, f"[{table}] documents keys the parser refuses: {sorted(stale)}"


def _default_cell(cells: list[str]) -> Any:
    """The documented default (third column) when it is a literal, else None."""
    m = re.match(r"^`([^`]+)`", cells[2]) if len(cells) > 2 else None
    if m is None:
        return None
    text = m.group(1)
    return tomllib.loads(f"v = {text}", parse_float=Decimal)["v"]


def test_documented_defaults_are_the_parsers(monkeypatch: pytest.MonkeyPatch) -> None:
    _, parsed = accepted_keys(monkeypatch)
    model = parsed.models["m"]
    actual = {
        "polar": parsed.polar,
        "notifications": parsed.notifications,
        "retention": parsed.retention,
        "throttle": parsed.throttle,
        "ledger": parsed,
        "proxy": parsed,
        "http": parsed,
        "models.*.timeouts": model.timeouts,
        "models.*.deployments": model.deployments[0],
        "models.*": model,
    }
    compared = 0
    for table, rows in documented_tables().items():
        if table not in actual:
            continue
        for key, cells in rows.items():
            expected = _default_cell(cells)
            if expected is None or not hasattr(actual[table], key):
                continue
            value = getattr(actual[table], key)
            value = list(value) if isinstance(value, tuple) else value
            if isinstance(value, float | int) and not isinstance(value, bool):
                value, expected = Decimal(str(value)), Decimal(str(expected))
            assert value == expected, f"[{table}] {key}: documented {expected!r}, parser {value!r}"
            compared += 1
    assert compared >= 36, f"only {compared} defaults compared: is the page's format changed?"


def _toml_blocks(path: Path) -> list[str]:
    blocks = re.findall(r"^```toml\n(.*?)^```", path.read_text("utf-8"), re.M | re.S)
    assert blocks or path.name not in ("configuration.md", "providers.md")
    return blocks


@pytest.mark.parametrize("path", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_every_toml_sample_in_the_docs_is_valid_toml(path: Path) -> None:
    for block in _toml_blocks(path):
        tomllib.loads(block)


def test_the_complete_configuration_example_is_accepted() -> None:
    example = _toml_blocks(CONFIG_PAGE)[-1]
    parsed = config.parse_config(tomllib.loads(example, parse_float=Decimal), {})
    assert "gpt-4o-mini" in parsed.models


def test_the_provider_page_samples_make_one_valid_configuration() -> None:
    """Steps 1, 2 and 5 of the page together are a configuration the parser accepts."""
    blocks = _toml_blocks(DOCS / "providers.md")
    joined = "\n".join(b for b in blocks if not b.startswith('[models."gpt-4o-mini"]\n# …'))
    parsed = config.parse_config(tomllib.loads(joined, parse_float=Decimal), {})
    assert {"gpt-4o-mini", "reasoner", "llama-3.1-8b"} <= set(parsed.models)
