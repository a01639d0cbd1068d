"""The HTTP/1.1 keep-alive load generator shared by bench/edge.py and bench/egress.py.

A small Go program (stdlib only, built here offline into a temp dir) rather than a Python
client: at 500 connections a Python client measures itself, not the server. It opens C
connections, sends one warm-up request on each (so every path is measured in its steady
state: accepted, upstream connection open), then keep-alive ``GET path`` on all of them for
a fixed time, and prints one JSON object: requests, rps, p50_ms, p99_ms, errors,
first_error, connections_held, min_per_conn, max_per_conn.

Modes: ``direct`` dials the target; ``connect`` dials the proxy and opens a CONNECT tunnel
to the target; ``http`` dials the proxy and sends absolute-form requests. ``host`` overrides
the Host header (the edge routes by it; nothing is resolved). With ``reconnect`` a failed
request is counted and the connection dialled again (the edge's rolling-deploy run counts
failures while machines come and go); without it the connection stops at its first error.

    from _loadgen import build, run
    loadgen = build(tmpdir)
    r = run(loadgen, target="127.0.0.1:8080", conns=50, seconds=3)
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

LOADGEN_GO = r'''
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

func readResponse(r *bufio.Reader) (int, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return 0, err
	}
	parts := strings.SplitN(line, " ", 3)
	if len(parts) < 2 {
		return 0, fmt.Errorf("bad status line %q", line)
	}
	status, _ := strconv.Atoi(parts[1])
	length := -1
	for {
		h, err := r.ReadString('\n')
		if err != nil {
			return 0, err
		}
		if h == "\r\n" {
			break
		}
		if i := strings.IndexByte(h, ':'); i > 0 && strings.EqualFold(h[:i], "content-length") {
			length, _ = strconv.Atoi(strings.TrimSpace(h[i+1:]))
		}
	}
	if length > 0 {
		if _, err := io.CopyN(io.Discard, r, int64(length)); err != nil {
			return 0, err
		}
	}
	return status, nil
}

func main() {
	mode := flag.String("mode", "direct", "direct, connect or http")
	proxy := flag.String("proxy", "", "proxy host:port (connect and http modes)")
	target := flag.String("target", "", "upstream host:port")
	host := flag.String("host", "", "Host header (default: the target)")
	path := flag.String("path", "/small", "")
	conns := flag.Int("c", 1, "connections")
	seconds := flag.Float64("d", 3, "seconds")
	maxPerConn := flag.Int("n", 2000000, "max requests per connection")
	reconnect := flag.Bool("reconnect", false, "dial again after a failed request instead of stopping")
	flag.Parse()

	hostHeader := *host
	if hostHeader == "" {
		hostHeader = *target
	}
	addr := *target
	if *mode != "direct" {
		addr = *proxy
	}
	p := *path
	if *mode == "http" {
		p = "http://" + *target + *path
	}
	req := []byte(fmt.Sprintf("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", p, hostHeader))

	lats := make([][]time.Duration, *conns)
	errs := make([]int, *conns)
	ready := make([]bool, *conns)
	var setup, wg sync.WaitGroup
	start := make(chan struct{})
	var end time.Time
	var firstErr string
	var mu sync.Mutex
	fail := func(i int, e string) {
		errs[i]++
		mu.Lock()
		if firstErr == "" {
			firstErr = e
		}
		mu.Unlock()
	}
	for i := 0; i < *conns; i++ {
		setup.Add(1)
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			var c net.Conn
			var r *bufio.Reader
			open := func() error {
				var err error
				c, err = net.DialTimeout("tcp", addr, 10*time.Second)
				if err != nil {
					return err
				}
				r = bufio.NewReaderSize(c, 65536)
				if *mode == "connect" {
					fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", *target, *target)
					st, err := readResponse(r)
					if err != nil || st != 200 {
						c.Close()
						return fmt.Errorf("CONNECT: %d %v", st, err)
					}
				}
				return nil
			}
			if err := open(); err != nil {
				fail(i, err.Error())
				setup.Done()
				return
			}
			if _, err := c.Write(req); err != nil {
				fail(i, "warm-up: "+err.Error())
				c.Close()
				setup.Done()
				return
			}
			if st, err := readResponse(r); err != nil || st != 200 {
				fail(i, fmt.Sprintf("warm-up: %d %v", st, err))
				c.Close()
				setup.Done()
				return
			}
			ready[i] = true
			setup.Done()
			<-start
			out := make([]time.Duration, 0, 4096)
			// A failed request either ends this connection or, with -reconnect, dials again.
			retry := func(e string) bool {
				fail(i, e)
				c.Close()
				c = nil
				return *reconnect && open() == nil
			}
			for n := 0; n < *maxPerConn && time.Now().Before(end); n++ {
				t0 := time.Now()
				if _, err := c.Write(req); err != nil {
					if !retry(err.Error()) {
						break
					}
					continue
				}
				st, err := readResponse(r)
				if err != nil || st != 200 {
					if !retry(fmt.Sprintf("%d %v", st, err)) {
						break
					}
					continue
				}
				out = append(out, time.Since(t0))
			}
			if c != nil {
				c.Close()
			}
			lats[i] = out
		}(i)
	}
	setup.Wait()
	t0 := time.Now()
	end = t0.Add(time.Duration(*seconds * float64(time.Second)))
	close(start)
	wg.Wait()
	elapsed := time.Since(t0).Seconds()
	var all []time.Duration
	nerr, held := 0, 0
	minPer, maxPer := -1, 0
	for i := range lats {
		all = append(all, lats[i]...)
		if ready[i] && (minPer < 0 || len(lats[i]) < minPer) {
			minPer = len(lats[i])
		}
		if len(lats[i]) > maxPer {
			maxPer = len(lats[i])
		}
		nerr += errs[i]
		if ready[i] {
			held++
		}
	}
	sort.Slice(all, func(a, b int) bool { return all[a] < all[b] })
	pct := func(p float64) float64 {
		if len(all) == 0 {
			return 0
		}
		return float64(all[int(p*float64(len(all)-1))].Microseconds()) / 1000
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{
		"requests": len(all), "rps": float64(len(all)) / elapsed, "p50_ms": pct(0.50),
		"p99_ms": pct(0.99), "errors": nerr, "first_error": firstErr, "connections_held": held,
		"min_per_conn": minPer, "max_per_conn": maxPer,
	})
}
'''


def go_build(d: Path, name: str, source: str) -> Path:
    """Build the one-file, stdlib-only Go program ``source`` as ``d/name/name``, offline.

    No module proxy and no toolchain download (GOPROXY=off, GOTOOLCHAIN=local), caches
    under ``d``: the benchmarks' Go helpers (this load generator, bench/_wsecho.py) are
    built this one way.
    """
    src = d / name
    src.mkdir()
    (src / "main.go").write_text(source)
    (src / "go.mod").write_text(f"module {name}\n\ngo 1.19\n")
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOCACHE": str(d / "gocache"), "GOPATH": str(d / "gopath"),
           "GOPROXY": "off", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
    subprocess.run(["go", "build", "-o", str(src / name), "."], cwd=src, env=env, check=True)
    return src / name


def build(d: Path) -> Path:
    """Build the load generator under ``d``."""
    return go_build(d, "loadgen", LOADGEN_GO)


def run(loadgen: Path, *, target: str, conns: int, seconds: float, mode: str = "direct",
        proxy: str | None = None, host: str | None = None, path: str = "/small",
        reconnect: bool = False) -> dict:
    """One load run; returns the generator's JSON result (see the module docstring)."""
    argv = [str(loadgen), "-mode", mode, "-target", target, "-path", path, "-c", str(conns), "-d", str(seconds)]
    if proxy:
        argv += ["-proxy", proxy]
    if host:
        argv += ["-host", host]
    if reconnect:
        argv.append("-reconnect")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    if r.returncode != 0:
        raise RuntimeError(f"loadgen failed: {r.stderr.strip()}")
    return json.loads(r.stdout)
