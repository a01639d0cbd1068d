"""``taxiway ca``: the certificate authority commands.

Only click and the pure name rules are imported at module level; cryptography
is imported inside the commands, so ``taxiway ca --help`` stays fast and
``taxiway ca issue`` rejects bad names before paying for it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from taxiway.cli.main import exit_now
from taxiway.errors import InvalidInput, TaxiwayError


def _say(msg: str) -> None:
    click.echo(msg, err=True)


@click.group()
def ca() -> None:
    """The certificate authority: init, issue, renew, revoke.

    The CA lives in $TAXIWAY_CAROOT (default $TAXIWAY_HOME/ca): a root (10
    years, path length 1) and an online intermediate that signs leaves.
    """


@ca.command()
@click.option("--ecdsa", "key", flag_value="ecdsa", default=True, help="ECDSA P-256 keys (the default).")
@click.option("--rsa", "rsa_bits", type=click.Choice(["2048", "3072", "4096"]), default=None,
              help="RSA keys of this size for the root and intermediate (e.g. --rsa 3072).")
@click.option("--name-constraint", "constraints", multiple=True, metavar="DOMAIN|CIDR",
              help="Only allow names under DOMAIN (or addresses in CIDR); repeatable. Enforced by TLS clients.")
def init(key: str, rsa_bits: str | None, constraints: tuple[str, ...]) -> None:
    """Create the CA: a root and an intermediate (idempotent)."""
    from taxiway.pki.names import parse_constraint

    cons = [parse_constraint(c) for c in constraints]
    from taxiway.pki.ca import CA, ROOT_KEY

    explicit = click.get_current_context().get_parameter_source("key") == click.core.ParameterSource.COMMANDLINE
    key_type = f"rsa-{rsa_bits}" if rsa_bits else "ecdsa-p256"
    # an existing CA with other settings is an error; options left out are not compared
    the_ca, created = CA.init(None, key_type=key_type if rsa_bits or explicit else None, constraints=cons)
    if not created:
        _say(f"A CA already exists in {the_ca.dir}; nothing changed.")
        return
    _say(f"Created a CA in {the_ca.dir} ({key_type}), root valid until "
         f"{the_ca.root.not_valid_after_utc:%Y-%m-%d}.")
    if cons:
        _say("Name constraints: " + ", ".join(c.value for c in cons))
    _say(f"Leaves are signed by the intermediate; the root key {the_ca.dir / ROOT_KEY} can be moved offline.")
    _say("Run `taxiway ca install` to trust it on this machine.")


@ca.command()
@click.option("--pem", is_flag=True, help="Print the root certificate instead of the directory.")
def root(pem: bool) -> None:
    """Print the CA directory (or, with --pem, the root certificate)."""
    from taxiway.pki.layout import default_dir

    if not pem:
        click.echo(str(default_dir()))
        return
    the_ca = _load()
    the_ca.root  # noqa: B018 - refuse to print a damaged root
    sys.stdout.write(the_ca.root_pem.decode())


def _load():
    """The CA, with its warnings (an open CA directory, a bad inventory line) printed on stderr."""
    from taxiway.pki.ca import CA

    return CA.load(warn=lambda msg: _say(f"warning: {msg}"))


def _targets(targets) -> None:
    for t in targets:
        state = "added" if t.changed else "already there"
        _say(f"{t.kind}: {t.location} ({state})")


@ca.command()
@click.option("--no-system", is_flag=True, help="Leave the system trust store alone.")
@click.option("--no-nss", is_flag=True, help="Leave NSS databases (browsers) alone.")
def install(no_system: bool, no_nss: bool) -> None:
    """Trust the root system-wide and in NSS databases (Chromium, Firefox).

    $TAXIWAY_TRUST_SYSROOT points the system store at another root directory;
    $TAXIWAY_NSS_DBS lists NSS database directories (colon-separated).
    """
    from taxiway.pki import trust

    the_ca = _load()
    the_ca.root  # noqa: B018 - never install a damaged root
    _targets(trust.install(the_ca.root_pem, system=not no_system, nss=not no_nss))


@ca.command()
@click.option("--no-system", is_flag=True, help="Leave the system trust store alone.")
@click.option("--no-nss", is_flag=True, help="Leave NSS databases (browsers) alone.")
def uninstall(no_system: bool, no_nss: bool) -> None:
    """Remove the root from the system trust store and NSS databases."""
    from taxiway.pki import trust

    the_ca = _load()
    the_ca.root  # noqa: B018 - a damaged root cannot be found in the stores
    for t in trust.uninstall(the_ca.root_pem, system=not no_system, nss=not no_nss):
        _say(f"{t.kind}: {t.location} ({'removed' if t.changed else 'was not there'})")


@ca.command()
@click.argument("names", nargs=-1)
@click.option("--client", is_flag=True, help="A client certificate (EKU clientAuth) for mutual TLS.")
@click.option("--cn", default=None, help="Subject common name (mTLS servers often map it to a role).")
@click.option("--days", type=click.IntRange(min=1), default=None, help="Valid for N days (default 2 years 3 months).")
@click.option("--hours", type=click.IntRange(min=1), default=None, help="Valid for N hours.")
@click.option("--cert-file", type=click.Path(dir_okay=False), help="Where to write the chain (leaf + intermediate).")
@click.option("--key-file", type=click.Path(dir_okay=False), help="Where to write the private key (0600).")
@click.option("--p12-file", type=click.Path(dir_okay=False), help="Also write a PKCS#12 bundle (0600).")
@click.option("--p12-password", default="changeit", show_default=True, help="Password of the PKCS#12 bundle.")
@click.option("--csr", "csr_file", type=click.Path(dir_okay=False), help="Sign this CSR (PEM or DER) instead of making a key.")
@click.option("--ecdsa", "key", flag_value="ecdsa-p256", default=True, help="ECDSA P-256 key (the default).")
@click.option("--rsa", "key", flag_value="rsa-2048", help="RSA 2048 key (mkcert's default).")
@click.option("--force", is_flag=True, help="Overwrite an existing key or PKCS#12 file.")
@click.option("--json", "as_json", is_flag=True, help="Print what was issued as JSON.")
def issue(names: tuple[str, ...], client: bool, cn: str | None, days: int | None, hours: int | None,
          cert_file: str | None, key_file: str | None, p12_file: str | None, p12_password: str,
          csr_file: str | None, key: str, force: bool, as_json: bool) -> None:
    """Issue a certificate for NAMES: host names, *.wildcards, IPs, emails, URIs.

    Writes NAME.pem (the chain) and NAME-key.pem in the current directory, as
    mkcert does, unless --cert-file/--key-file say otherwise.
    """
    from taxiway.pki.names import file_stem, parse_names

    parsed = parse_names(names)
    if days is not None and hours is not None:
        raise InvalidInput("--days and --hours both given", "pick one")
    if not len(parsed) and not csr_file and not (client and cn):
        raise InvalidInput("no names given", "name the hosts, IPs, emails or URIs: `taxiway ca issue example.test`")
    if (days or 0) > _MAX_DAYS or (hours or 0) > _MAX_DAYS * 24:
        raise InvalidInput(f"--{'days' if days else 'hours'} {days or hours} is longer than any certificate this CA "
                           "can sign (its intermediate lasts 10 years)", "ask for a shorter validity")
    csr_data = None
    if csr_file:
        from taxiway.fsutil import MAX_INPUT, FileProblem, read_regular

        try:
            csr_data = read_regular(csr_file, MAX_INPUT)
        except FileProblem as e:
            raise InvalidInput(f"the CSR {csr_file} {e}", "give a PEM or DER certificate signing request file") from None
        except OSError as e:
            raise TaxiwayError(f"cannot read the CSR {csr_file}: {e.strerror}", "check the path and its permissions") from None
        if not csr_data.strip():
            raise InvalidInput(f"the CSR {csr_file} is empty", "give a PEM or DER certificate signing request")
    stem = file_stem(parsed, client) if len(parsed) else (Path(csr_file).stem if csr_file else (cn or "client").replace("/", "_"))
    cert_file = cert_file or f"./{stem}.pem"
    if not csr_file:
        key_file = key_file or f"./{stem}-key.pem"
    elif key_file or p12_file:
        raise InvalidInput("--key-file or --p12-file with --csr", "the key stays with whoever made the CSR")
    from taxiway.pki.ca import distinct_outputs

    distinct_outputs([cert_file, key_file, p12_file])  # before "already exists": F and F are one file
    for f in (key_file, p12_file):  # checked again under the CA's lock when the files are written
        if f and not force and os.path.lexists(f):
            from taxiway.pki.ca import already_issued

            raise already_issued(f, parsed.values())

    from datetime import timedelta

    validity = timedelta(days=days) if days else timedelta(hours=hours) if hours else None
    the_ca = _load()
    if csr_data is not None:
        leaf = the_ca.issue_csr(csr_data, parsed.values(), client=client, cn=cn, validity=validity, record=False)
    else:
        leaf = the_ca.issue(parsed, client=client, cn=cn, validity=validity, key_type=key, record=False)
    # key, chain and PKCS#12 as one unit, under the CA's lock: of parallel issues to the same files one wins
    the_ca.save(leaf, cert_file, key_file, p12_file=p12_file, p12_password=p12_password, force=force,
                validity=validity, csr=csr_data is not None)
    if as_json:
        from taxiway.cli.output import emit_json

        emit_json({"serial": leaf.serial_hex, "names": leaf.names, "cn": leaf.cn, "client": leaf.client,
                   "not_before": leaf.not_before.isoformat(), "not_after": leaf.not_after.isoformat(),
                   "cert_file": str(Path(cert_file).resolve()),
                   "key_file": str(Path(key_file).resolve()) if key_file else None,
                   "p12_file": str(Path(p12_file).resolve()) if p12_file else None})
        exit_now(0, "issue")
        return
    what = ", ".join(leaf.names) or f"CN={leaf.cn}"
    _say(f"Issued {_kind(client, leaf.names)} certificate for {what}")
    _say(f"  chain: {cert_file}")
    if key_file:
        _say(f"  key:   {key_file}")
    if p12_file:
        _say(f"  p12:   {p12_file} (password {p12_password!r})")
    _say(f"  serial {leaf.serial_hex}, expires {leaf.not_after:%Y-%m-%d %H:%M} UTC")
    exit_now(0, "issue")


_MAX_DAYS = 36600  # more than the intermediate's 10 years; beyond it, dates overflow


def _kind(client: bool, names: list[str]) -> str:
    """What a certificate is for, from its EKUs: a server, client, or email (S/MIME) certificate."""
    from taxiway.pki.names import parse_names

    parsed = parse_names(names)
    kinds = (["server"] if parsed.server_names else []) + (["client"] if client else []) + \
        (["email"] if parsed.email else [])
    return ("an " if kinds[0] == "email" else "a ") + " and ".join(kinds) if kinds else "a"


@ca.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the inventory as JSON (includes the PEMs).")
@click.option("--all", "show_all", is_flag=True, help="Also show renewed certificates.")
def ls(as_json: bool, show_all: bool) -> None:
    """List issued certificates with their expiry and status."""
    from taxiway.pki.duration import format_duration
    from taxiway.pki.profile import now

    at = now()
    the_ca = _load()
    recs = [r for r in the_ca.records() if show_all or as_json or not r.renewed_by]
    for rec, problem in the_ca.broken():  # a crash between renames: say so, renew repairs it
        _say(f"warning: {rec.serial} ({', '.join(rec.names) or rec.cn}): {problem}; `taxiway ca renew` re-issues it")
    if as_json:
        from taxiway.cli.output import emit_json

        emit_json([r.to_json(at) for r in recs])
        return
    from datetime import datetime

    from taxiway.cli.output import table

    rows = [{"serial": r.serial, "names": ",".join(r.names) or f"CN={r.cn}",
             "kind": _kind(r.client, r.names).split(" ", 1)[1].replace(" and ", "+"), "expires": r.not_after[:16].replace("T", " "),
             "left": format_duration(datetime.fromisoformat(r.not_after) - at), "status": r.status(at),
             "file": r.cert_file or ""} for r in recs]
    table(rows, ["serial", "names", "kind", "expires", "left", "status", "file"])


@ca.command()
@click.option("--before", default="30d", show_default=True, help="Renew what expires within this long (30d, 12h).")
@click.option("--exec", "command", default=None, help="Shell command to run after renewing (e.g. a reload).")
@click.option("--dry-run", is_flag=True, help="Only list what would be renewed.")
def renew(before: str, command: str | None, dry_run: bool) -> None:
    """Re-issue certificates that expire soon, into the same files.

    Also rewrites the CA's crl.pem (its nextUpdate is 7 days away), so one
    daily `taxiway ca renew --exec ...` timer keeps certificates and CRL current.
    """
    from taxiway.pki.duration import parse_duration
    from taxiway.pki.profile import instant

    # certificates issued after this (by a concurrent run) are not renewed again; to the
    # microsecond, so one issued earlier in the same second is still renewed
    started = instant()
    window = parse_duration(before)
    the_ca = _load()
    if dry_run:
        due = the_ca.due(window)
        for rec in due:
            _say(f"would renew {rec.serial} ({', '.join(rec.names)}) expiring {rec.not_after[:16]}")
        for rec, problem in the_ca.broken():
            _say(f"would repair {rec.serial} ({', '.join(rec.names)}): {problem}")
        if not due and not the_ca.broken():
            _say(f"Nothing expires within {before}.")
        return

    def said(rec, leaf) -> None:
        _say(f"renewed {rec.serial} -> {leaf.serial_hex} ({', '.join(leaf.names) or leaf.cn}) into {rec.cert_file}")

    # under the CA's lock, deciding what is due once it has it: parallel runs renew each certificate once
    if not the_ca.renew_due(window, on_renewed=said, started=started):
        _say(f"Nothing expires within {before}.")
        return
    if command:
        import subprocess

        p = subprocess.run(command, shell=True)
        if p.returncode != 0:
            raise TaxiwayError(f"--exec command exited with {p.returncode}", "the certificates were renewed; fix the command and run it by hand")


@ca.command()
@click.argument("serial")
def revoke(serial: str) -> None:
    """Revoke a certificate by SERIAL (hex, a unique prefix will do) and rewrite the CRL."""
    from taxiway.pki.ca import CRL

    the_ca = _load()
    rec, new = the_ca.revoke(serial)
    if new:
        _say(f"Revoked {rec.serial} ({', '.join(rec.names) or rec.cn}); CRL: {the_ca.dir / CRL}")
    else:
        _say(f"{rec.serial} was already revoked (at {rec.revoked_at}); CRL: {the_ca.dir / CRL}")


@ca.command()
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None, help="Write the CRL here instead of stdout.")
@click.option("--days", type=click.IntRange(min=1), default=7, show_default=True, help="Days until the CRL's nextUpdate.")
def crl(out: str | None, days: int) -> None:
    """Print a fresh CRL (PEM) signed by the intermediate; also saved as crl.pem in the CA."""
    from datetime import timedelta

    from taxiway.fsutil import write_bytes_atomic

    the_ca = _load()
    if out:
        the_ca.check_outputs([out])
    path = the_ca.write_crl(timedelta(days=min(days, _MAX_DAYS)))  # clamped to the intermediate's expiry
    data = path.read_bytes()
    if out:
        try:
            write_bytes_atomic(out, data)
        except OSError as e:
            raise TaxiwayError(f"cannot write {out}: {e.strerror or e}", "check the path and its permissions") from None
        _say(f"CRL written to {out}")
    else:
        sys.stdout.write(data.decode())
