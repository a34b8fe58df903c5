"""``cosigner`` — serve | rules check|explain | actions list|show|approve|reject | keys | doctor."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from gateway import cli_actions, cli_keys, doctor
from gateway.rules import BudgetUsage, RuleRequest, RulesError, RuleSet, check_rules, load_rules
from gateway.settings import Settings


def _settings(config: str | None = None) -> Settings:
    if config:
        import tomllib

        with open(config, "rb") as f:
            data = tomllib.load(f)
        for name, value in data.items():
            os.environ.setdefault(f"COSIGNER_{name.upper()}", str(value))
    try:
        return Settings()
    except ValidationError as exc:
        lines = [
            f"  COSIGNER_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        ]
        raise SystemExit("Invalid settings:\n" + "\n".join(lines)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gateway until SIGTERM/SIGINT."""
    from aiohttp import web

    from gateway.app import create_app
    from gateway.logs import configure_logging
    from gateway.runtime import new_event_loop, settle_runtime

    settings = _settings(args.config)
    configure_logging(settings.log_level, settings.log_format)
    try:
        app = create_app(settings)
    except RulesError as exc:
        print(f"cosigner: invalid rules in {settings.rules}:\n{exc}", file=sys.stderr)
        return 2
    # A log record, not a print: with COSIGNER_LOG_FORMAT=json every line is JSON.
    logging.getLogger("cosigner").info(
        "listening on http://%s → %s (rules: %s, database: %s)",
        settings.listen,
        settings.upstream,
        settings.rules,
        settings.database_display,
    )
    app.on_startup.append(settle_runtime)  # last: after every cleanup_ctx has run
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        shutdown_timeout=settings.shutdown_grace,
        loop=new_event_loop(settings.event_loop),
    )
    return 0


def cmd_rules_check(args: argparse.Namespace) -> int:
    """Validate a rules folder; exit 1 naming every problem."""
    directory = Path(args.dir) if args.dir else _settings().rules
    problems = check_rules(directory)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{len(problems)} problem(s) in {directory}", file=sys.stderr)
        return 1
    rules = load_rules(directory)
    print(f"{directory}: OK ({len(rules.rules)} rules)")
    return 0


def _pairs(items: Sequence[str], sep: str, what: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, found, value = item.partition(sep)
        if not found:
            raise SystemExit(f"cosigner: {what} must look like key{sep}value, not {item!r}")
        out.append((key.strip(), value.strip() if sep == ":" else value))
    return out


def cmd_rules_explain(args: argparse.Namespace) -> int:
    """Print which rule decides a request, and why each earlier rule did not."""
    from gateway.canonical import build_params, normalise_path

    directory = Path(args.rules) if args.rules else _settings().rules
    try:
        rules = load_rules(directory)
    except RulesError as exc:
        print(exc, file=sys.stderr)
        return 1
    headers = dict(_pairs(args.header or [], ":", "-H"))
    path, _, query = args.path.partition("?")
    params = build_params(_pairs(args.data or [], "=", "-d"))
    if query:
        from gateway.canonical import parse_pairs

        params = build_params(parse_pairs(query), into=params)
    request = RuleRequest(
        method=args.method.upper(),
        path=normalise_path(path),
        params=params,
        agent=args.agent or "",
        account=headers.get("Stripe-Account"),
    )
    usage, note = _budget_usage(rules, request.agent)
    print(rules.explain(request, usage).render())
    if note:
        print(f"   ({note})")
    from gateway.resolve import target_of

    target = target_of(request.method, request.path, request.params)
    if target is not None and target.money is not None and params.get("amount") is None:
        print(
            f"   note: without amount, the gateway reads {target.source} first and the rules"
            " see the amount Stripe would act on; try -d amount=N"
        )
    return 0


def _budget_usage(rules: RuleSet, agent: str) -> tuple[dict[str, BudgetUsage], str]:
    """Budget usage from the configured database; unused (and said so) if it can't be read."""
    import asyncio
    import time

    from gateway.budgets import usage_from_database

    if not rules.budgeted_rules():
        return {}, ""
    settings = _settings()
    try:
        return asyncio.run(usage_from_database(settings.database, rules, agent, time.time()))
    except Exception as exc:  # explain still answers, offline
        where = settings.database_display
        return {}, f"could not read budget usage from {where} ({exc}): budgets shown unused"


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="cosigner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="TOML file of settings (names without COSIGNER_)")
    serve.set_defaults(func=cmd_serve)

    rules = sub.add_parser("rules", help="check or explain rule files")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate a rules folder")
    check.add_argument("dir", nargs="?", help="folder (default: COSIGNER_RULES)")
    check.set_defaults(func=cmd_rules_check)
    explain = rules_sub.add_parser("explain", help="which rule decides a request, and why")
    explain.add_argument("method")
    explain.add_argument("path")
    explain.add_argument("-d", "--data", action="append", help="parameter key=value")
    explain.add_argument("-H", "--header", action="append", help="header 'Name: value'")
    explain.add_argument("--agent", help="agent name")
    explain.add_argument("--rules", help="folder (default: COSIGNER_RULES)")
    explain.set_defaults(func=cmd_rules_explain)

    cli_actions.register(sub, _settings)
    cli_keys.register(sub, _settings)
    doctor.register(sub, _settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cosigner`` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except RulesError as exc:
        print(exc, file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
