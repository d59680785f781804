// An in-cluster API client for the real-node tests, with nothing but Go's standard library:
// it finds the API server as every in-cluster client does (KUBERNETES_SERVICE_HOST and
// KUBERNETES_SERVICE_PORT, which the kubelet sets), authenticates with the pod's
// ServiceAccount token, verifies the server certificate against the mounted ca.crt, and
// prints the answer to a SelfSubjectReview (who the API server says the pod is).
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

const sa = "/var/run/secrets/kubernetes.io/serviceaccount"

func main() {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		fail("KUBERNETES_SERVICE_HOST or KUBERNETES_SERVICE_PORT is not set")
	}
	token, err := os.ReadFile(sa + "/token")
	if err != nil {
		fail(err.Error())
	}
	ca, err := os.ReadFile(sa + "/ca.crt")
	if err != nil {
		fail(err.Error())
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		fail("no certificate in ca.crt")
	}
	client := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	body := `{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}`
	url := "https://" + net.JoinHostPort(host, port) + "/apis/authentication.k8s.io/v1/selfsubjectreviews"
	req, err := http.NewRequest("POST", url, bytes.NewBufferString(body))
	if err != nil {
		fail(err.Error())
	}
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		fail(err.Error())
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(resp.Body)
	fmt.Printf("HTTP %d %s\n", resp.StatusCode, answer)
}

func fail(msg string) {
	fmt.Println("error:", msg)
	os.Exit(1)
}
