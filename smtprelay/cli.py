"""The ``smtprelay`` console script: check-config, hash-password, version.

``smtprelay check-config PATH`` exits 0 when the configuration is usable and
otherwise prints one line per problem (naming the key) and exits 2.
``smtprelay hash-password`` reads a password (twice from a terminal, once
from a pipe) and prints the hash to paste into ``[smtp.auth] users``.
"""

import argparse
import getpass
import sys

from smtprelay import __version__


def _check_config(args):
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="smtprelay", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"smtprelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("path")
    p.set_defaults(run=_check_config)
    p = sub.add_parser("hash-password", help="hash a password for [smtp.auth] users")
    p.set_defaults(run=_hash_password)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
