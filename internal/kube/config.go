package kube

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

// Config says how to reach and authenticate to an API server.
type Config struct {
	Host string // https://host:port

	// One way to authenticate, or none: a bearer token (TokenFile is read
	// again each minute), a client certificate, or basic auth.
	BearerToken        string
	TokenFile          string
	CertData, KeyData  []byte
	Username, Password string

	CAData     []byte // PEM; none: the system's roots
	Insecure   bool   // skip verifying the server's certificate
	ServerName string // the name to verify instead of the host's
	ProxyURL   string // none: HTTPS_PROXY and the like

	// Impersonation (kubeconfig as, as-uid, as-groups, as-user-extra).
	ImpersonateUser   string
	ImpersonateUID    string
	ImpersonateGroups []string
	ImpersonateExtra  map[string][]string

	UserAgent string
}

// The pod's service account, as the kubelet mounts it.
const (
	serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"
)

// InClusterConfig is the pod's service account (client-go's
// rest.InClusterConfig): the API server from KUBERNETES_SERVICE_HOST and
// _PORT, the token and CA from the mounted secret. A missing CA leaves the
// system's roots (client-go logs it and goes on; so does the caller's
// first request, which then fails to verify).
func InClusterConfig() (*Config, error) {
	return inClusterConfig(serviceAccountDir)
}

func inClusterConfig(dir string) (*Config, error) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return nil, errors.New("unable to load in-cluster configuration, KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be defined")
	}
	tokenFile := filepath.Join(dir, "token")
	tok, err := readToken(tokenFile)
	if err != nil {
		return nil, err
	}
	cfg := &Config{Host: "https://" + net.JoinHostPort(host, port), BearerToken: tok, TokenFile: tokenFile}
	if ca, err := os.ReadFile(filepath.Join(dir, "ca.crt")); err == nil {
		cfg.CAData = ca
	}
	return cfg, nil
}

func readToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// ErrCredentialPlugin is a kubeconfig whose user authenticates through an
// exec or auth-provider plugin: the daemon runs no other program.
var ErrCredentialPlugin = errors.New("the user authenticates through a credential plugin")

// kubeconfig is the part of a kubeconfig file (clientcmd's v1 Config) that
// says how to reach the current context's cluster as its user.
type kubeconfig struct {
	CurrentContext string `json:"current-context"`
	Contexts       []struct {
		Name    string `json:"name"`
		Context struct {
			Cluster string `json:"cluster"`
			User    string `json:"user"`
		} `json:"context"`
	} `json:"contexts"`
	Clusters []struct {
		Name    string `json:"name"`
		Cluster struct {
			Server                   string `json:"server"`
			TLSServerName            string `json:"tls-server-name"`
			InsecureSkipTLSVerify    bool   `json:"insecure-skip-tls-verify"`
			CertificateAuthority     string `json:"certificate-authority"`
			CertificateAuthorityData []byte `json:"certificate-authority-data"`
			ProxyURL                 string `json:"proxy-url"`
		} `json:"cluster"`
	} `json:"clusters"`
	Users []struct {
		Name string `json:"name"`
		User struct {
			ClientCertificate     string              `json:"client-certificate"`
			ClientCertificateData []byte              `json:"client-certificate-data"`
			ClientKey             string              `json:"client-key"`
			ClientKeyData         []byte              `json:"client-key-data"`
			Token                 string              `json:"token"`
			TokenFile             string              `json:"tokenFile"`
			Impersonate           string              `json:"as"`
			ImpersonateUID        string              `json:"as-uid"`
			ImpersonateGroups     []string            `json:"as-groups"`
			ImpersonateUserExtra  map[string][]string `json:"as-user-extra"`
			Username              string              `json:"username"`
			Password              string              `json:"password"`
			AuthProvider          any                 `json:"auth-provider"`
			Exec                  any                 `json:"exec"`
		} `json:"user"`
	} `json:"users"`
}

// LoadKubeconfig reads a kubeconfig file's current context, as client-go's
// clientcmd.BuildConfigFromFlags("", path) does: the one file (not a
// KUBECONFIG list), file paths in it relative to its directory. A user
// with an exec or auth-provider plugin is ErrCredentialPlugin.
func LoadKubeconfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var kc kubeconfig
	if err := yaml.Unmarshal(data, &kc); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", path, err)
	}
	dir, err := filepath.Abs(filepath.Dir(path))
	if err != nil {
		return nil, err
	}
	resolve := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(dir, p)
	}
	if kc.CurrentContext == "" {
		return nil, errors.New("invalid configuration: no current-context")
	}
	ctxIdx := -1
	for i, c := range kc.Contexts {
		if c.Name == kc.CurrentContext {
			ctxIdx = i
		}
	}
	if ctxIdx < 0 {
		return nil, fmt.Errorf("invalid configuration: context %q not found", kc.CurrentContext)
	}
	kctx := kc.Contexts[ctxIdx].Context
	cfg := &Config{}
	found := false
	for _, c := range kc.Clusters {
		if c.Name != kctx.Cluster {
			continue
		}
		found = true
		cl := c.Cluster
		if cl.Server == "" {
			return nil, fmt.Errorf("invalid configuration: no server found for cluster %q", c.Name)
		}
		cfg.Host, cfg.ServerName, cfg.Insecure, cfg.ProxyURL = cl.Server, cl.TLSServerName, cl.InsecureSkipTLSVerify, cl.ProxyURL
		// certificate-authority-data wins over a file, as in clientcmd.
		cfg.CAData = cl.CertificateAuthorityData
		if len(cfg.CAData) == 0 && cl.CertificateAuthority != "" {
			if cfg.CAData, err = os.ReadFile(resolve(cl.CertificateAuthority)); err != nil {
				return nil, fmt.Errorf("unable to read certificate-authority %s for %s: %w", cl.CertificateAuthority, c.Name, err)
			}
		}
	}
	if !found {
		return nil, fmt.Errorf("invalid configuration: cluster %q not found", kctx.Cluster)
	}
	for _, u := range kc.Users {
		if u.Name != kctx.User {
			continue
		}
		us := u.User
		if us.Exec != nil || us.AuthProvider != nil {
			return nil, ErrCredentialPlugin
		}
		cfg.BearerToken, cfg.Username, cfg.Password = us.Token, us.Username, us.Password
		if us.TokenFile != "" {
			cfg.TokenFile = resolve(us.TokenFile)
			if cfg.BearerToken == "" {
				if cfg.BearerToken, err = readToken(cfg.TokenFile); err != nil {
					return nil, err
				}
			}
		}
		cfg.CertData, cfg.KeyData = us.ClientCertificateData, us.ClientKeyData
		if us.ClientCertificate != "" && len(cfg.CertData) == 0 {
			if cfg.CertData, err = os.ReadFile(resolve(us.ClientCertificate)); err != nil {
				return nil, err
			}
		}
		if us.ClientKey != "" && len(cfg.KeyData) == 0 {
			if cfg.KeyData, err = os.ReadFile(resolve(us.ClientKey)); err != nil {
				return nil, err
			}
		}
		if us.Impersonate != "" {
			cfg.ImpersonateUser, cfg.ImpersonateUID = us.Impersonate, us.ImpersonateUID
			cfg.ImpersonateGroups, cfg.ImpersonateExtra = us.ImpersonateGroups, us.ImpersonateUserExtra
		}
	}
	// A missing user is no error in clientcmd either: anonymous.
	return cfg, nil
}

// transport is client-go's default HTTP transport for cfg: its TLS, proxy,
// timeouts and HTTP/2 with pings that find a dead connection under a
// watch.
func (cfg *Config) transport() (*http.Transport, error) {
	tc := &tls.Config{ServerName: cfg.ServerName, InsecureSkipVerify: cfg.Insecure} //nolint:gosec // only when the kubeconfig asks
	if len(cfg.CAData) > 0 {
		if cfg.Insecure {
			return nil, errors.New("specifying a root certificates file with the insecure flag is not allowed")
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(cfg.CAData) {
			return nil, errors.New("the certificate authority holds no PEM certificate")
		}
	}
	if len(cfg.CertData) > 0 || len(cfg.KeyData) > 0 {
		cert, err := tls.X509KeyPair(cfg.CertData, cfg.KeyData)
		if err != nil {
			return nil, fmt.Errorf("the client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	proxy := http.ProxyFromEnvironment
	if cfg.ProxyURL != "" {
		u, err := url.Parse(cfg.ProxyURL)
		if err != nil {
			return nil, fmt.Errorf("invalid proxy-url %q: %w", cfg.ProxyURL, err)
		}
		proxy = http.ProxyURL(u)
	}
	return &http.Transport{
		Proxy:               proxy,
		DialContext:         dialer.DialContext,
		TLSClientConfig:     tc,
		TLSHandshakeTimeout: 10 * time.Second,
		MaxIdleConnsPerHost: 25,
		IdleConnTimeout:     90 * time.Second,
		ForceAttemptHTTP2:   true,
		// client-go's HTTP/2 health check: a ping after 30 s of silence,
		// the connection dropped when none answers within 15 s.
		HTTP2: &http.HTTP2Config{SendPingTimeout: 30 * time.Second, PingTimeout: 15 * time.Second},
	}, nil
}

// authorize is what each request carries: the credentials and the
// impersonation headers. tokens is the token file, if any.
func (cfg *Config) authorize() (func(*http.Request), *fileToken) {
	var tokens *fileToken
	if cfg.TokenFile != "" {
		tokens = &fileToken{path: cfg.TokenFile, tok: cfg.BearerToken, read: time.Now()}
	}
	static := cfg.BearerToken
	basic := ""
	if cfg.Username != "" || cfg.Password != "" {
		basic = base64.StdEncoding.EncodeToString([]byte(cfg.Username + ":" + cfg.Password))
	}
	return func(req *http.Request) {
		switch {
		case basic != "":
			req.Header.Set("Authorization", "Basic "+basic)
		case tokens != nil:
			req.Header.Set("Authorization", "Bearer "+tokens.token())
		case static != "":
			req.Header.Set("Authorization", "Bearer "+static)
		}
		if cfg.ImpersonateUser != "" {
			req.Header.Set("Impersonate-User", cfg.ImpersonateUser)
			if cfg.ImpersonateUID != "" {
				req.Header.Set("Impersonate-Uid", cfg.ImpersonateUID)
			}
			for _, g := range cfg.ImpersonateGroups {
				req.Header.Add("Impersonate-Group", g)
			}
			for k, vs := range cfg.ImpersonateExtra {
				for _, v := range vs {
					req.Header.Add("Impersonate-Extra-"+url.PathEscape(k), v)
				}
			}
		}
	}, tokens
}
