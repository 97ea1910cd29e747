"""The ``smtprelay`` console script: check-config, hash-password, migrate-store, version.

``smtprelay check-config PATH`` exits 0 when the configuration is usable and
otherwise prints one line per problem (naming the key) and exits 2.
``smtprelay hash-password`` reads a password (twice from a terminal, once
from a pipe) and prints the hash to paste into ``[smtp.auth] users``.
``smtprelay migrate-store --from URL --to URL [--force]`` copies the queue
and the delivery log between SQLite and PostgreSQL (``store/transfer.py``)
and prints what it copied; it exits 1 with one line when it cannot.
"""

import argparse
import getpass
import sys

from smtprelay import __version__


def _check_config(args: argparse.Namespace) -> int:
    from smtprelay import config as configuration

    try:
        cfg = configuration.load(args.path)
    except configuration.ConfigError as e:
        for line in e.lines():
            print(line, file=sys.stderr)
        return 2
    listen = ", ".join(str(a) for a in cfg.smtp.listen + cfg.smtp.tls_listen)
    print(f"{args.path}: ok (provider {cfg.provider.type}, SMTP on {listen}, "
          f"database {cfg.database.kind}, delivery {cfg.delivery.mode})")
    return 0


def _hash_password(args):
    from smtprelay.passwords import hash_password

    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            print("the passwords differ", file=sys.stderr)
            return 1
        password = first
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("an empty password cannot be used", file=sys.stderr)
        return 1
    print(hash_password(password.encode("utf-8")))
    return 0


def _migrate_store(args):
    from smtprelay.store import transfer

    def warn(line):
        print(line, file=sys.stderr)

    try:
        counts = transfer.transfer(args.source, args.destination, force=args.force, warn=warn)
    except transfer.TransferError as e:
        print(f"migrate-store: {e}", file=sys.stderr)
        return 1
    print(transfer.summary(counts, args.source, args.destination))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="smtprelay", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"smtprelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("path")
    p.set_defaults(run=_check_config)
    p = sub.add_parser("hash-password", help="hash a password for [smtp.auth] users")
    p.set_defaults(run=_hash_password)
    p = sub.add_parser(
        "migrate-store", help="copy the queue and delivery log to another database",
        description="Copy messages (envelopes, recipients, bodies), attempts and mailbox "
                    "back-offs from one store to another, SQLite or PostgreSQL, in one "
                    "transaction. Stop the relays on the source first.")
    p.add_argument("--from", dest="source", required=True, metavar="URL",
                   help='the store to copy: "sqlite:///path" or "postgresql://..."')
    p.add_argument("--to", dest="destination", required=True, metavar="URL",
                   help="the store to copy into (created or migrated as needed)")
    p.add_argument("--force", action="store_true",
                   help="copy into a store that already holds messages: those already "
                        "there (same id) are skipped")
    p.set_defaults(run=_migrate_store)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
