"""The `ltm train` / `ltm eval` commands the docs quote still compose with today's config (no training).

- README.md and docs/*.md: every command composes without an unknown key or an unknown group option (a value
  error is allowed: some commands show one on purpose). A fenced example followed by its `error: ...` line
  that names an unknown key or option must still fail so, on the same key.
- docs/experiments/*.md quote commands as they were run, with the keys of their day: every command composes, or
  the keys that stop it are listed in the page's "then → now" table (the `| then | now |` table of its names
  note). On a page with that table, so must the overrides the text quotes alone (`model.x=...` spans outside
  the names note), each "now" override must compose today, and a retired option's row must link the row of
  negative-results.md that says why. A rename that leaves a page stale fails here.

"Composes" here means what makes a copied command fail at once: Hydra composes the command's group choices
(experiment=, model=, model/memory=, ...; an option that no longer exists fails there), and each other override's
key must exist in that config, as Hydra requires (one composition per distinct set of choices keeps this fast;
it gives the same unknown keys as composing each whole command, checked when the test was written). Values are
not judged. Placeholders are substituted: `seed=S` -> 1, `a|b` -> a, `[x=y]` -> x=y, `<...>` and `$VAR` -> a
path, and `...` or a word without `=` is dropped. `ltm eval` overrides (data.*, model.*, task.*) are composed as
a run's; a `model.memory.*` key counts as known when some memory kind has it, unless the command picks the kind.
"""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ltm_core.configuration import config_dir, config_error
from ltm_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CURRENT = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXPERIMENTS = sorted((ROOT / "docs" / "experiments").glob("*.md"))
NEGATIVE = ROOT / "docs" / "experiments" / "negative-results.md"

FENCE = re.compile(r"^\s*(```|~~~)")
COMMAND = re.compile(r"\bltm (train|eval)\b")
OPTIONS_WITH_VALUE = {"--checkpoint", "-c", "--json", "--plot", "--device", "--quantize"}
STALE = re.compile(r"unknown key|is not a key of|is not a model config key|no option '")
KINDS = ("tokens", "slots", "delta", "neural")
QUOTED = re.compile(r"^(model[./]\w|experiment=)")  # an override quoted alone in the text


# ------------------------------------------------------------------------------------------------- parsing
def _lines(path: Path) -> list[str]:
    """The page's lines with blockquote markers removed (tables and commands inside notes read as outside)."""
    return [re.sub(r"^\s*(>\s?)+", "", line) for line in path.read_text(encoding="utf-8").splitlines()]


def _fenced(lines: list[str]) -> list[tuple[int, str, str | None]]:
    """(line, command line with its `\\` continuations joined, the `error:` line printed after it or None)."""
    found, block, start, inside = [], [], 0, False
    for number, line in enumerate(lines + ["```"], 1):
        if FENCE.match(line):
            if inside:
                k = 0
                while k < len(block):
                    text, first = block[k], start + k + 1
                    while text.rstrip().endswith("\\") and k + 1 < len(block):
                        k += 1
                        text = text.rstrip()[:-1] + " " + block[k]
                    after = block[k + 1].strip() if k + 1 < len(block) else ""
                    found.append((first, text, after if after.startswith("error:") else None))
                    k += 1
            inside, block, start = not inside, [], number
        elif inside:
            block.append(line)
    return found


def _prose(lines: list[str]) -> str:
    """The text outside fenced blocks (fenced lines blanked, so line numbers stay)."""
    out, inside = [], False
    for line in lines:
        if FENCE.match(line):
            inside = not inside
            out.append("")
        else:
            out.append("" if inside else line)
    return "\n".join(out)


def _spans(text: str) -> list[tuple[int, str]]:
    """Inline code spans (they may wrap lines), with the line they start on."""
    return [(text.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split()))
            for m in re.finditer(r"(`+)(.+?)\1", text, flags=re.DOTALL)]


def commands(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, the arguments after `ltm train|eval`, the documented error or None) for each command quoted."""
    lines = _lines(path)
    out = []
    for number, code, error in _fenced(lines) + [(n, c, None) for n, c in _spans(_prose(lines))]:
        for match in COMMAND.finditer(code):
            rest = re.split(r"\s(?:#|&&|\|\||\||;|&(?=\s|$))", code[match.end():] + " ")[0]
            out.append((number, rest.strip(), error))
    return out


def overrides(args: str) -> tuple[list[str], bool]:
    """The Hydra overrides of a command's arguments (placeholders substituted), and whether it sweeps (-m)."""
    args = re.sub(r"<[^>]*>", "PLACEHOLDER", args)
    args = re.sub(r"\$\{?\w+\}?", "/tmp/ltm-docs", args)
    try:
        tokens = shlex.split(args)
    except ValueError:
        tokens = args.split()
    out, multirun, skip = [], False, False
    for token in tokens:
        if skip:
            skip = False
            continue
        if token in ("-m", "--multirun"):
            multirun = True
            continue
        if token.startswith("-"):
            skip = token in OPTIONS_WITH_VALUE
            continue
        if token.startswith("[") and "=" in token:  # an optional override: [model.x=1]
            token = token[1:]
        if token.endswith("]") and token.count("]") > token.count("["):
            token = token[:-1]
        if "=" not in token or "..." in token:
            continue
        key, value = token.split("=", 1)
        if not re.fullmatch(r"[+~]{0,2}[A-Za-z_][\w./]*", key):
            continue
        value = "1" if value == "S" else value
        if "|" in value and not value.startswith("["):
            value = value.split("|")[0]
        if key == "resume" and value != "auto" and not value.endswith(".ckpt"):
            value = "RUN/checkpoints/last.ckpt"
        out.append(f"{key}={value}")
    return out, multirun


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _entry(override: str) -> str:
    """What a then → now table lists: a group choice with its value (experiment=passkey_cross), a key alone."""
    key = _key(override)
    return override.lstrip("+~") if "." not in key else key


GROUPS = {str(p.relative_to(Path(config_dir()))) for p in Path(config_dir()).rglob("*")
          if p.is_dir() and not p.name.startswith("_")}  # data, experiment, model, model/memory, ...


@functools.cache
def _tree(choices: tuple[str, ...]) -> DictConfig | ConfigError:
    """Hydra's composition of conf/train.yaml with these group choices: the config tree, or the ConfigError that
    stops it (as `ltm train` words it). Values are not validated: only which keys and options exist matters."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return hydra_compose(config_name="train", overrides=list(choices))
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        return config_error(exc)
    finally:
        GlobalHydra.instance().clear()


def _has(tree: DictConfig, key: str) -> bool:
    """Whether an override of `key` is a known key of the tree (Hydra refuses an unknown one in a struct node)."""
    node = tree
    for part in key.split("."):
        if not isinstance(node, DictConfig):
            return True  # inside a value (a list, a free-form field): not a key question
        if part not in node:
            return not node._get_flag("struct")
        node = node._get_node(part)
    return True


def stale_overrides(overrides: list[str], multirun: bool = False) -> list[tuple[str, str]]:
    """The overrides today's config does not know, each with its error: a group option that does not exist (found
    by composing the command's group choices), or a key that the composed config does not have. A
    `model.memory.*` key unknown to the default kind is looked up in every kind when the command picks none (an
    override quoted for a run of that kind, or `ltm eval` on its checkpoint)."""
    choices, keys, stale = [], [], []
    for override in overrides:
        key = _key(override)
        if key.startswith("hydra") or override.startswith(("+", "~")):
            continue
        if key in GROUPS:  # a sweep (-m a,b) composes each option
            value = override.split("=", 1)[1]
            choices += [f"{key}={v}" for v in (value.split(",") if multirun else [value])]
        else:
            keys.append(override)
    while isinstance(tree := _tree(tuple(choices)), ConfigError):
        option = re.search(r"no option '([^']+)'", str(tree))
        hit = [i for i, o in enumerate(choices)
               if _key(o) == tree.key and (option is None or o.split("=", 1)[1] == option.group(1))]
        if not STALE.search(str(tree)) or not hit:
            return stale + [(tree.key, str(tree))]
        stale.append((choices.pop(hit[0]), str(tree)))
    free_kind = not any(_key(o) == "model/memory" for o in choices)
    for override in keys:
        key = _key(override)
        if _has(tree, key):
            continue
        if key.startswith("model.memory.") and free_kind and any(
                _has(t, key) for t in (_tree((*choices, f"model/memory={k}")) for k in KINDS)
                if not isinstance(t, ConfigError)):
            continue
        message = f"config error: {key}: unknown key (not in today's config; `ltm config show` lists the keys)"
        stale.append((override, message))
    return stale


def _cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def then_now(path: Path) -> list[tuple[str, str]]:
    """The rows (then, now) of the page's `| then | now |` table; [] when it has none."""
    lines, rows, inside = _lines(path), [], False
    for line in lines:
        if not line.strip().startswith("|"):
            inside = False
            continue
        cells = _cells(line)
        if [c.lower() for c in cells[:2]] == ["then", "now"]:
            inside = True
        elif inside and not set("".join(cells)) <= set("-: "):
            rows.append((cells[0], cells[1] if len(cells) > 1 else ""))
    return rows


def _quoted_overrides(code: str) -> list[str] | None:
    """The overrides of a code span that is only overrides starting with a model key or an experiment; else None."""
    tokens = code.split()
    if not tokens or not QUOTED.match(tokens[0]) or not all("=" in t.strip("[]") for t in tokens):
        return None
    return overrides(code)[0]


def allowed(rows: list[tuple[str, str]]) -> set[str]:
    """What a page's then → now table lists in its `then` column."""
    out = set()
    for then, _ in rows:
        for _, code in _spans(then):
            for token in code.split():
                if "=" in token or "." in token:  # an override, or a key named alone
                    out.add(_entry(token) if "=" in token else token)
    return out


# ------------------------------------------------------------------------------------------------- tests
def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", [p for p in CURRENT if p.exists()], ids=_rel)
def test_current_docs_commands_compose_today(path):
    problems = []
    for line, args, error in commands(path):
        found, multirun = overrides(args)
        stale = stale_overrides(found, multirun)
        if error is not None:  # an example of an error: when it names a stale key, it must still be one
            documented = re.match(r"error: config error: ([^:\s]+): ", error)
            if documented and STALE.search(error) and documented.group(1) not in [_key(o) for o, _ in stale]:
                problems.append(f"{_rel(path)}:{line}: `ltm ... {args}` no longer fails on {documented.group(1)}")
            continue
        problems += [f"{_rel(path)}:{line}: `ltm ... {args}`: {msg}" for _, msg in stale]
    assert not problems, "commands that today's config rejects:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=_rel)
def test_experiment_commands_compose_or_use_only_keys_of_their_then_now_table(path):
    rows = then_now(path)
    listed = allowed(rows)
    problems = []
    for line, args, _ in commands(path):
        found, multirun = overrides(args)
        problems += [f"{_rel(path)}:{line}: `{o}` ({msg})" for o, msg in stale_overrides(found, multirun)
                     if _entry(o) not in listed]
    if rows:  # the overrides quoted alone in the text (outside the names note, which is a blockquote)
        text = "\n".join("" if line.lstrip().startswith(">") else line
                         for line in path.read_text(encoding="utf-8").splitlines())
        for line, code in _spans(_prose(text.splitlines())):
            quoted = _quoted_overrides(code)
            if quoted:
                problems += [f"{_rel(path)}:{line}: `{o}` ({msg})" for o, msg in stale_overrides(quoted)
                             if _entry(o) not in listed]
    assert not problems, ("keys today's config rejects and the page's then → now table does not list "
                          "(add them, with today's override or the negative-results row):\n" + "\n".join(problems))


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if then_now(p)], ids=_rel)
def test_then_now_tables_give_todays_overrides_and_link_retired_options(path):
    anchors = set(re.findall(r'<a id="([^"]+)"', NEGATIVE.read_text(encoding="utf-8")))
    problems = []
    for then, now in then_now(path):
        for _, code in _spans(now):
            quoted = _quoted_overrides(code)
            if quoted:
                problems += [f"{then} -> `{code}`: {msg}" for _, msg in stale_overrides(quoted)]
        links = re.findall(r"negative-results\.md#([\w-]+)", now)
        if now.lower().startswith("retired") and not links:
            problems.append(f"{then}: a retired option links its row of negative-results.md")
        problems += [f"{then}: negative-results.md has no anchor #{a}" for a in links if a not in anchors]
    assert not problems, "\n".join(problems)
