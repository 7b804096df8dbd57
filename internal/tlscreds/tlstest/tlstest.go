// Package tlstest writes throw-away X.509 credentials in the layout QEMU's
// tls-creds-x509 object and libnbd's tls-certificates expect (ca-cert.pem,
// server-cert.pem, server-key.pem, client-cert.pem, client-key.pem). It is
// meant for tests.
package tlstest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// Options tune the generated credentials.
type Options struct {
	// NotBefore and NotAfter bound the server certificate's validity
	// (zero: from an hour ago to a day from now).
	NotBefore, NotAfter time.Time
	// ServerIsCA marks the server certificate as a CA (a sanity-check
	// failure for QEMU).
	ServerIsCA bool
	// RevokeClient also writes ca-crl.pem revoking the client certificate.
	RevokeClient bool
	// RSA makes RSA-2048 keys (as openssl req -newkey rsa:2048) instead
	// of ECDSA P-256 ones.
	RSA bool
}

// Generate writes a CA and server and client certificates signed by it
// into dir. The server certificate is valid for localhost, 127.0.0.1 and
// ::1.
func Generate(dir string, o Options) error {
	now := time.Now()
	newKey := func() (crypto.Signer, error) {
		if o.RSA {
			return rsa.GenerateKey(rand.Reader, 2048)
		}
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	}
	caKey, err := newKey()
	if err != nil {
		return err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "blockd test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(dir, "ca-cert.pem"), "CERTIFICATE", caDER); err != nil {
		return err
	}

	leaf := func(name string, serial int64, usage x509.ExtKeyUsage, tweak func(*x509.Certificate)) error {
		key, err := newKey()
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{
			SerialNumber:          big.NewInt(serial),
			Subject:               pkix.Name{CommonName: name},
			NotBefore:             now.Add(-time.Hour),
			NotAfter:              now.Add(24 * time.Hour),
			BasicConstraintsValid: true,
			KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage:           []x509.ExtKeyUsage{usage},
		}
		if tweak != nil {
			tweak(tmpl)
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
		if err != nil {
			return err
		}
		kder, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return err
		}
		if err := writePEM(filepath.Join(dir, name+"-cert.pem"), "CERTIFICATE", der); err != nil {
			return err
		}
		return writePEM(filepath.Join(dir, name+"-key.pem"), "PRIVATE KEY", kder)
	}
	err = leaf("server", 2, x509.ExtKeyUsageServerAuth, func(c *x509.Certificate) {
		c.DNSNames = []string{"localhost"}
		c.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
		if !o.NotBefore.IsZero() {
			c.NotBefore = o.NotBefore
		}
		if !o.NotAfter.IsZero() {
			c.NotAfter = o.NotAfter
		}
		if o.ServerIsCA {
			c.IsCA = true
			c.KeyUsage |= x509.KeyUsageCertSign
		}
	})
	if err != nil {
		return err
	}
	if err := leaf("client", 3, x509.ExtKeyUsageClientAuth, nil); err != nil {
		return err
	}
	if o.RevokeClient {
		crl, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
			Number:     big.NewInt(1),
			ThisUpdate: now.Add(-time.Hour),
			NextUpdate: now.Add(24 * time.Hour),
			RevokedCertificateEntries: []x509.RevocationListEntry{
				{SerialNumber: big.NewInt(3), RevocationTime: now.Add(-time.Minute)},
			},
		}, ca, caKey)
		if err != nil {
			return err
		}
		if err := writePEM(filepath.Join(dir, "ca-crl.pem"), "X509 CRL", crl); err != nil {
			return err
		}
	}
	return nil
}

// Templates of QEMU 7.2's docs/system/tls.rst, the server one naming the
// loopback addresses.
const (
	caInfo = `cn = Name of your organization
ca
cert_signing_key
`
	serverInfo = `organization = Name of your organization
cn = localhost
dns_name = localhost
ip_address = 127.0.0.1
ip_address = ::1
tls_www_server
encryption_key
signing_key
`
	clientInfo = `country = GB
state = London
locality = City Of London
organization = Name of your organization
cn = client.foo.example.com
tls_www_client
encryption_key
signing_key
`
)

// Certtool writes a CA and server and client credentials into dir the way
// QEMU's TLS documentation makes them: GnuTLS's certtool with its default
// keys (RSA, 3072 bits) and the documentation's templates. certtool must
// be installed.
func Certtool(dir string) error {
	certtool := func(args ...string) ([]byte, error) {
		out, err := exec.Command("certtool", args...).Output()
		if err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				return nil, fmt.Errorf("certtool %v: %v: %s", args, err, ee.Stderr)
			}
			return nil, fmt.Errorf("certtool %v: %v", args, err)
		}
		return out, nil
	}
	tmp, err := os.MkdirTemp("", "certtool")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	caKey := filepath.Join(tmp, "ca-key.pem")
	for _, f := range []struct{ name, data string }{{"ca.info", caInfo}, {"server.info", serverInfo}, {"client.info", clientInfo}} {
		if err := os.WriteFile(filepath.Join(tmp, f.name), []byte(f.data), 0o600); err != nil {
			return err
		}
	}
	key := func(path string) error {
		out, err := certtool("--generate-privkey")
		if err != nil {
			return err
		}
		return os.WriteFile(path, out, 0o600)
	}
	if err := key(caKey); err != nil {
		return err
	}
	if _, err := certtool("--generate-self-signed", "--load-privkey", caKey,
		"--template", filepath.Join(tmp, "ca.info"), "--outfile", filepath.Join(dir, "ca-cert.pem")); err != nil {
		return err
	}
	for _, name := range []string{"server", "client"} {
		if err := key(filepath.Join(dir, name+"-key.pem")); err != nil {
			return err
		}
		_, err := certtool("--generate-certificate",
			"--load-ca-certificate", filepath.Join(dir, "ca-cert.pem"), "--load-ca-privkey", caKey,
			"--load-privkey", filepath.Join(dir, name+"-key.pem"),
			"--template", filepath.Join(tmp, name+".info"), "--outfile", filepath.Join(dir, name+"-cert.pem"))
		if err != nil {
			return err
		}
	}
	return nil
}

func writePEM(path, typ string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}
