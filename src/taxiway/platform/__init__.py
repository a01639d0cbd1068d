"""The platform: the control plane that turns the parts into one product (issue #16 onwards).

    taxiway CLI --HTTP--> api (Starlette) --KV, streams--> nats-server (JetStream) <--> agent (one per host)
                                                                                    |  its own SQLite record
                                                                                    v
                                                                     taxiway.machines (namespace / micro-VM)

Modules (one job each; policy is pure, I/O at the edges):

- ``schema``     names and shapes every module agrees on: buckets, subjects, keys, states, records.
- ``nats``       run and supervise a loopback nats-server with JetStream under $TAXIWAY_HOME.
- ``state``      the KV buckets and streams over nats-py: get/put with compare-and-set, watch, publish.
- ``tokens``     org bearer tokens with scopes (org admin, per-app deploy, read-only), stored hashed.
- ``api``        the Machines-style HTTP API (the only writer of desired state); auth is middleware.
- ``client``     the API's HTTP client (httpx), used by the CLI and by deploys.
- ``agent``      the host agent: SQLite record, reconcile, run machines, checks, logs, adopt on restart.
- ``checks``     HTTP and TCP health checks (grace period, interval, timeout).
- ``appconfig``  taxiway.toml (fly.toml's keys) parsing and validation, errors name file, line and key.
- ``strategy``   deploy planners (rolling, bluegreen, canary, immediate): pure, releases and states in, steps out.
- ``secrets``    secrets sealed with an AEAD key (0600 key file); names and digests only ever leave.
- ``deploy``     build, push, record a release, run release_command, replace machines by the planner.
- ``edge``       the HTTP edge: routes app names to started, healthy machines; drains before stop.
- ``balance``    the edge's pure core: routable machines from the KV, least-connections choice.
- ``edgehttp``   the edge's sans-I/O HTTP beyond egress.http: the head a machine gets, fast head parsing.
- ``edgetls``    the edge's HTTPS listener: ClientHello peeked (pure), certificates on first use, force_https.
- ``edgeh2``     HTTP/2 over TLS (the h2 library): each stream one HTTP/1.1 request through the edge.
- ``acme``       ACME (RFC 8555) certificates for custom hostnames: http-01 and tls-alpn-01, answered by the edge.
- ``supervisor`` ``taxiway up`` / ``taxiway down``: starts and watches nats, api, agent, registry, egress, edge.
"""
