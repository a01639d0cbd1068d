// A Go client that uses taxiway's egress proxy the way Go services do:
// http.Transport.Proxy for the proxy URL and ProxyConnectHeader for the
// Proxy-Authorization sent with CONNECT. No modules outside the standard library.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
)

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: egressclient PROXY_URL TARGET_URL CA_FILE")
		os.Exit(2)
	}
	proxyURL, err := url.Parse(os.Args[1])
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	pool := x509.NewCertPool()
	pem, err := os.ReadFile(os.Args[3])
	if err != nil || !pool.AppendCertsFromPEM(pem) {
		fmt.Println("ERR cannot read CA", err)
		os.Exit(1)
	}
	header := http.Header{}
	header.Set("Proxy-Authorization",
		"Basic "+base64.StdEncoding.EncodeToString([]byte("go:"+os.Getenv("PROXY_PASSWORD"))))
	transport := &http.Transport{
		Proxy:              http.ProxyURL(proxyURL),
		ProxyConnectHeader: header,
		TLSClientConfig:    &tls.Config{RootCAs: pool},
	}
	resp, err := (&http.Client{Transport: transport}).Get(os.Args[2])
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Println(resp.StatusCode)
	fmt.Print(string(body))
}
