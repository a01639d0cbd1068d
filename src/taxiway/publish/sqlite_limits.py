"""A Datasette plugin copied into every published app: caps the size of any string or blob SQLite makes.

Without it one anonymous query (``printf('%.*c', 300000000, 'x')``) makes
hundreds of megabytes per value and holds the server for tens of seconds,
since the time limit is only checked between SQLite's steps. With it such a
query fails at once with "string or blob too big". The same cap applies to
values read from the database, so larger values cannot be served.
"""

import os
import sqlite3

from datasette import hookimpl

#: SQLITE_LIMIT_LENGTH for every connection (SQLite's default is 1 GB).
MAX_LENGTH = int(os.environ.get("TAXIWAY_SQL_MAX_LENGTH", 64 << 20))


@hookimpl
def prepare_connection(conn):
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_LENGTH)
