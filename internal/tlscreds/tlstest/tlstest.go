// Package tlstest writes throw-away X.509 credentials in the layout QEMU's
// tls-creds-x509 object and libnbd's tls-certificates expect (ca-cert.pem,
// server-cert.pem, server-key.pem, client-cert.pem, client-key.pem). It is
// meant for tests.
package tlstest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
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
}

// Generate writes a CA and server and client certificates signed by it
// into dir. The server certificate is valid for localhost, 127.0.0.1 and
// ::1.
func Generate(dir string, o Options) error {
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
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
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
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
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
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
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
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

func writePEM(path, typ string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}
