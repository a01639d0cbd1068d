"""WebSocket echo for bench/edge.py: a Go echo server (the machine) and a Go ping-pong client.

Both are stdlib-only Go, built offline into a temp dir (as bench/_loadgen.py). The server
answers the upgrade (RFC 6455 accept key) and then echoes every byte back; the client opens
C WebSockets through a proxy (Host header set, nothing resolved), then on each sends a 128-byte
masked text frame and waits for its echo, for a fixed time, and prints one JSON object:
messages, per_s (round trips per second), p50_ms, p99_ms, errors, first_error. The echo is
byte for byte (a masked frame comes back masked): the proxies relay bytes after the 101 and
never look inside frames, which is what is measured.

    from _wsecho import build, serve, run
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from _loadgen import go_build

WSECHO_GO = r'''
package main

import (
	"bufio"
	"crypto/sha1"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"sync"
	"time"
)

const guid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

func serve(addr string) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(ln.Addr().(*net.TCPAddr).Port)
	for {
		c, err := ln.Accept()
		if err != nil {
			continue
		}
		go func(c net.Conn) {
			defer c.Close()
			r := bufio.NewReader(c)
			req, err := http.ReadRequest(r)
			if err != nil {
				return
			}
			sum := sha1.Sum([]byte(req.Header.Get("Sec-WebSocket-Key") + guid))
			fmt.Fprintf(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
				"Sec-WebSocket-Accept: %s\r\n\r\n", base64.StdEncoding.EncodeToString(sum[:]))
			if n := r.Buffered(); n > 0 {
				b, _ := r.Peek(n)
				c.Write(b)
				r.Discard(n)
			}
			io.Copy(c, c)
		}(c)
	}
}

func main() {
	mode := flag.String("mode", "client", "server or client")
	addr := flag.String("addr", "127.0.0.1:0", "listen (server) or dial (client) address")
	host := flag.String("host", "ws.localhost", "Host header")
	conns := flag.Int("c", 50, "connections")
	secs := flag.Float64("d", 3, "seconds")
	flag.Parse()
	if *mode == "server" {
		serve(*addr)
		return
	}
	frame := make([]byte, 2+4+128)
	frame[0], frame[1] = 0x81, 0x80|128
	copy(frame[2:6], []byte{1, 2, 3, 4})
	var mu sync.Mutex
	var lat []float64
	errors, firstErr := 0, ""
	fail := func(e error) {
		mu.Lock()
		errors++
		if firstErr == "" {
			firstErr = e.Error()
		}
		mu.Unlock()
	}
	var ready, done sync.WaitGroup
	start := make(chan struct{})
	var deadline time.Time
	for i := 0; i < *conns; i++ {
		ready.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			c, err := net.Dial("tcp", *addr)
			if err != nil {
				fail(err)
				ready.Done()
				return
			}
			defer c.Close()
			fmt.Fprintf(c, "GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
				"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", *host)
			r := bufio.NewReader(c)
			resp, err := http.ReadResponse(r, nil)
			if err != nil || resp.StatusCode != 101 {
				if err == nil {
					err = fmt.Errorf("status %d", resp.StatusCode)
				}
				fail(err)
				ready.Done()
				return
			}
			buf := make([]byte, len(frame))
			var mine []float64
			ready.Done()
			<-start
			for time.Now().Before(deadline) {
				t0 := time.Now()
				if _, err := c.Write(frame); err != nil {
					fail(err)
					break
				}
				if _, err := io.ReadFull(r, buf); err != nil {
					fail(err)
					break
				}
				mine = append(mine, float64(time.Since(t0).Microseconds())/1000)
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}()
	}
	ready.Wait()
	deadline = time.Now().Add(time.Duration(*secs * float64(time.Second)))
	t0 := time.Now()
	close(start)
	done.Wait()
	el := time.Since(t0).Seconds()
	sort.Float64s(lat)
	pct := func(p float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		return lat[int(p*float64(len(lat)-1))]
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{"messages": len(lat), "per_s": float64(len(lat)) / el,
		"p50_ms": pct(0.5), "p99_ms": pct(0.99), "errors": errors, "first_error": firstErr})
}
'''


def build(d: Path) -> Path:
    """Build the echo server/client under ``d`` (offline, as bench/_loadgen.py builds its own)."""
    return go_build(d, "wsecho", WSECHO_GO)


def serve(binary: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """Start the echo server on a free loopback port; returns (process, port)."""
    with open(log, "wb") as err:
        proc = subprocess.Popen([str(binary), "-mode", "server"], stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def run(binary: Path, *, target: str, conns: int, seconds: float, host: str = "ws.localhost") -> dict:
    """One ping-pong run through ``target`` (host:port); the client's JSON result."""
    r = subprocess.run([str(binary), "-addr", target, "-host", host, "-c", str(conns), "-d", str(seconds)],
                       capture_output=True, text=True, timeout=seconds + 120)
    if r.returncode != 0:
        raise RuntimeError(f"wsecho failed: {r.stderr.strip()}")
    return json.loads(r.stdout)
