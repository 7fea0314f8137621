package daemon_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

// TestMetricsTLSAndBasicAuth: with --web-config-file naming a certificate
// and bcrypt-hashed users (exporter-toolkit's format, as dcgm-exporter and
// node_exporter take it), the listener speaks HTTPS only and every path,
// the control API included, needs the credentials.
func TestMetricsTLSAndBasicAuth(t *testing.T) {
	dir := t.TempDir()
	certPEM, keyPEM := selfSignedCert(t)
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	hash, err := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	webConfig := filepath.Join(dir, "web.yml")
	for path, body := range map[string][]byte{
		certFile: certPEM,
		keyFile:  keyPEM,
		webConfig: []byte("tls_server_config:\n  cert_file: " + certFile + "\n  key_file: " + keyFile +
			"\nbasic_auth_users:\n  prom: " + string(hash) + "\n"),
	} {
		if err := os.WriteFile(path, body, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	r := startLogged(t, io.Discard, "--simulate=pcie-l4x4", "--web-config-file="+webConfig, "--pod-resources-socket=")
	waitSample(t, r.d, "a first sample", func(*telemetry.Snapshot) bool { return true })

	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(certPEM) {
		t.Fatal("test certificate does not parse")
	}
	trusting := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	https := "https://" + r.d.Addr()
	for _, tc := range []struct {
		name, path, user, pass string
		want                   int
		body                   string // a fragment a 200 must contain
	}{
		{"credentials", "/metrics", "prom", "s3cret", 200, "DCGM_FI_DEV_GPU_TEMP{"},
		{"wrong password", "/metrics", "prom", "wrong", 401, ""},
		{"unknown user", "/metrics", "root", "s3cret", 401, ""},
		{"no credentials", "/metrics", "", "", 401, ""},
		{"control API without credentials", "/sim/gpus", "", "", 401, ""},
		{"control API with credentials", "/sim/gpus", "prom", "s3cret", 200, `"uuid"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(http.MethodGet, https+tc.path, nil)
			if tc.user != "" {
				req.SetBasicAuth(tc.user, tc.pass)
			}
			resp, err := trusting.Do(req)
			if err != nil {
				t.Fatalf("https %s: %v", tc.path, err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Fatalf("https %s as %q/%q: %d, want %d", tc.path, tc.user, tc.pass, resp.StatusCode, tc.want)
			}
			if !strings.Contains(string(b), tc.body) {
				t.Errorf("https %s: body lacks %q", tc.path, tc.body)
			}
			if tc.want == 401 && strings.Contains(string(b), "DCGM_") {
				t.Errorf("https %s: a 401 carries metrics", tc.path)
			}
		})
	}

	t.Run("plain HTTP is refused", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodGet, "http://"+r.d.Addr()+"/metrics", nil)
		req.SetBasicAuth("prom", "s3cret")
		resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
		if err != nil {
			return // the connection failed: refused
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == 200 || strings.Contains(string(b), "DCGM_") {
			t.Errorf("plain HTTP to the TLS listener: %d with metrics", resp.StatusCode)
		}
	})

	t.Run("an untrusted certificate fails the handshake", func(t *testing.T) {
		// The client's system roots do not hold the self-signed certificate.
		resp, err := (&http.Client{Timeout: 10 * time.Second}).Get(https + "/metrics")
		if err == nil {
			resp.Body.Close()
			t.Fatal("a client that does not trust the certificate connected")
		}
		var unknown x509.UnknownAuthorityError
		if !errors.As(err, &unknown) {
			t.Errorf("untrusted certificate: %v, want x509's unknown authority error", err)
		}
	})
}

// TestControlAPIOnlySimulated: every control API route answers on a
// simulated node and is absent (404, for every method) on a real one, here
// a node whose NVML library is missing (--fail-on-init-error=false keeps
// the daemon up), which takes the real NVML path.
func TestControlAPIOnlySimulated(t *testing.T) {
	routes := []struct{ method, path string }{
		{"GET", "/sim/gpus"},
		{"POST", "/sim/gpus/0/xid?code=13"},
		{"POST", "/sim/gpus/0/lost"},
		{"POST", "/sim/gpus/0/recover"},
		{"PUT", "/sim/gpus/0/telemetry"},
		{"PUT", "/sim/gpus/0/mig"},
		{"POST", "/sim/gpus/0/fault?call=GetTemperature&error=SUCCESS"},
		{"POST", "/sim/gpus/0/ecc?type=single"},
		{"POST", "/sim/fault?call=EventSetWait&error=SUCCESS"},
		{"POST", "/sim/events/wait-lost?on=false"},
	}
	do := func(t *testing.T, method, url string) int {
		t.Helper()
		req, _ := http.NewRequest(method, url, strings.NewReader("{}"))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	simulated := start(t, false, "--simulate=pcie-l4x4", "--pod-resources-socket=")
	real := start(t, false, "--nvml-library="+filepath.Join(t.TempDir(), "missing.so"), "--fail-on-init-error=false", "--pod-resources-socket=")
	for _, rt := range routes {
		if code := do(t, rt.method, "http://"+simulated.d.Addr()+rt.path); code == 404 || code == 405 {
			t.Errorf("simulated node: %s %s: %d; the route list here is stale", rt.method, rt.path, code)
		}
		for _, method := range []string{"GET", "POST", "PUT", "DELETE", "PATCH"} {
			if code := do(t, method, "http://"+real.d.Addr()+rt.path); code != 404 {
				t.Errorf("real node: %s %s: %d, want 404 (no control API without --simulate)", method, rt.path, code)
			}
		}
	}
}

// selfSignedCert is a fresh P-256 certificate for 127.0.0.1 and localhost,
// valid for an hour, that is its own CA.
func selfSignedCert(t *testing.T) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "gpu-plugin test"},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
}
