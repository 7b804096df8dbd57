// Package tlscreds turns QEMU TLS credential objects into crypto/tls
// configurations.
//
// tls-creds-x509 is supported: a directory holding ca-cert.pem, the
// endpoint's certificate and key (server-cert.pem/server-key.pem, or the
// optional client-cert.pem/client-key.pem), and for servers the optional
// ca-crl.pem and dh-params.pem, loaded and sanity-checked the way QEMU 7.2
// does and with its error messages. Go's TLS stack only offers ECDHE key
// exchange, so dh-params.pem is checked for presence but not used, and
// GnuTLS priority strings cannot be honoured. A server with verify-peer
// names no CAs in its certificate request and verifies the client's chain
// itself (see verifyClient: GnuTLS clients with RSA keys need that under
// TLS 1.3).
//
// tls-creds-psk and tls-creds-anon cannot be supported: crypto/tls has
// neither pre-shared keys nor anonymous Diffie-Hellman.
package tlscreds

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"
)

// File names inside a tls-creds-x509 directory.
const (
	CACert     = "ca-cert.pem"
	CACRL      = "ca-crl.pem"
	ServerCert = "server-cert.pem"
	ServerKey  = "server-key.pem"
	ClientCert = "client-cert.pem"
	ClientKey  = "client-key.pem"
	DHParams   = "dh-params.pem"
	PSKFile    = "keys.psk"
)

// Endpoints.
const (
	EndpointServer = "server"
	EndpointClient = "client"
)

// ErrPSKUnsupported is returned for tls-creds-psk objects.
var ErrPSKUnsupported = errors.New("TLS-PSK credentials are not supported")

// ErrAnonUnsupported is returned for tls-creds-anon objects.
var ErrAnonUnsupported = errors.New("anonymous TLS credentials are not supported")

// X509Options are the properties of a tls-creds-x509 object.
type X509Options struct {
	Dir string
	// Endpoint is "server" or "client" ("" means "client", QEMU's
	// default).
	Endpoint string
	// VerifyPeer: for a server, require client certificates signed by the
	// CA; for a client, verify the server's certificate. QEMU's default is
	// true; the zero value here is false, so callers must pass it.
	VerifyPeer bool
	// Priority is a GnuTLS priority string; only "" is accepted.
	Priority string
	// SkipSanityCheck disables the checks of the certificates' validity
	// period, constraints, usages and chain (QEMU's sanity-check=off).
	SkipSanityCheck bool
	// Now overrides the clock for the sanity checks (tests).
	Now func() time.Time
}

// LoadX509 loads a tls-creds-x509 directory.
func LoadX509(o X509Options) (*tls.Config, error) {
	if o.Dir == "" {
		return nil, errors.New("Missing 'dir' property value")
	}
	server := false
	switch o.Endpoint {
	case EndpointServer:
		server = true
	case EndpointClient, "":
	default:
		return nil, fmt.Errorf("Parameter 'endpoint' does not accept value '%s'", o.Endpoint)
	}
	if o.Priority != "" {
		return nil, fmt.Errorf("TLS priority string '%s' is not supported", o.Priority)
	}
	now := time.Now
	if o.Now != nil {
		now = o.Now
	}

	caPath, err := credPath(o.Dir, CACert, true)
	if err != nil {
		return nil, err
	}
	var certPath, keyPath string
	if server {
		if certPath, err = credPath(o.Dir, ServerCert, true); err != nil {
			return nil, err
		}
		if keyPath, err = credPath(o.Dir, ServerKey, true); err != nil {
			return nil, err
		}
	} else {
		if certPath, err = credPath(o.Dir, ClientCert, false); err != nil {
			return nil, err
		}
		if keyPath, err = credPath(o.Dir, ClientKey, false); err != nil {
			return nil, err
		}
		if certPath != "" && keyPath == "" {
			return nil, fmt.Errorf("Cert '%s' without corresponding key '%s'", certPath, filepath.Join(o.Dir, ClientKey))
		}
		if certPath == "" && keyPath != "" {
			return nil, fmt.Errorf("Key '%s' without corresponding cert '%s'", keyPath, filepath.Join(o.Dir, ClientCert))
		}
	}
	var crlPath string
	if server {
		if crlPath, err = credPath(o.Dir, CACRL, false); err != nil {
			return nil, err
		}
		if _, err = credPath(o.Dir, DHParams, false); err != nil {
			return nil, err
		}
	}

	cas, err := loadCerts(caPath)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, c := range cas {
		pool.AddCert(c)
	}

	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	var chain []*x509.Certificate
	if certPath != "" {
		if chain, err = loadCerts(certPath); err != nil {
			return nil, err
		}
		certPEM, _ := os.ReadFile(certPath)
		keyPEM, err := os.ReadFile(keyPath)
		if err != nil {
			return nil, fmt.Errorf("Cannot load private key %s: %s", keyPath, strerror(err))
		}
		if err := checkKeyPEM(keyPEM); err != nil {
			return nil, fmt.Errorf("Unable to import private key %s", keyPath)
		}
		kp, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return nil, fmt.Errorf("Cannot set certificate '%s' & key '%s': %v", certPath, keyPath, err)
		}
		cfg.Certificates = []tls.Certificate{kp}
	}

	if !o.SkipSanityCheck {
		if err := sanityCheck(cas, caPath, chain, certPath, server, now()); err != nil {
			return nil, err
		}
	}

	var crl *x509.RevocationList
	if crlPath != "" {
		if crl, err = loadCRL(crlPath, cas); err != nil {
			return nil, err
		}
	}

	if server {
		if o.VerifyPeer {
			// ClientCAs stays nil so that the CertificateRequest names
			// no CAs; verifyClient checks the chain against pool and
			// says why.
			cfg.ClientAuth = tls.RequireAnyClientCert
			cfg.VerifyConnection = verifyClient(pool, crl, now)
		} else {
			cfg.ClientAuth = tls.NoClientCert
		}
	} else {
		cfg.RootCAs = pool
		cfg.InsecureSkipVerify = !o.VerifyPeer
	}
	return cfg, nil
}

// PSKOptions are the properties of a tls-creds-psk object.
type PSKOptions struct {
	Dir      string
	Endpoint string
	Username string
}

// LoadPSK always fails: Go's crypto/tls has no TLS-PSK cipher suites. It
// still reports a missing keys.psk first, as QEMU would.
func LoadPSK(o PSKOptions) (*tls.Config, error) {
	if o.Dir == "" {
		return nil, errors.New("Missing 'dir' property value")
	}
	if _, err := credPath(o.Dir, PSKFile, true); err != nil {
		return nil, err
	}
	return nil, ErrPSKUnsupported
}

// LoadAnon always fails: anonymous Diffie-Hellman is not available.
func LoadAnon() (*tls.Config, error) { return nil, ErrAnonUnsupported }

// credPath returns dir/name if it is readable, "" if it is missing and
// optional, or QEMU's error.
func credPath(dir, name string, required bool) (string, error) {
	p := filepath.Join(dir, name)
	f, err := os.Open(p)
	if err == nil {
		f.Close()
		return p, nil
	}
	if errors.Is(err, os.ErrNotExist) && !required {
		return "", nil
	}
	return "", fmt.Errorf("Unable to access credentials %s: %s", p, strerror(err))
}

// strerror renders an OS error like C's strerror ("No such file or
// directory").
func strerror(err error) string {
	var en syscall.Errno
	s := err.Error()
	if errors.As(err, &en) {
		s = en.Error()
	}
	r, n := utf8.DecodeRuneInString(s)
	return string(unicode.ToUpper(r)) + s[n:]
}

func loadCerts(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("Cannot load CA cert list %s: %s", path, strerror(err))
	}
	var certs []*x509.Certificate
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("Unable to import certificate %s: %v", path, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("Unable to import certificate %s: no PEM certificate found", path)
	}
	return certs, nil
}

// checkKeyPEM rejects keys crypto/tls cannot use, in particular encrypted
// ones (QEMU's passwordid is not supported).
func checkKeyPEM(data []byte) error {
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return errors.New("no private key")
		}
		if b.Type == "ENCRYPTED PRIVATE KEY" || b.Headers["Proc-Type"] != "" {
			return errors.New("encrypted private keys are not supported")
		}
		if bytes.HasSuffix([]byte(b.Type), []byte("PRIVATE KEY")) {
			return nil
		}
	}
}

func loadCRL(path string, cas []*x509.Certificate) (*x509.RevocationList, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("Cannot load CRL '%s': %s", path, strerror(err))
	}
	if b, _ := pem.Decode(data); b != nil {
		data = b.Bytes
	}
	crl, err := x509.ParseRevocationList(data)
	if err != nil {
		return nil, fmt.Errorf("Cannot load CRL '%s': %v", path, err)
	}
	for _, ca := range cas {
		if crl.CheckSignatureFrom(ca) == nil {
			return crl, nil
		}
	}
	return nil, fmt.Errorf("Cannot load CRL '%s': not signed by a CA in the CA certificate list", path)
}

// verifyClient returns a server's VerifyConnection: the client's
// certificate must chain to a CA in roots, be valid now, allow client
// authentication, and not be revoked by crl (which may be nil). It runs
// for resumed sessions too.
//
// crypto/tls could do this itself (RequireAndVerifyClientCert with
// ClientCAs), but then its TLS 1.3 CertificateRequest lists the CAs'
// names, and GnuTLS clients before 3.8.13 that load a single key pair from
// files (libnbd's tls-certificates, QEMU's tls-creds-x509) then look for a
// certificate whose issuer is listed *and* whose key type matches a
// signature scheme in the request. They take the key type of
// rsa_pss_rsae_* as RSA-PSS, not RSA, and Go offers no rsa_pkcs1_* scheme
// under TLS 1.3 (GnuTLS servers such as qemu-storage-daemon do), so an RSA
// client certificate never matched: the client sent none. With no CA list
// those clients send their only certificate, of whatever key type.
func verifyClient(roots *x509.CertPool, crl *x509.RevocationList, now func() time.Time) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("client didn't provide a certificate")
		}
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		chains, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
			Roots: roots, Intermediates: inter, CurrentTime: now(),
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		})
		if err != nil {
			return fmt.Errorf("failed to verify client certificate: %w", err)
		}
		if crl != nil {
			return revocationCheck(crl, chains)
		}
		return nil
	}
}

// revocationCheck rejects chains holding a certificate listed in crl.
func revocationCheck(crl *x509.RevocationList, chains [][]*x509.Certificate) error {
	for _, chain := range chains {
		for _, c := range chain {
			for _, r := range crl.RevokedCertificateEntries {
				if r.SerialNumber.Cmp(c.SerialNumber) == 0 && bytes.Equal(c.RawIssuer, crl.RawIssuer) {
					return fmt.Errorf("certificate %s has been revoked", c.Subject)
				}
			}
		}
	}
	return nil
}

// sanityCheck mirrors qcrypto_tls_creds_x509_sanity_check.
func sanityCheck(cas []*x509.Certificate, caPath string, chain []*x509.Certificate, certPath string, server bool, now time.Time) error {
	for _, ca := range cas {
		if err := checkCert(ca, caPath, server, true, now); err != nil {
			return err
		}
	}
	if len(chain) == 0 {
		return nil
	}
	if err := checkCert(chain[0], certPath, server, false, now); err != nil {
		return err
	}
	pool := x509.NewCertPool()
	for _, ca := range cas {
		pool.AddCert(ca)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	usage := x509.ExtKeyUsageClientAuth
	if server {
		usage = x509.ExtKeyUsageServerAuth
	}
	_, err := chain[0].Verify(x509.VerifyOptions{
		Roots: pool, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{usage, x509.ExtKeyUsageAny},
	})
	if err != nil {
		reason := "The certificate is not trusted"
		var ua x509.UnknownAuthorityError
		if errors.As(err, &ua) {
			reason = "The certificate hasn't got a known issuer"
		}
		return fmt.Errorf("Our own certificate %s failed validation against %s: %s", certPath, caPath, reason)
	}
	return nil
}

func checkCert(c *x509.Certificate, path string, server, isCA bool, now time.Time) error {
	role := "client"
	if server {
		role = "server"
	}
	if now.After(c.NotAfter) {
		if isCA {
			return fmt.Errorf("The CA certificate %s has expired", path)
		}
		return fmt.Errorf("The %s certificate %s has expired", role, path)
	}
	if now.Before(c.NotBefore) {
		if isCA {
			return fmt.Errorf("The CA certificate %s is not yet active", path)
		}
		return fmt.Errorf("The %s certificate %s is not yet active", role, path)
	}
	if c.BasicConstraintsValid && c.IsCA && !isCA {
		return fmt.Errorf("The certificate %s basic constraints show a CA, but we need one for a %s", path, role)
	}
	if isCA && c.BasicConstraintsValid && !c.IsCA {
		return fmt.Errorf("The certificate %s basic constraints do not show a CA", path)
	}
	if isCA && !c.BasicConstraintsValid {
		return fmt.Errorf("The certificate %s is missing basic constraints for a CA", path)
	}
	// As QEMU, usage and purpose only matter when their extensions are
	// marked critical.
	if c.KeyUsage != 0 && critical(c, oidKeyUsage) {
		if isCA && c.KeyUsage&x509.KeyUsageCertSign == 0 {
			return fmt.Errorf("Certificate %s usage does not permit certificate signing", path)
		}
		if !isCA && c.KeyUsage&x509.KeyUsageDigitalSignature == 0 && c.KeyUsage&x509.KeyUsageKeyEncipherment == 0 {
			return fmt.Errorf("Certificate %s usage does not permit digital signature", path)
		}
	}
	if !isCA && len(c.ExtKeyUsage) > 0 && critical(c, oidExtKeyUsage) {
		ok := false
		for _, u := range c.ExtKeyUsage {
			if u == x509.ExtKeyUsageAny || (server && u == x509.ExtKeyUsageServerAuth) || (!server && u == x509.ExtKeyUsageClientAuth) {
				ok = true
			}
		}
		if !ok {
			if server {
				return fmt.Errorf("Certificate %s purpose does not allow use with a TLS server", path)
			}
			return fmt.Errorf("Certificate %s purpose does not allow use with a TLS client", path)
		}
	}
	return nil
}

var (
	oidKeyUsage    = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidExtKeyUsage = asn1.ObjectIdentifier{2, 5, 29, 37}
)

func critical(c *x509.Certificate, oid asn1.ObjectIdentifier) bool {
	for _, e := range c.Extensions {
		if e.Id.Equal(oid) {
			return e.Critical
		}
	}
	return false
}
