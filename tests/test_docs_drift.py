"""The reference pages, checked against the code: every setting, error code, outbound event,
route and CLI command (and catalog key) is on its page, and everything a page lists exists.

The code's side is found by introspection and by walking the source, never by a list kept
here: the settings model's fields, the codes every `ApiError(...)`/`error_response(...)` names
and the enums of refusals and gate reasons, the `Event(...)` calls of actors/, the routes of
the app and its OpenAPI document (built without a service, as tests/test_billing_page.py
builds its `bare_app`), the Typer command tree, the keys config/catalog.py reads.

The pages' side is what they mark for it: a table row whose first cell is a name in
backticks, or a heading `### \\`name\\``. Prose around them is free. No service; fast.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest
import typer

from config.catalog import load_catalog
from config.settings import Settings
from metergate_client.decision import Reason
from serve_app.app import build_app
from serve_app.context import Context
from serve_app.errors import STATUS_BY_REFUSAL
from serve_app.haproxy_front import OWN_ANSWERS
from serve_app.views import STATUS_BY_REASON

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
ANY_STATUS = None  # a code whose status the code does not fix (the framework's own HTTP errors)

ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|(.*)$")
HEADING = re.compile(r"^(#{2,4})\s+`([^`]+)`\s*$")
STATUS = re.compile(r"`(\d{3})`")


# ----- reading the pages ------------------------------------------------------------------


def page(name: str) -> str:
    return (REFERENCE / name).read_text()


def sections(text: str, level: int | None = None) -> dict[str, str]:
    """The text under each `name` heading (at `level`, or any), up to the next heading at its
    level or above."""
    found: dict[str, str] = {}
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = HEADING.match(line)
        if not match or (level is not None and len(match.group(1)) != level):
            continue
        depth, body = len(match.group(1)), []
        for later in lines[index + 1:]:
            if later.startswith("#") and len(later) - len(later.lstrip("#")) <= depth:
                break
            body.append(later)
        assert match.group(2) not in found, f"{match.group(2)} has two headings"
        found[match.group(2)] = "\n".join(body)
    return found


def rows(text: str, unique: bool = True) -> dict[str, str]:
    """First cell (the name in backticks) -> the rest of the row, of every table in `text`
    (`unique`: a name in two rows is a mistake of the page)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            name = match.group(1).split()[0]  # "`--url URL`" names --url
            assert not (unique and name in found), f"{name} has two rows"
            found[name] = match.group(2)
    return found


def part(text: str, title: str) -> str:
    """The text under the `## title` heading, up to the next `## `."""
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no section '## {title}'"
    return match.group(1)


def listed_statuses(section: str) -> set[str]:
    """The statuses of a route's `**Answers:**` and `**Errors:**` items (wrapped lines too)."""
    found, inside = set(), False
    for line in section.splitlines():
        if line.startswith("- "):
            inside = line.startswith(("- **Answers:**", "- **Errors:**"))
        elif not line.startswith("  "):
            inside = False
        if inside:
            found |= set(STATUS.findall(line))
    return found


def differences(what: str, in_code: set, on_page: set, page_name: str) -> list[str]:
    problems = [f"{what} {name} is not on docs/reference/{page_name}" for name in sorted(in_code - on_page)]
    problems += [f"docs/reference/{page_name} lists {what} {name}, which the code does not have"
                 for name in sorted(on_page - in_code)]
    return problems


# ----- reading the code -------------------------------------------------------------------


def trees(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def called(node: ast.Call) -> str | None:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def text_of(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def error_codes() -> dict[str, set[int | None]]:
    """Every error code the service can answer, with its statuses."""
    codes: dict[str, set[int | None]] = {}

    def add(code: str, status: int | None) -> None:
        codes.setdefault(str(code), set()).add(status)

    for _, tree in trees("serve_app"):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            # ApiError(status, "code", ...) and error_response(status, "code", ...)
            if called(node) in ("ApiError", "error_response") and len(node.args) >= 2 and text_of(node.args[1]):
                status = node.args[0].value if isinstance(node.args[0], ast.Constant) else ANY_STATUS
                add(text_of(node.args[1]), status)
            # {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
            if called(node) == "get" and isinstance(node.func.value, ast.Dict) and len(node.args) == 2:
                for key, value in zip(node.func.value.keys, node.func.value.values):
                    if isinstance(key, ast.Constant) and isinstance(key.value, int) and text_of(value):
                        add(text_of(value), key.value)
                if text_of(node.args[1]) and all(isinstance(k, ast.Constant) and isinstance(k.value, int)
                                                 for k in node.func.value.keys):
                    add(text_of(node.args[1]), ANY_STATUS)
    for refusal, status in STATUS_BY_REFUSAL.items():  # what shards refuse, as the edge maps it
        add(refusal.value, status)
    for reason, status in STATUS_BY_REASON.items():  # a denied lease answers its reason as the code
        if reason is not Reason.OK:
            add(reason.value, status)
    for status, code, _ in OWN_ANSWERS.values():  # the load balancer's own answers
        add(code, status)
    return codes


def outbound_events() -> dict[str, set[str]]:
    """Each outbound event type (every `Event("type", org_id, at, {...})` of actors/) -> the
    fields of its `data`, with those the outbox adds to every event's data."""
    events: dict[str, set[str]] = {}
    for _, tree in trees("actors"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and called(node) == "Event" and node.args and text_of(node.args[0]):
                data = node.args[3] if len(node.args) > 3 else None
                assert isinstance(data, ast.Dict), f"{text_of(node.args[0])}: its data is not a dict literal"
                events.setdefault(text_of(node.args[0]), set()).update(text_of(k) for k in data.keys if k is not None)
    common = outbox_data_fields()
    return {kind: fields | common for kind, fields in events.items()}


def outbox_data_fields() -> set[str]:
    """The keys the shard adds to every event's data (`{"org_id": ..., **event.data}`)."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / "actors" / "batch.py").read_text())):
        if isinstance(node, ast.Dict) and any(k is None for k in node.keys) and any(
                isinstance(v, ast.Attribute) and v.attr == "data" for v in node.values):
            found |= {text_of(k) for k in node.keys if k is not None}
    assert found, "actors/batch.py no longer spreads event.data into the outbox row"
    return found


def envelope_fields() -> set[str]:
    """The keys of the body the scheduler posts (actors/jobs.py `_deliver`)."""
    tree = ast.parse((ROOT / "actors" / "jobs.py").read_text())
    deliver = next(n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef) and n.name == "_deliver")
    bodies = [n for n in ast.walk(deliver) if isinstance(n, ast.Dict) and "data" in {text_of(k) for k in n.keys}]
    assert len(bodies) == 1, "actors/jobs.py _deliver: not one envelope dict"
    return {text_of(k) for k in bodies[0].keys}


def catalog_keys() -> set[str]:
    """Every key config/catalog.py reads from the TOML: `.get("key")`, `_nonneg_int(table,
    "key", ...)`, `"key" in raw`, and the tier names it requires."""
    keys = set()
    for node in ast.walk(ast.parse((ROOT / "config" / "catalog.py").read_text())):
        if isinstance(node, ast.Call) and called(node) == "get" and node.args and text_of(node.args[0]):
            keys.add(text_of(node.args[0]))
        elif isinstance(node, ast.Call) and called(node) == "_nonneg_int" and len(node.args) > 1 \
                and text_of(node.args[1]):
            keys.add(text_of(node.args[1]))
        elif isinstance(node, ast.Compare) and text_of(node.left) and isinstance(node.ops[0], ast.In):
            keys.add(text_of(node.left))
        elif isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple):
            keys |= {text_of(e) for e in node.iter.elts if text_of(e)}
    return keys


def cli_commands() -> dict[str, set[str]]:
    """`metergate ...` -> its options, from the Typer app."""
    from cli.main import app

    root = typer.main.get_command(app)
    context = click.Context(root)
    found: dict[str, set[str]] = {}

    def walk(command, path: str) -> None:
        if hasattr(command, "list_commands"):
            for name in command.list_commands(context):
                walk(command.get_command(context, name), f"{path} {name}")
        # A group that also runs on its own (`metergate parity`) is a command with options too.
        if not hasattr(command, "list_commands") or command.invoke_without_command:
            # Typer may vendor its own click: an option is known by its kind, not its class.
            found[path] = {opt for param in command.params if param.param_type_name == "option"
                           for opt in param.opts + param.secondary_opts}

    walk(root, "metergate")
    return found


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The whole app, test clock on (its routes exist then), without a service behind it."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("drift"), service_token="s" * 20, admin_token="a" * 20,
                        org_token_secret="o" * 32, test_clock=True)
    return build_app(Context(settings, load_catalog(settings.catalog), router=None))


def app_routes(app) -> set[str]:
    """"METHOD /path" of every route the app serves, in the OpenAPI document or not (routers
    included into it are walked: FastAPI may keep them whole)."""
    found = set()

    def walk(routes, prefix: str) -> None:
        for route in routes:
            included = getattr(route, "original_router", None)
            if included is not None:
                walk(included.routes, prefix + route.include_context.prefix)
            else:
                found.update(f"{method} {prefix}{route.path}" for method in getattr(route, "methods", None) or ()
                             if method in METHODS)

    walk(app.routes, "")
    return found


# ----- the tests ----------------------------------------------------------------------------


def test_every_setting_is_on_the_settings_page_and_every_entry_is_a_setting():
    in_code = {f"METERGATE_{name.upper()}" for name in Settings.model_fields}
    on_page = set(rows(page("settings.md")))
    assert len(in_code) > 50
    assert not (problems := differences("setting", in_code, on_page, "settings.md")), "\n".join(problems)


def test_every_error_code_is_on_the_errors_page_with_its_statuses():
    in_code = error_codes()
    listed = rows(part(page("errors.md"), "Codes"))
    assert {"invalid_page", "invalid_command", "unknown_unit", "wrong_shard", "shard_busy", "gate_views_disabled",
            "too_many_checks", "method_not_allowed"} <= set(in_code)  # the walk finds what issue 19 named
    problems = differences("error code", set(in_code), set(listed), "errors.md")
    for code in sorted(set(in_code) & set(listed)):
        statuses = in_code[code]
        documented = {int(s) for s in re.findall(r"\b(\d{3})\b", listed[code].split("|")[0])}
        if ANY_STATUS in statuses:
            continue
        if statuses != documented:
            problems.append(f"errors.md: {code} is {sorted(documented)}, the code answers it with {sorted(statuses)}")
    assert not problems, "\n".join(problems)


def test_every_outbound_event_is_on_the_events_page_with_its_fields():
    in_code = outbound_events()
    documented = sections(part(page("events.md"), "Event types"), level=3)
    assert len(in_code) >= 9
    problems = differences("outbound event", set(in_code), set(documented), "events.md")
    for kind in sorted(set(in_code) & set(documented)):
        problems += differences(f"field of {kind}:", in_code[kind], set(rows(documented[kind])), "events.md")
    problems += differences("envelope field", envelope_fields(), set(rows(part(page("events.md"), "Envelope"))),
                            "events.md")
    assert not problems, "\n".join(problems)


def test_every_route_is_on_the_http_page_with_the_statuses_the_openapi_document_gives(app):
    documented = {name: body for name, body in sections(page("http-api.md"), level=3).items()
                  if name.split(" ")[0] in METHODS}
    served = app_routes(app)
    document = app.openapi()
    in_document = {f"{method.upper()} {path}": operation
                   for path, operations in document["paths"].items() for method, operation in operations.items()}
    assert len(in_document) >= 40 and set(in_document) <= served
    problems = differences("route", served, set(documented), "http-api.md")
    for route in sorted(set(in_document) & set(documented)):
        problems += differences(f"status of {route}:", set(in_document[route]["responses"]),
                                listed_statuses(documented[route]), "http-api.md")
    assert not problems, "\n".join(problems)


def test_every_route_documents_its_answers_and_no_error_is_fastapis_own(app):
    """Every error answer names a shape of the document (`Error`, or a route's own, such as a
    denied lease's), never FastAPI's validation body; every route documents a success."""
    document = app.openapi()
    shapes = {response["content"]["application/json"]["schema"].get("$ref")
              for operations in document["paths"].values() for operation in operations.values()
              for status, response in operation["responses"].items()
              if status >= "400" and "application/json" in response.get("content", {})}
    assert "#/components/schemas/Error" in shapes and None not in shapes, shapes
    assert all(ref.rsplit("/", 1)[-1] in document["components"]["schemas"] for ref in shapes), shapes
    assert "HTTPValidationError" not in document["components"]["schemas"]
    unanswered = [f"{method.upper()} {path}" for path, operations in document["paths"].items()
                  for method, operation in operations.items()
                  if not any(s < "400" and (r.get("content") or s in ("204", "303")) for s, r in operation["responses"].items())]
    assert not unanswered, f"routes with no documented answer: {unanswered}"


def test_every_cli_command_and_option_is_on_the_cli_page():
    in_code = cli_commands()
    documented = {name: body for name, body in sections(part(page("cli.md"), "Commands"), level=3).items()}
    assert len(in_code) >= 20
    problems = differences("command", set(in_code), set(documented), "cli.md")
    for command in sorted(set(in_code) & set(documented)):
        problems += differences(f"option of {command}:", in_code[command], set(rows(documented[command])), "cli.md")
    assert not problems, "\n".join(problems)


def test_every_catalog_key_is_on_the_catalog_page():
    in_code = catalog_keys()
    assert {"default_plan", "plans", "unit_nanos", "expires_after_days", "low_balance_micros", "pro_plus"} <= in_code
    assert not (problems := differences("catalog key", in_code, set(rows(page("catalog.md"), unique=False)),
                                          "catalog.md")), \
        "\n".join(problems)


def test_the_reference_pages_link_only_to_files_that_exist():
    broken = []
    for path in sorted(REFERENCE.glob("*.md")):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target and not (path.parent / target).resolve().exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)


def test_the_readers_see_what_they_should():
    """The page readers themselves: names in backticks in first cells and headings count,
    prose and other cells do not; statuses come from a route's Answers and Errors only."""
    text = ("## Part\n\nProse with `not_a_row` in it.\n\n| Name | Meaning |\n|---|---|\n"
            "| `--url URL` | where; see `--other` |\n| plain | no backticks |\n\n"
            "### `GET /x`\n\nSays `500` in prose.\n\n- **Answers:** `200` the thing;\n  `204` when none.\n"
            "- **Errors:** `401`, `429`.\n- Not a status list: `503`.\n\n### `POST /y`\n\n| `field` | x |\n")
    assert set(rows(text)) == {"--url", "field"}
    routes = sections(text, level=3)
    assert set(routes) == {"GET /x", "POST /y"}
    assert listed_statuses(routes["GET /x"]) == {"200", "204", "401", "429"}
    assert set(rows(routes["POST /y"])) == {"field"}
    assert "## Part" not in part(text, "Part") and "`--url URL`" in part(text, "Part")


def test_every_reference_in_the_openapi_document_resolves_inside_it(app):
    """ReDoc refuses the whole document over one `$ref` it cannot follow (a nested body's
    `#/$defs/...` broke the docs page once)."""
    document = app.openapi()

    def refs(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    def resolves(ref: str) -> bool:
        if not ref.startswith("#/"):
            return False
        node = document
        for token in ref[2:].split("/"):
            if not isinstance(node, dict) or token not in node:
                return False
            node = node[token]
        return True

    broken = sorted({ref for ref in refs(document) if not resolves(ref)})
    assert not broken, broken
