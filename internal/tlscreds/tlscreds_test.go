package tlscreds

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"blockd/internal/testutil"
	"blockd/internal/tlscreds/tlstest"
)

func gen(t *testing.T, o tlstest.Options) string {
	t.Helper()
	dir := t.TempDir()
	if err := tlstest.Generate(dir, o); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestLoadServer(t *testing.T) {
	dir := gen(t, tlstest.Options{})
	cfg, err := LoadX509(X509Options{Dir: dir, Endpoint: EndpointServer, VerifyPeer: true})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ClientAuth != tls.RequireAnyClientCert || cfg.VerifyConnection == nil || len(cfg.Certificates) != 1 || cfg.MinVersion != tls.VersionTLS12 {
		t.Fatalf("config %+v", cfg)
	}
	cfg, err = LoadX509(X509Options{Dir: dir, Endpoint: EndpointServer})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ClientAuth != tls.NoClientCert {
		t.Fatal("client certificates required without verify-peer")
	}
	// Optional files are tolerated.
	os.WriteFile(filepath.Join(dir, DHParams), []byte("unused"), 0o600)
	if _, err := LoadX509(X509Options{Dir: dir, Endpoint: EndpointServer}); err != nil {
		t.Fatal(err)
	}
}

func TestLoadClient(t *testing.T) {
	dir := gen(t, tlstest.Options{})
	cfg, err := LoadX509(X509Options{Dir: dir, VerifyPeer: true})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.RootCAs == nil || len(cfg.Certificates) != 1 || cfg.InsecureSkipVerify {
		t.Fatalf("client config %+v", cfg)
	}
	os.Remove(filepath.Join(dir, ClientCert))
	os.Remove(filepath.Join(dir, ClientKey))
	if cfg, err = LoadX509(X509Options{Dir: dir, Endpoint: EndpointClient}); err != nil || len(cfg.Certificates) != 0 {
		t.Fatalf("client without certificate: %v", err)
	}
	os.WriteFile(filepath.Join(dir, ClientCert), []byte("x"), 0o600)
	_, err = LoadX509(X509Options{Dir: dir})
	want := "Cert '" + filepath.Join(dir, ClientCert) + "' without corresponding key '" + filepath.Join(dir, ClientKey) + "'"
	if err == nil || err.Error() != want {
		t.Fatalf("got %v, want %s", err, want)
	}
}

func TestLoadErrors(t *testing.T) {
	dir := gen(t, tlstest.Options{})
	srv := func(d string) error {
		_, err := LoadX509(X509Options{Dir: d, Endpoint: EndpointServer, VerifyPeer: true})
		return err
	}
	expect := func(err error, want string) {
		t.Helper()
		if err == nil || err.Error() != want {
			t.Fatalf("got %v, want %q", err, want)
		}
	}
	expect(srv(""), "Missing 'dir' property value")
	empty := t.TempDir()
	expect(srv(empty), "Unable to access credentials "+filepath.Join(empty, CACert)+": No such file or directory")
	copyFile(t, filepath.Join(dir, CACert), filepath.Join(empty, CACert))
	expect(srv(empty), "Unable to access credentials "+filepath.Join(empty, ServerCert)+": No such file or directory")
	copyFile(t, filepath.Join(dir, ServerCert), filepath.Join(empty, ServerCert))
	expect(srv(empty), "Unable to access credentials "+filepath.Join(empty, ServerKey)+": No such file or directory")

	if _, err := LoadX509(X509Options{Dir: dir, Endpoint: "middle"}); err == nil {
		t.Fatal("bad endpoint accepted")
	}
	if _, err := LoadX509(X509Options{Dir: dir, Endpoint: EndpointServer, Priority: "NORMAL"}); err == nil {
		t.Fatal("priority accepted")
	}

	// Unreadable CA.
	bad := t.TempDir()
	for _, f := range []string{CACert, ServerCert, ServerKey} {
		copyFile(t, filepath.Join(dir, f), filepath.Join(bad, f))
	}
	os.WriteFile(filepath.Join(bad, CACert), []byte("not a certificate"), 0o600)
	if err := srv(bad); err == nil || !strings.HasPrefix(err.Error(), "Unable to import certificate "+filepath.Join(bad, CACert)) {
		t.Fatalf("garbage CA: %v", err)
	}
	copyFile(t, filepath.Join(dir, CACert), filepath.Join(bad, CACert))
	// Key of the wrong certificate.
	copyFile(t, filepath.Join(dir, ClientKey), filepath.Join(bad, ServerKey))
	if err := srv(bad); err == nil || !strings.HasPrefix(err.Error(), "Cannot set certificate") {
		t.Fatalf("mismatched key: %v", err)
	}
	// Encrypted key.
	os.WriteFile(filepath.Join(bad, ServerKey), []byte("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"), 0o600)
	expect(srv(bad), "Unable to import private key "+filepath.Join(bad, ServerKey))
	// A server certificate from another CA.
	other := gen(t, tlstest.Options{})
	copyFile(t, filepath.Join(other, ServerCert), filepath.Join(bad, ServerCert))
	copyFile(t, filepath.Join(other, ServerKey), filepath.Join(bad, ServerKey))
	expect(srv(bad), "Our own certificate "+filepath.Join(bad, ServerCert)+" failed validation against "+
		filepath.Join(bad, CACert)+": The certificate hasn't got a known issuer")
}

func TestSanityChecks(t *testing.T) {
	now := time.Now()
	expired := gen(t, tlstest.Options{NotBefore: now.Add(-48 * time.Hour), NotAfter: now.Add(-24 * time.Hour)})
	_, err := LoadX509(X509Options{Dir: expired, Endpoint: EndpointServer})
	if err == nil || err.Error() != "The server certificate "+filepath.Join(expired, ServerCert)+" has expired" {
		t.Fatalf("expired: %v", err)
	}
	if _, err := LoadX509(X509Options{Dir: expired, Endpoint: EndpointServer, SkipSanityCheck: true}); err != nil {
		t.Fatalf("sanity-check=off: %v", err)
	}
	future := gen(t, tlstest.Options{NotBefore: now.Add(24 * time.Hour), NotAfter: now.Add(48 * time.Hour)})
	if _, err := LoadX509(X509Options{Dir: future, Endpoint: EndpointServer}); err == nil || !strings.HasSuffix(err.Error(), "is not yet active") {
		t.Fatalf("not yet valid: %v", err)
	}
	ca := gen(t, tlstest.Options{ServerIsCA: true})
	if _, err := LoadX509(X509Options{Dir: ca, Endpoint: EndpointServer}); err == nil || !strings.Contains(err.Error(), "basic constraints show a CA, but we need one for a server") {
		t.Fatalf("CA as server certificate: %v", err)
	}
}

func TestPSKAndAnon(t *testing.T) {
	dir := t.TempDir()
	_, err := LoadPSK(PSKOptions{Dir: dir, Endpoint: EndpointServer})
	if err == nil || err.Error() != "Unable to access credentials "+filepath.Join(dir, PSKFile)+": No such file or directory" {
		t.Fatalf("missing keys.psk: %v", err)
	}
	os.WriteFile(filepath.Join(dir, PSKFile), []byte("qemu:0123456789abcdef\n"), 0o600)
	_, err = LoadPSK(PSKOptions{Dir: dir, Endpoint: EndpointServer})
	if !errors.Is(err, ErrPSKUnsupported) || err.Error() != "TLS-PSK credentials are not supported" {
		t.Fatalf("psk: %v", err)
	}
	if _, err := LoadAnon(); !errors.Is(err, ErrAnonUnsupported) {
		t.Fatalf("anon: %v", err)
	}
}

// TestHandshakes runs real TLS handshakes with the loaded configurations,
// including a revoked client certificate.
func TestHandshakes(t *testing.T) {
	dir := gen(t, tlstest.Options{RevokeClient: true})
	srv, err := LoadX509(X509Options{Dir: dir, Endpoint: EndpointServer, VerifyPeer: true})
	if err != nil {
		t.Fatal(err)
	}
	cli, err := LoadX509(X509Options{Dir: dir, Endpoint: EndpointClient, VerifyPeer: true})
	if err != nil {
		t.Fatal(err)
	}
	cli.ServerName = "localhost"
	if err := handshake(srv, cli); err == nil || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("revoked client accepted: %v", err)
	}
	os.Remove(filepath.Join(dir, CACRL))
	if srv, err = LoadX509(X509Options{Dir: dir, Endpoint: EndpointServer, VerifyPeer: true}); err != nil {
		t.Fatal(err)
	}
	if err := handshake(srv, cli); err != nil {
		t.Fatal(err)
	}
	anon := cli.Clone()
	anon.Certificates = nil
	if err := handshake(srv, anon); err == nil {
		t.Fatal("client without certificate accepted with verify-peer")
	}
	untrusting := cli.Clone()
	untrusting.RootCAs = x509.NewCertPool()
	if err := handshake(srv, untrusting); err == nil {
		t.Fatal("client accepted an unknown server CA")
	}
}

// credKinds are the credentials the client verification tests run with:
// ECDSA, RSA-2048 (as openssl req -newkey rsa:2048) and certtool's RSA-3072
// made as QEMU's documentation shows.
var credKinds = []struct {
	name string
	gen  func(t *testing.T) string
}{
	{"ecdsa", func(t *testing.T) string { return gen(t, tlstest.Options{}) }},
	{"rsa", func(t *testing.T) string { return gen(t, tlstest.Options{RSA: true}) }},
	{"certtool", func(t *testing.T) string {
		testutil.NeedTool(t, "certtool")
		dir := t.TempDir()
		if err := tlstest.Certtool(dir); err != nil {
			t.Fatal(err)
		}
		return dir
	}},
}

// TestTLS13RequestNamesNoCA: under TLS 1.3 the server's CertificateRequest
// lists no CA names. GnuTLS clients before 3.8.13 that are given a CA list
// only send a certificate whose key type they find among the request's
// signature schemes, which never holds for RSA against Go (no rsa_pkcs1_*
// under TLS 1.3): libnbd and QEMU then sent no certificate at all.
func TestTLS13RequestNamesNoCA(t *testing.T) {
	for _, k := range credKinds {
		t.Run(k.name, func(t *testing.T) {
			dir := k.gen(t)
			srv, err := LoadX509(X509Options{Dir: dir, Endpoint: EndpointServer, VerifyPeer: true})
			if err != nil {
				t.Fatal(err)
			}
			cli := clientConfig(t, dir, ClientCert, ClientKey)
			cli.MinVersion = tls.VersionTLS13
			kp := cli.Certificates[0]
			cli.Certificates = nil
			var cas [][]byte
			cli.GetClientCertificate = func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
				cas = cri.AcceptableCAs
				if err := cri.SupportsCertificate(&kp); err != nil {
					t.Errorf("client certificate unusable with the request: %v", err)
				}
				return &kp, nil
			}
			if err := handshake(srv, cli); err != nil {
				t.Fatal(err)
			}
			if len(cas) != 0 {
				t.Fatalf("CertificateRequest names %d CAs", len(cas))
			}
		})
	}
}

// TestClientVerification: with verify-peer the server accepts a client
// certificate from its CA under TLS 1.2 and 1.3 and refuses no
// certificate, one from another CA, one whose purpose is not client
// authentication, and an expired one.
func TestClientVerification(t *testing.T) {
	for _, k := range credKinds {
		t.Run(k.name, func(t *testing.T) {
			dir := k.gen(t)
			srv, err := LoadX509(X509Options{Dir: dir, Endpoint: EndpointServer, VerifyPeer: true})
			if err != nil {
				t.Fatal(err)
			}
			good := clientConfig(t, dir, ClientCert, ClientKey)
			for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
				c := good.Clone()
				c.MinVersion, c.MaxVersion = v, v
				if err := handshake(srv, c); err != nil {
					t.Fatalf("TLS version %x: %v", v, err)
				}
			}
			refused := func(what string, cli *tls.Config, srv *tls.Config, want string) {
				t.Helper()
				for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
					c := cli.Clone()
					c.MinVersion, c.MaxVersion = v, v
					if err := handshake(srv, c); err == nil || !strings.Contains(err.Error(), want) {
						t.Errorf("%s, TLS version %x: got %v, want %q", what, v, err, want)
					}
				}
			}
			anon := good.Clone()
			anon.Certificates = nil
			refused("no certificate", anon, srv, "didn't provide a certificate")

			other := k.gen(t)
			foreign := clientConfig(t, other, ClientCert, ClientKey)
			foreign.RootCAs = good.RootCAs
			refused("certificate from another CA", foreign, srv, "unknown authority")

			refused("server certificate as client certificate", clientConfig(t, dir, ServerCert, ServerKey), srv, "incompatible key usage")

			later := func() time.Time { return time.Now().Add(3 * 366 * 24 * time.Hour) }
			srvLater, err := LoadX509(X509Options{Dir: dir, Endpoint: EndpointServer, VerifyPeer: true, SkipSanityCheck: true, Now: later})
			if err != nil {
				t.Fatal(err)
			}
			late := good.Clone()
			late.InsecureSkipVerify = true // the server certificate has expired too by then
			refused("expired certificate", late, srvLater, "expired")
		})
	}
}

// clientConfig trusts dir's CA and presents the certificate and key in
// dir's files cert and key.
func clientConfig(t *testing.T, dir, cert, key string) *tls.Config {
	t.Helper()
	cfg, err := LoadX509(X509Options{Dir: dir, Endpoint: EndpointClient, VerifyPeer: true, SkipSanityCheck: true})
	if err != nil {
		t.Fatal(err)
	}
	kp, err := tls.LoadX509KeyPair(filepath.Join(dir, cert), filepath.Join(dir, key))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Certificates = []tls.Certificate{kp}
	cfg.ServerName = "localhost"
	return cfg
}

// handshake connects a client and a server over loopback TCP (a
// net.Pipe has no buffer: a TLS 1.2 server's alert and the client's next
// flight would block each other).
func handshake(srv, cli *tls.Config) error {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer l.Close()
	b, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		return err
	}
	defer b.Close()
	a, err := l.Accept()
	if err != nil {
		return err
	}
	defer a.Close()
	deadline := time.Now().Add(30 * time.Second)
	a.SetDeadline(deadline)
	b.SetDeadline(deadline)
	errc := make(chan error, 1)
	go func() {
		s := tls.Server(a, srv)
		err := s.Handshake()
		if err == nil {
			_, err = s.Write([]byte{1})
		}
		errc <- err
		a.Close()
	}()
	c := tls.Client(b, cli)
	err = c.Handshake()
	if err == nil {
		_, err = c.Read(make([]byte, 1))
	}
	serr := <-errc
	if serr != nil {
		return serr
	}
	return err
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
